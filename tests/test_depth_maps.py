"""Depth maps from photos with MegaDepth: the convention, folders, and every place users meet it
(launch.py import_depth / depth / render without --depth, and building `ebb` rgbd from the AIM
release, which has no depth maps)."""

import os
import pathlib

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

import helpers
import torch_files
from test_tfds_ebb import build_ebb, decode, make_ebb_folder, read_split
from bokeh_jax import checkpoint, depth_maps, megadepth
from bokeh_jax import model as model_lib

SIZE = '64x96'  # working size of the tests (the default is 384x512)


@pytest.fixture(scope='module')
def params():
    return megadepth.params_from_state_dict(megadepth.seeded_state_dict(0))


def config(batch_size: int = 2) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {'depth': {'model': 'megadepth', 'working_size': SIZE, 'batch_size': batch_size}})


def write_photo(path, hw, seed):
    rng = np.random.default_rng(seed)
    # Smooth content, so that resizing keeps the picture (and the depth) recognisable.
    small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(small).resize(hw[::-1], Image.BILINEAR).save(path, quality=95)


def test_working_size_follows_the_orientation():
    assert depth_maps.working_size((1024, 1536), (384, 512)) == (384, 512)
    assert depth_maps.working_size((1536, 1024), (384, 512)) == (512, 384)
    assert depth_maps.working_size((600, 600), (512, 384)) == (384, 512)
    with pytest.raises(depth_maps.DepthError, match='multiples of 16'):
        depth_maps.parse_size('100x512')


def test_map_convention_near_is_bright():
    log_depth = np.log(np.linspace(1.0, 10.0, 32 * 48, dtype=np.float32)).reshape(32, 48)
    depth = depth_maps.to_map(log_depth, (101, 150))  # odd sides: half size rounds down
    assert depth.dtype == np.uint8 and depth.shape == (50, 75)
    assert depth.min() == 0 and depth.max() == 255
    assert depth[0, 0] == 255 and depth[-1, -1] == 0  # small depth (near) is bright


def test_bilinear_resize():
    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    np.testing.assert_allclose(depth_maps.resize_bilinear(image, (3, 4)), image)
    up = depth_maps.resize_bilinear(image, (6, 8))[..., 0]
    assert up[0, 0] == 0 and up[-1, -1] == 11  # edges clamp
    # Output pixel 2 of 6 sits at input (2 + 0.5) / 2 - 0.5 = 0.75 on both axes; the image is
    # 4 * row + column, which bilinear interpolation reproduces exactly.
    np.testing.assert_allclose(up[2, 2], 4 * 0.75 + 0.75)
    assert depth_maps.resize_bilinear(np.ones((64, 96, 3), np.float32), (32, 48)).shape == (32, 48, 3)


def test_folder_batches_resumes_and_lists_failures(tmp_path, params):
    megadepth.save_params(str(tmp_path / 'work'), params, {'source': 'test'})
    photos, out = tmp_path / 'photos', tmp_path / 'maps'
    photos.mkdir()
    for i, hw in enumerate([(64, 96), (96, 64), (66, 99), (64, 96), (128, 192)]):
        write_photo(photos / f'p{i}.jpg', hw, seed=i)
    (photos / 'broken.jpg').write_bytes(b'not a jpeg')
    (photos / 'notes.txt').write_text('ignored')
    lines = []
    with pytest.raises(depth_maps.DepthError, match=r'(?s)1 of 6 photo\(s\) failed.*broken\.jpg'):
        depth_maps.make_depth_maps(config(batch_size=2), str(tmp_path / 'work'), str(photos),
                                   str(out), log=lines.append)
    maps = {p.name: np.asarray(Image.open(p)) for p in out.iterdir()}
    assert sorted(maps) == [f'p{i}.png' for i in range(5)]  # no leftovers of the temp files
    for name, hw in [('p0.png', (32, 48)), ('p1.png', (48, 32)), ('p2.png', (33, 49)),
                     ('p4.png', (64, 96))]:
        assert maps[name].shape == hw and maps[name].dtype == np.uint8
        assert maps[name].min() == 0 and maps[name].max() == 255
    assert Image.open(out / 'p1.png').mode == 'L'

    # One photo, unbatched, gives the same map as in the batch of two (deterministic).
    estimator = depth_maps.load_estimator(config(batch_size=1), str(tmp_path / 'work'))
    from bokeh_jax import image_io

    np.testing.assert_array_equal(estimator(image_io.read_photo(str(photos / 'p3.jpg'))),
                                  maps['p3.png'])

    # A stopped run continues: present maps are skipped, missing ones made.
    os.remove(out / 'p2.png')
    before = (out / 'p0.png').stat().st_mtime_ns
    (photos / 'broken.jpg').unlink()
    lines.clear()
    written = depth_maps.make_depth_maps(config(), str(tmp_path / 'work'), str(photos), str(out),
                                         log=lines.append)
    assert written == 1 and (out / 'p0.png').stat().st_mtime_ns == before
    assert any('4 depth map(s) already exist' in line for line in lines)
    np.testing.assert_array_equal(np.asarray(Image.open(out / 'p2.png')), maps['p2.png'])


