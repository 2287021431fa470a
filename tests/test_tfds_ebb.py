"""Tests of the TFDS builders in tfds_ebb/: real builds of generated folders, every bad input."""

import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import tfds_ebb
from tfds_ebb.ebb import ebb_dataset_builder as ebb
from tfds_ebb.synthetic_bokeh import scenes
from tfds_ebb.synthetic_bokeh import synthetic_bokeh_dataset_builder as synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTO_HW = (64, 96)
TRAIN_IDS = ('0', '1', '2', '4400', '4401')  # 3 in `train`, 2 in `val294`


# ----------------------------------------------------------------------------- folder fixtures

def jpeg_bytes(seed: int, hw=PHOTO_HW, mode: str = 'RGB') -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, hw + ((3,) if mode == 'RGB' else ()), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def png_bytes(seed: int, hw, mode: str = 'L') -> bytes:
    rng = np.random.default_rng(seed)
    if mode == 'I;16':
        image = Image.fromarray(rng.integers(0, 65535, hw, dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, hw, dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, 'PNG')
    return buffer.getvalue()


def write_pairs(root: pathlib.Path, ids, seed: int = 0, depth: bool = True) -> None:
    """root/{original,bokeh,original_depth}/<id>.jpg|png with random content."""
    for sub in ('original', 'bokeh') + (('original_depth',) if depth else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(ids):
        (root / 'original' / f'{stem}.jpg').write_bytes(jpeg_bytes(seed + 3 * i))
        (root / 'bokeh' / f'{stem}.jpg').write_bytes(jpeg_bytes(seed + 3 * i + 1))
        if depth:
            half = (PHOTO_HW[0] // 2, PHOTO_HW[1] // 2)
            (root / 'original_depth' / f'{stem}.png').write_bytes(png_bytes(seed + 3 * i + 2, half))


def make_ebb_folder(root: pathlib.Path, layout: str, depth: bool = True) -> pathlib.Path:
    """An EBB! download in the AIM 2020 layout ('aim') or the original code's ('pynet')."""
    if layout == 'aim':
        write_pairs(root / 'Training', TRAIN_IDS, depth=depth)
    else:
        write_pairs(root / 'train', TRAIN_IDS, depth=depth)
        write_pairs(root / 'test', ('a', 'b'), seed=100, depth=depth)
    return root


def build_ebb(manual_dir, data_dir, config='rgbd', file_format='array_record', **kwargs):
    builder = tfds.builder('ebb', config=config, data_dir=str(data_dir), file_format=file_format,
                           **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def read_split(builder, split):
    """{id: example} with raw image bytes, through the format's own reader (array_record: the
    TF-free data source; tfrecord: tf.data). Raw bytes, because TF and PIL decode the same JPEG
    differently (by a few levels)."""
    decoders = {k: tfds.decode.SkipDecoding() for k in ('sharp', 'bokeh', 'depth')
                if k in builder.info.features}
    if builder.info.file_format.value == 'array_record':
        examples = list(builder.as_data_source(split, decoders=decoders))
    else:
        examples = list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))
    return {ex['id'].decode(): ex for ex in examples}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# ----------------------------------------------------------------------------- TFDS test cases

class EbbDatasetTest(tfds.testing.DatasetBuilderTestCase):
    """TFDS's standard builder checks on dummy_data/ (AIM 2020 layout), both configs."""
    DATASET_CLASS = ebb.Builder
    SPLITS = {'train': 3, 'val294': 2}
    BUILDER_CONFIG_NAMES_TO_TEST = ['rgbd', 'rgb']


class SyntheticDatasetTest(tfds.testing.DatasetBuilderTestCase):
    """TFDS's standard builder checks on a tiny generated set, both configs."""
    DATASET_CLASS = synthetic.Builder
    SPLITS = {'train': 3, 'validation': 2}
    BUILDER_CONFIG_NAMES_TO_TEST = ['rgbd', 'rgb']
    EXAMPLE_DIR = str(REPO / 'tfds_ebb' / 'synthetic_bokeh')  # nothing is downloaded

    def _make_builder(self, config=None):
        return self.dataset_class(data_dir=self.tmp_dir, config=config, num_train=3,
                                  num_validation=2, height=64, width=128)


def test_dummy_data_is_the_aim_layout():
    root = REPO / 'tfds_ebb' / 'ebb' / 'dummy_data' / 'Training'
    for sub, suffix in (('original', '.jpg'), ('bokeh', '.jpg'), ('original_depth', '.png')):
        assert sorted(p.name for p in (root / sub).iterdir()) == sorted(
            f'{i}{suffix}' for i in TRAIN_IDS)


# ----------------------------------------------------------------------------- ebb builds

@pytest.mark.parametrize('layout', ['aim', 'pynet'])
@pytest.mark.parametrize('config', ['rgbd', 'rgb'])
@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_ebb_builds_both_layouts_configs_and_formats(tmp_path, layout, config, file_format):
    manual = make_ebb_folder(tmp_path / 'manual', layout, depth=config == 'rgbd')
    builder = build_ebb(manual, tmp_path / 'data', config, file_format)
    expected_splits = {'train': 3, 'val294': 2} | ({'test': 2} if layout == 'pynet' else {})
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == expected_splits
    folder = manual / ('Training' if layout == 'aim' else 'train')
    train = read_split(builder, 'train')
    assert list(train) == ['0', '1', '2']  # id order is kept
    val = read_split(builder, 'val294')
    assert sorted(val) == ['4400', '4401']
    for stem, ex in {**train, **val}.items():  # the original bytes, not re-encoded
        assert ex['sharp'] == (folder / 'original' / f'{stem}.jpg').read_bytes()
        assert ex['bokeh'] == (folder / 'bokeh' / f'{stem}.jpg').read_bytes()
        if config == 'rgbd':
            assert ex['depth'] == (folder / 'original_depth' / f'{stem}.png').read_bytes()
            assert decode(ex['depth']).shape == (32, 48)
        else:
            assert 'depth' not in ex
    if layout == 'pynet':
        assert sorted(read_split(builder, 'test')) == ['a', 'b']


def test_ebb_depth_dir_elsewhere_and_off_by_one(tmp_path):
    manual = make_ebb_folder(tmp_path / 'manual', 'aim', depth=False)
    depth_dir = tmp_path / 'megadepth'
    depth_dir.mkdir()
    for i, stem in enumerate(TRAIN_IDS):  # 33x47: one pixel off half of 64x96 is allowed
        (depth_dir / f'{stem}.png').write_bytes(png_bytes(i, (33, 47)))
    builder = build_ebb(manual, tmp_path / 'data', 'rgbd', depth_dir=str(depth_dir))
    assert decode(read_split(builder, 'train')['1']['depth']).shape == (33, 47)


def test_ebb_without_any_layout_explains_both(tmp_path):
    (tmp_path / 'manual' / 'photos').mkdir(parents=True)
    with pytest.raises(ebb.BadInput, match=r"Training/original.*train/original.*\['photos'\]"):
        build_ebb(tmp_path / 'manual', tmp_path / 'data')


def _corrupt(kind: str, folder: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Breaks pair '1' of `folder` in one way; returns the file the error must name and a regex."""
    original, bokeh, depth = (folder / 'original' / '1.jpg', folder / 'bokeh' / '1.jpg',
                              folder / 'original_depth' / '1.png')
    if kind == 'no_bokeh':
        bokeh.unlink()
        return original, 'no bokeh photo'
    if kind == 'no_sharp':
        original.unlink()
        return bokeh, 'no sharp photo'
    if kind == 'no_depth':
        depth.unlink()
        return original, 'no depth map'
    if kind == 'unreadable':
        original.write_bytes(b'this is not an image')
        return original, 'unreadable or truncated'
    if kind == 'truncated':
        original.write_bytes(jpeg_bytes(7)[:800])
        return original, 'unreadable or truncated'
    if kind == 'size_mismatch':
        bokeh.write_bytes(jpeg_bytes(8, hw=(64, 128)))
        return bokeh, r'64x128 but the sharp photo .* is 64x96'
    if kind == 'depth_size':
        depth.write_bytes(png_bytes(9, (30, 48)))
        return depth, 'height must be half the photo height'
    if kind == 'grayscale':
        original.write_bytes(jpeg_bytes(10, mode='L'))
        return original, 'photo is L, expected RGB'
    if kind == 'not_jpeg':
        original.write_bytes(png_bytes(11, PHOTO_HW, mode='RGBA'))
        return original, 'expected a JPEG photo, found PNG'
    if kind == 'depth_16bit':
        depth.write_bytes(png_bytes(12, (32, 48), mode='I;16'))
        return depth, 'expected an 8-bit grayscale PNG'
    if kind == 'depth_rgb':
        depth.write_bytes(png_bytes(13, (32, 48), mode='RGB'))
        return depth, 'expected an 8-bit grayscale PNG'
    if kind == 'bad_id':
        for sub, suffix in (('original', '.jpg'), ('bokeh', '.jpg'), ('original_depth', '.png')):
            (folder / sub / f'1{suffix}').rename(folder / sub / f'img1{suffix}')
        return folder / 'original' / 'img1.jpg', "'img1' fits no split"
    raise ValueError(kind)


BAD_KINDS = ['no_bokeh', 'no_sharp', 'no_depth', 'unreadable', 'truncated', 'size_mismatch',
             'depth_size', 'grayscale', 'not_jpeg', 'depth_16bit', 'depth_rgb', 'bad_id']


@pytest.mark.parametrize('kind', BAD_KINDS)
def test_ebb_bad_input_names_the_file(tmp_path, kind):
    manual = make_ebb_folder(tmp_path / 'manual', 'aim')
    path, message = _corrupt(kind, manual / 'Training')
    with pytest.raises(ebb.BadInput) as error:
        build_ebb(manual, tmp_path / 'data', 'rgbd')
    assert str(path) in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)
    assert not tfds.builder('ebb', config='rgbd', data_dir=str(tmp_path / 'data')).is_prepared()


@pytest.mark.parametrize('kind', ['no_bokeh', 'truncated'])
def test_ebb_skip_bad_lists_every_skipped_id(tmp_path, kind):
    manual = make_ebb_folder(tmp_path / 'manual', 'aim')
    path, _ = _corrupt(kind, manual / 'Training')
    (manual / 'Training' / 'bokeh' / '4400.jpg').write_bytes(jpeg_bytes(3, hw=(32, 32)))
    builder = build_ebb(manual, tmp_path / 'data', 'rgbd', skip_bad=True)
    assert list(read_split(builder, 'train')) == ['0', '2']
    assert list(read_split(builder, 'val294')) == ['4401']
    reloaded = tfds.builder('ebb', config='rgbd', data_dir=str(tmp_path / 'data'))
    skipped = reloaded.info.metadata['skipped']
    assert sorted(skipped) == ['1', '4400']
    assert str(path) in skipped['1']


# ----------------------------------------------------------------------------- synthetic

def build_synthetic(data_dir, config='rgbd', file_format='array_record', **generation):
    generation = {'num_train': 3, 'num_validation': 2, 'height': 64, 'width': 128} | generation
    builder = tfds.builder('synthetic_bokeh', config=config, data_dir=str(data_dir),
                           file_format=file_format, **generation)
    builder.download_and_prepare()
    return builder


def _raw(builder, split):
    decoders = {k: tfds.decode.SkipDecoding() for k in ('sharp', 'bokeh', 'depth')
                if k in builder.info.features}
    return list(builder.as_data_source(split, decoders=decoders))


def test_synthetic_is_deterministic_by_seed(tmp_path):
    first = _raw(build_synthetic(tmp_path / 'a'), 'train')
    again = _raw(build_synthetic(tmp_path / 'b'), 'train')
    other = _raw(build_synthetic(tmp_path / 'c', seed=1), 'train')
    assert [ex['id'] for ex in first] == [b'train_00000', b'train_00001', b'train_00002']
    for a, b, c in zip(first, again, other):
        assert a == b
        assert a['sharp'] != c['sharp']


def test_synthetic_subject_is_nearest_unless_foreground():
    """Without `foreground` the focus is at the nearest depth of every scene; with it, objects in
    front of the subject put the focus elsewhere in some scenes."""
    def scene(i, foreground):
        return scenes.make_scene(np.random.default_rng([0, 0, i]), 64, 96, foreground)

    for i in range(40):
        plain = scene(i, False)
        assert plain.focus == plain.disparity.max() == 1.0
    focus = [scene(i, True).focus for i in range(40)]
    assert sum(f < 0.99 for f in focus) >= 10, focus
    # From the command line `foreground=false` arrives as a string.
    for value, expected in (('false', False), ('True', True), (0, False)):
        assert synthetic.Builder(foreground=value).generation.foreground is expected
    with pytest.raises(ValueError, match='foreground must be true or false'):
        synthetic.Builder(foreground='maybe')


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_synthetic_features_match_ebb(tmp_path, file_format):
    builder = build_synthetic(tmp_path / 'data', file_format=file_format)
    for config in ('rgbd', 'rgb'):
        assert (repr(synthetic.feature_spec(config == 'rgbd'))
                == repr(ebb.feature_spec(config == 'rgbd')))
    examples = read_split(builder, 'validation')
    assert sorted(examples) == ['validation_00000', 'validation_00001']
    for ex in examples.values():
        sharp, bokeh, depth = (decode(ex[k]) for k in ('sharp', 'bokeh', 'depth'))
        assert sharp.shape == bokeh.shape == (64, 128, 3)
        assert depth.shape == (32, 64)
        assert depth.min() == 0 and depth.max() == 255  # stretched, like the MegaDepth maps
        assert np.abs(sharp.astype(int) - bokeh).mean() > 1  # something is out of focus
    assert builder.info.metadata['height'] == 64 and builder.info.metadata['seed'] == 0


CONTROL = {'fnumbers': (2.0, 4.0, 16.0), 'focus': 'random', 'num_train': 8, 'seed': 5}


def test_synthetic_records_carry_fnumber_and_focus(tmp_path):
    """Each record's f-number comes from the set; with focus 'random' the focal plane is the
    subject (the central median) in some scenes and elsewhere in others, always a depth of the
    scene; the bokeh photo is rendered at the stored f-number and focus; same seed, same set."""
    builder = build_synthetic(tmp_path / 'a', **CONTROL)
    records = _raw(builder, 'train')
    assert _raw(build_synthetic(tmp_path / 'b', **CONTROL), 'train') == records
    assert {'fnumber', 'focus_disparity'} <= set(builder.info.features)
    assert builder.info.metadata['fnumbers'] == [2.0, 4.0, 16.0]
    assert builder.info.metadata['focus'] == 'random'
    fnumbers = [float(r['fnumber']) for r in records]
    assert set(fnumbers) <= {2.0, 4.0, 16.0} and len(set(fnumbers)) >= 2, fnumbers
    generation = builder.generation
    on_subject = []
    for i, record in enumerate(records):
        scene = scenes.make_scene(np.random.default_rng([generation.seed, 0, i]), 64, 128)
        focus = float(record['focus_disparity'])
        on_subject.append(focus == np.float32(scene.focus))
        assert scene.disparity.min() <= focus <= scene.disparity.max()
        # Rendered again at each f-number of the set: the stored one matches (up to JPEG).
        errors = {n: np.abs(decode(record['bokeh']).astype(int)
                            - scenes.render_pair(scene, 0.06 * 2 / n, focus)[1]).mean()
                  for n in CONTROL['fnumbers']}
        assert min(errors, key=errors.get) == fnumbers[i] and errors[fnumbers[i]] < 3, errors
    assert 0 < sum(on_subject) < len(records), on_subject


def test_synthetic_blur_follows_the_fnumber(tmp_path):
    """The same scenes (same seed) at f/2 and at f/16: equal photos, and every bokeh photo at f/16
    nearer its photo than at f/2. The default is the fixed look of generator version 2."""
    wide = _raw(build_synthetic(tmp_path / 'f2', fnumbers=2.0), 'train')
    narrow = _raw(build_synthetic(tmp_path / 'f16', fnumbers=(16.0,)), 'train')
    for a, b in zip(wide, narrow):
        assert a['sharp'] == b['sharp'] and a['depth'] == b['depth']
        assert (float(a['fnumber']), float(b['fnumber'])) == (2.0, 16.0)
        assert a['focus_disparity'] == b['focus_disparity']  # the subject
        sharp = decode(a['sharp']).astype(float)
        assert (np.abs(decode(b['bokeh']) - sharp).mean()
                < 0.5 * np.abs(decode(a['bokeh']) - sharp).mean())
    # Default fnumbers (2.0,), focus 'subject': what render_pair gives at the renderer's default.
    generation = synthetic.Generation(num_train=1, num_validation=1, height=64, width=128)
    scene = scenes.make_scene(np.random.default_rng([0, 0, 0]), 64, 128)
    _, bokeh, _ = scenes.render_pair(scene)
    example = synthetic.make_example(generation, True, 'train', 0)
    assert example['bokeh'] == synthetic._encode(bokeh, 'JPEG')
    assert example['bokeh'] == wide[0]['bokeh']


def test_synthetic_control_arguments():
    assert synthetic.Builder(fnumbers='2:2.8:16').generation.fnumbers == (2.0, 2.8, 16.0)
    assert synthetic.Builder(fnumbers=4).generation.fnumbers == (4.0,)
    for kwargs, message in [({'fnumbers': 'two'}, 'fnumbers must be f-numbers'),
                            ({'fnumbers': ()}, 'at least one f-number'),
                            ({'fnumbers': (2.0, 64.0)}, 'fnumbers entry 64.0'),
                            ({'focus': 'near'}, "focus must be one of")]:
        with pytest.raises(ValueError, match=message):
            synthetic.Builder(**kwargs)


def test_synthetic_rejects_sizes_that_are_not_multiples_of_64(tmp_path):
    with pytest.raises(ValueError, match='height=100 must be a positive multiple of 64'):
        tfds.builder('synthetic_bokeh', config='rgbd', data_dir=str(tmp_path), height=100)


def test_tfds_build_command(tmp_path):
    """TFDS's `build` command, by path (as the README says) and by name with builder kwargs.

    Through tfds_ebb/build.py: the `tfds` entry point itself needs apache-beam (tfds#5463).
    """
    manual = make_ebb_folder(tmp_path / 'manual', 'aim')
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
    command = [sys.executable, 'tfds_ebb/build.py']
    subprocess.run(command + ['tfds_ebb/ebb', f'--manual_dir={manual}', '--config=rgbd',
                              f'--data_dir={tmp_path / "data"}', '--file_format=array_record'],
                   cwd=REPO, env=env, check=True, capture_output=True)
    builder = tfds.builder('ebb', config='rgbd', data_dir=str(tmp_path / 'data'))
    assert builder.info.splits['train'].num_examples == 3
    subprocess.run(command + ['synthetic_bokeh/rgb/num_train=2,num_validation=1,width=64,'
                              'foreground=True',
                              '--imports=tfds_ebb', f'--data_dir={tmp_path / "data"}',
                              '--file_format=tfrecord'],
                   cwd=REPO, env={**env, 'PYTHONPATH': str(REPO)}, check=True,
                   capture_output=True)
    builder = tfds.builder('synthetic_bokeh', config='rgb', data_dir=str(tmp_path / 'data'))
    assert builder.info.splits['train'].num_examples == 2
    assert builder.info.metadata['width'] == 64 and builder.info.metadata['foreground'] is True


def test_package_registers_both_builders():
    assert {'ebb', 'synthetic_bokeh'} <= set(tfds.list_builders(with_community_datasets=False))
    assert tfds_ebb.ebb_dataset_builder.Builder.name == 'ebb'


def test_ebb_is_not_reused_when_the_manual_folder_changed(tmp_path):
    """A real build, then pairs added / removed / rewritten: building again stops and says what
    changed (builder and prepare_dataset), until the folder matches or the data set is rebuilt."""
    import ml_collections

    from bokeh_jax.errors import UserError
    from tfds_ebb import prepare

    manual = make_ebb_folder(tmp_path / 'manual', 'aim')
    data = tmp_path / 'data'
    build_ebb(manual, data)
    build_ebb(manual, data)  # unchanged: reused
    root = manual / 'Training'
    write_pairs(root, ('3',), seed=50)  # one pair added: 3 files
    with pytest.raises(ebb.StaleDataset, match=r'3 file\(s\) added \(Training/bokeh/3.jpg, '
                                               r'Training/original/3.jpg, '
                                               r'Training/original_depth/3.png\).*--overwrite'):
        build_ebb(manual, data)
    config = ml_collections.ConfigDict(dict(
        name='ebb', builder_config='rgbd', data_dir=str(data), manual_dir=str(manual),
        depth_dir='', skip_bad=False))
    with pytest.raises(UserError, match=r'3 file\(s\) added'):
        prepare.prepare_dataset(config)
    (root / 'bokeh' / '0.jpg').write_bytes(jpeg_bytes(99))  # rewritten
    (root / 'original' / '4401.jpg').unlink()
    with pytest.raises(ebb.StaleDataset, match=r'3 file\(s\) added .*1 file\(s\) removed '
                                               r'\(Training/original/4401.jpg\); 1 file\(s\) '
                                               r'changed \(Training/bokeh/0.jpg\)'):
        build_ebb(manual, data, skip_bad=True)
    (root / 'bokeh' / '4401.jpg').unlink()
    (root / 'original_depth' / '4401.png').unlink()
    builder = tfds.builder('ebb', config='rgbd', data_dir=str(data))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    assert sorted(read_split(builder, 'train')) == ['0', '1', '2', '3']
    prepare.prepare_dataset(config)  # up to date again: reused