def test_paths_are_checked_before_running(tmp_path):
    photo = tmp_path / 'a.png'
    write_photo(photo, (64, 96), 0)
    with pytest.raises(depth_maps.DepthError, match='replace an input photo'):
        depth_maps.plan_jobs(str(tmp_path), str(tmp_path))
    (tmp_path / 'a_depth.png').write_bytes(b'')
    with pytest.raises(depth_maps.DepthError, match='a_depth.png already exists.*--overwrite'):
        depth_maps.plan_jobs(str(photo), str(tmp_path / 'a_depth.png'))
    jobs, skipped = depth_maps.plan_jobs(str(photo), str(tmp_path / 'a_depth.png'), overwrite=True)
    assert [j.output for j in jobs] == [str(tmp_path / 'a_depth.png')] and not skipped
    with pytest.raises(depth_maps.DepthError, match='PNG'):
        depth_maps.plan_jobs(str(photo), str(tmp_path / 'a.jpg'))
    with pytest.raises(depth_maps.DepthError, match='No MegaDepth weights.*--mode=import_depth'):
        depth_maps.load_estimator(config(), str(tmp_path / 'empty'))


def test_aim_release_builds_rgbd_with_the_depth_command(tmp_path):
    """The documented route: import the released weights (legacy .pth), one depth command over
    Training/original, then the unchanged TFDS build of `ebb` config `rgbd`."""
    weights = tmp_path / 'best_generalization_net_G.pth'
    torch_files.write_legacy(weights, megadepth.seeded_state_dict(5, num_batches_tracked=False))
    work = tmp_path / 'work'
    result = helpers.launch('--mode=import_depth', f'--megadepth_weights={weights}',
                            f'--workdir={work}')
    assert 'Imported 5,371,297 MegaDepth parameters' in result.stdout
    manual = make_ebb_folder(tmp_path / 'manual', 'aim', depth=False)
    training = manual / 'Training'
    result = helpers.launch('--mode=depth', f'--input={training}/original',
                            f'--output={training}/original_depth', f'--workdir={work}',
                            f'--config.depth.working_size={SIZE}')
    assert 'Wrote 5 depth map(s)' in result.stdout
    builder = build_ebb(manual, tmp_path / 'data', 'rgbd')
    examples = {**read_split(builder, 'train'), **read_split(builder, 'val294')}
    assert sorted(examples) == ['0', '1', '2', '4400', '4401']
    for stem, example in examples.items():
        depth = decode(example['depth'])
        assert depth.shape[:2] == (32, 48)
        np.testing.assert_array_equal(
            depth.reshape(32, 48), np.asarray(Image.open(training / 'original_depth' / f'{stem}.png')))


def test_render_estimates_missing_depth(tmp_path):
    """A photo without a depth map renders end to end on an RGB + depth model, with MegaDepth
    weights imported from a zip-format .pth; without imported weights the error says what to
    run."""
    work = tmp_path / 'work'
    pynet = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0), input_channels=4)
    checkpoint.save_params(str(work), 1, pynet, {'channels': 4, 'input_channels': 4})
    photo = tmp_path / 'photo.jpg'
    write_photo(photo, (64, 96), 3)
    render = ('--mode=render', f'--workdir={work}', f'--input={photo}',
              f'--config.depth.working_size={SIZE}')
    result = helpers.launch(*render, f'--output={tmp_path}/none.png', check=False)
    assert result.returncode != 0
    assert '--mode=import_depth --megadepth_weights=' in result.stderr
    assert not (tmp_path / 'none.png').exists()

    weights = tmp_path / 'net_G.pth'
    torch_files.write_zip(weights, megadepth.seeded_state_dict(6))
    helpers.launch('--mode=import_depth', f'--megadepth_weights={weights}', f'--workdir={work}')
    result = helpers.launch(*render, f'--output={tmp_path}/bokeh.png')
    assert 'estimating each photo\'s depth with megadepth' in result.stdout
    out = np.asarray(Image.open(tmp_path / 'bokeh.png'))
    assert out.shape == (64, 96, 3)


def test_import_refuses_a_malicious_file(tmp_path):
    evil = tmp_path / 'evil.pth'
    torch_files.write_malicious(evil, 'legacy', f'touch {tmp_path}/pwned')
    result = helpers.launch('--mode=import_depth', f'--megadepth_weights={evil}',
                            f'--workdir={tmp_path}/work', check=False)
    assert result.returncode != 0 and 'os.system' in result.stderr
    assert not (tmp_path / 'pwned').exists()
    assert not (tmp_path / 'work' / 'depth').exists()
