"""The RealBokeh builder: real TFDS builds of generated folders in the release's layout, every
named error, staleness, and a training run that reads the built set through launch.py."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from bokeh_jax import checkpoint, depth_maps, image_io, megadepth
from bokeh_jax.errors import UserError
from configs import default
from tfds_ebb import prepare
from tfds_ebb.realbokeh import realbokeh_dataset_builder as realbokeh
from helpers import ROOT, launch
import torch_files

PHOTO_HW = (64, 96)
WORKING_SIZE = '64x96'  # MegaDepth's input in the tests (the default 384x512 is slow on CPU)
# {split: {scene: f-numbers as the file names spell them}}: both spellings of whole numbers.
SCENES = {'train': {'0': ('2.0', '2.8', '8'), '1': ('2', '5.6'), '2': ('4.0', '20')},
          'validation': {'10': ('2.0', '16.0'), '11': ('2.8', '11')}}


def jpeg_bytes(seed: int, hw=PHOTO_HW) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, hw + (3,), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def make_folder(root: pathlib.Path) -> pathlib.Path:
    """A RealBokeh download in the release's layout, with SCENES."""
    seed = 0
    for split, scenes in SCENES.items():
        for sub in ('in', 'gt', 'metadata'):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for scene, spellings in scenes.items():
            (root / split / 'in' / f'{scene}_f22.JPG').write_bytes(jpeg_bytes(seed))
            (root / split / 'gt' / scene).mkdir()
            for spelling in spellings:
                seed += 1
                (root / split / 'gt' / scene / f'{scene}_f{spelling}.JPG').write_bytes(
                    jpeg_bytes(seed))
            metadata = {'id': scene, 'source_av': 22, 'focal_length': 50.0,
                        'focus_plane_distance': 1.5 + int(scene),
                        'target_avs': [float(s) for s in spellings]}
            if scene == '2':  # the input's f-number from its name; no focal length
                del metadata['source_av'], metadata['focal_length']
            (root / split / 'metadata' / f'{scene}.json').write_text(json.dumps(metadata))
            seed += 1
    return root


def build(manual, data_dir, config='rgb', **kwargs):
    builder = tfds.builder('realbokeh', config=config, data_dir=str(data_dir),
                           file_format='array_record', **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def records(builder, split):
    return list(builder.as_data_source(split, decoders={
        k: tfds.decode.SkipDecoding() for k in ('sharp', 'bokeh', 'depth')
        if k in builder.info.features}))


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """Random MegaDepth weights in the released file's format (legacy PyTorch pickle)."""
    path = tmp_path_factory.mktemp('weights') / 'best_generalization_net_G.pth'
    torch_files.write_legacy(path, megadepth.seeded_state_dict(0, num_batches_tracked=False))
    return path


@pytest.fixture(scope='module')
def rgbd(tmp_path_factory, weights):
    """(manual folder, data dir, builder) of an rgbd build."""
    manual = make_folder(tmp_path_factory.mktemp('realbokeh'))
    data_dir = tmp_path_factory.mktemp('tfds')
    builder = build(manual, data_dir, 'rgbd', megadepth_weights=str(weights),
                    depth_working_size=WORKING_SIZE)
    return manual, data_dir, builder


# ----------------------------------------------------------------------------- builds

def test_rgb_one_example_per_scene_and_aperture(tmp_path):
    manual = make_folder(tmp_path / 'manual')
    extra = manual / 'train' / 'gt' / '1' / '1_f4.0.JPG'  # not in 1.json's target_avs
    extra.write_bytes(jpeg_bytes(99))
    builder = build(manual, tmp_path / 'data')
    assert set(builder.info.splits) == {'train', 'validation'}
    assert 'depth' not in builder.info.features
    assert builder.info.features['fnumber'].np_dtype == np.float32
    train = records(builder, 'train')
    assert [(r['id'].decode(), r['fnumber']) for r in train] == [
        ('0_f2.0', 2.0), ('0_f2.8', np.float32(2.8)), ('0_f8', 8.0), ('1_f2', 2.0),
        ('1_f5.6', np.float32(5.6)), ('2_f4.0', 4.0), ('2_f20', 20.0)]
    assert len(records(builder, 'validation')) == 4
    for r in train:
        scene = r['scene'].decode()
        assert r['sharp'] == (manual / 'train' / 'in' / f'{scene}_f22.JPG').read_bytes()
        assert r['bokeh'] == (manual / 'train' / 'gt' / scene / (r['id'].decode() + '.JPG')
                              ).read_bytes()
        assert r['source_fnumber'] == 22 and r['focus_plane_distance'] == 1.5 + int(scene)
        assert r['focal_length'] == 50 if scene != '2' else np.isnan(r['focal_length'])
    assert builder.info.metadata['unlisted'] == [str(extra)]


def test_rgbd_depth_is_megadepth_of_the_input(rgbd, weights):
    manual, _, builder = rgbd
    estimator = depth_maps.Estimator(depth_maps.read_weights(str(weights)),
                                     depth_maps.parse_size(WORKING_SIZE))
    found = records(builder, 'validation')
    assert [r['id'].decode() for r in found] == ['10_f2.0', '10_f16.0', '11_f2.8', '11_f11']
    for r in found:
        photo = image_io.decode(r['sharp'])
        expected = estimator(photo)
        depth = image_io.decode(r['depth'])
        assert depth.shape == (PHOTO_HW[0] // 2, PHOTO_HW[1] // 2) == expected.shape
        np.testing.assert_array_equal(depth, expected)
    assert len(records(builder, 'train')) == 7


def test_the_package_registers_it():
    assert 'realbokeh' in tfds.list_builders(with_community_datasets=False)


def test_rgbd_needs_weights(tmp_path):
    manual = make_folder(tmp_path / 'manual')
    with pytest.raises(realbokeh.BadInput, match='megadepth_weights=PATH.*or build config rgb'):
        build(manual, tmp_path / 'data', 'rgbd')
    with pytest.raises(realbokeh.BadInput, match=r'nothere.pth: no such file'):
        build(manual, tmp_path / 'data', 'rgbd', megadepth_weights=str(tmp_path / 'nothere.pth'))


# ----------------------------------------------------------------------------- named errors

def _drop_target(root):
    (root / 'train' / 'gt' / '0' / '0_f2.8.JPG').unlink()


def _orphan_target(root):
    (root / 'train' / 'gt' / '7').mkdir()
    (root / 'train' / 'gt' / '7' / '7_f2.0.JPG').write_bytes(jpeg_bytes(70))


def _drop_metadata(root):
    (root / 'validation' / 'metadata' / '11.json').unlink()


def _corrupt_target(root):
    path = root / 'train' / 'gt' / '1' / '1_f5.6.JPG'
    path.write_bytes(path.read_bytes()[:300])


def _bad_json(root):
    (root / 'train' / 'metadata' / '2.json').write_text('{"target_avs": [4.0, ')


def _target_avs_missing(root):
    (root / 'train' / 'metadata' / '2.json').write_text('{"source_av": 22}')


def _drop_input(root):
    (root / 'validation' / 'in' / '10_f22.JPG').unlink()


def _wrong_size(root):
    (root / 'train' / 'gt' / '2' / '2_f20.JPG').write_bytes(jpeg_bytes(5, (64, 64)))


@pytest.mark.parametrize('damage, message', [
    (_drop_target, r'^\S*train/metadata/0.json: lists f/2.8 in target_avs but there is no '
                   r'\S*train/gt/0/0_f2.8.JPG$'),
    (_orphan_target, r'^\S*train/gt/7/7_f2.0.JPG: target of scene 7, which has no input photo '
                     r'in \S*train/in$'),
    (_drop_metadata, r'^\S*validation/in/11_f22.JPG: no metadata file '
                     r'\S*validation/metadata/11.json$'),
    (_corrupt_target, r'^\S*train/gt/1/1_f5.6.JPG: unreadable or truncated image'),
    (_bad_json, r'^\S*train/metadata/2.json: unreadable metadata file'),
    (_target_avs_missing, r'^\S*train/metadata/2.json: target_avs must be a non-empty list'),
    (_wrong_size, r'^\S*train/gt/2/2_f20.JPG: target is 64x64 but the input \S*2_f22.JPG is '
                  r'64x96$'),
    # The input gone: its metadata and its targets are named, one line each.
    (_drop_input, r'^2 problems in the RealBokeh folder:\n  \S*validation/metadata/10.json: '
                  r'scene 10 has no input photo \S*validation/in/10_f22.JPG\n  '
                  r'\S*validation/gt/10/10_f16.0.JPG: target of scene 10, which has no input'),
], ids=lambda v: getattr(v, '__name__', '')[1:])
def test_named_errors(tmp_path, damage, message):
    manual = make_folder(tmp_path / 'manual')
    damage(manual)
    with pytest.raises(realbokeh.BadInput) as error:
        build(manual, tmp_path / 'data')
    assert re.search(message, str(error.value)), str(error.value)


def test_prepare_turns_a_bad_folder_into_one_user_error(tmp_path):
    manual = make_folder(tmp_path / 'manual')
    _drop_target(manual)
    config = default.get_config('tiny')
    config.data.update(name='realbokeh', builder_config='rgb', data_dir=str(tmp_path / 'data'),
                       manual_dir=str(manual))
    with pytest.raises(UserError, match=r'0_f2.8.JPG \(config.data.manual_dir='):
        prepare.prepare_dataset(config.data)
    config.data.manual_dir = ''
    with pytest.raises(ValueError, match=r'(?s)manual_dir is empty: realbokeh.*RealBokeh_3MP'):
        prepare.prepare_dataset(config.data)


def test_not_reused_when_the_folder_or_the_weights_changed(tmp_path, rgbd, weights):
    manual = make_folder(tmp_path / 'manual')
    build(manual, tmp_path / 'data')
    build(manual, tmp_path / 'data')  # unchanged: reused
    (manual / 'train' / 'gt' / '0' / '0_f8.JPG').write_bytes(jpeg_bytes(123))
    with pytest.raises(realbokeh.StaleDataset, match=r'1 file\(s\) changed '
                                                     r'\(train/gt/0/0_f8.JPG\)'):
        build(manual, tmp_path / 'data')
    # rgbd: the depth maps depend on the weights file and the working size too.
    rgbd_manual, rgbd_data, _ = rgbd
    other = tmp_path / 'other.pth'
    other.write_bytes(weights.read_bytes())
    builder = tfds.builder('realbokeh', config='rgbd', data_dir=str(rgbd_data),
                           megadepth_weights=str(other), depth_working_size=WORKING_SIZE)
    with pytest.raises(realbokeh.StaleDataset, match=r'other.pth \(MegaDepth at 64x96\)'):
        builder.check_up_to_date(rgbd_manual)
    builder = tfds.builder('realbokeh', config='rgbd', data_dir=str(rgbd_data),
                           megadepth_weights=str(weights), depth_working_size='128x192')
    with pytest.raises(realbokeh.StaleDataset, match=r'MegaDepth at 128x192'):
        builder.check_up_to_date(rgbd_manual)


def test_tfds_build_command_loads_it_by_path(tmp_path):
    """tfds_ebb/build.py (TFDS's `build` without apache-beam) with the builder's folder; the
    module imports tfds_ebb and bokeh_jax as installed packages (PYTHONPATH: this checkout's)."""
    manual = make_folder(tmp_path / 'manual')
    subprocess.run([sys.executable, 'tfds_ebb/build.py', 'tfds_ebb/realbokeh',
                    f'--manual_dir={manual}', '--config=rgb', f'--data_dir={tmp_path / "data"}',
                    '--file_format=array_record'],
                   cwd=ROOT, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'PYTHONPATH': ROOT},
                   check=True, capture_output=True)
    builder = tfds.builder('realbokeh', config='rgb', data_dir=str(tmp_path / 'data'))
    assert builder.info.splits['train'].num_examples == 7


# ----------------------------------------------------------------------------- training

def test_two_training_steps_read_it_through_launch(rgbd, tmp_path):
    """On the prepared rgbd set (without config.data.manual_dir it is read as it is)."""
    _, data_dir, _ = rgbd
    workdir = tmp_path / 'run'
    launch('--mode=train', '--config=configs/default.py:tiny', f'--workdir={workdir}',
           '--config.data.name=realbokeh', f'--config.data.data_dir={data_dir}',
           '--config.data.eval_split=validation', '--config.data.crop_size=32',
           '--config.train.order=(7,)', '--config.train.level7.steps=2',
           '--config.eval.max_images=2', devices=2)
    params, meta = checkpoint.load_params(str(workdir))
    assert meta['level'] == 7 and meta['input_channels'] == 4
    with open(workdir / 'metrics.jsonl') as f:
        logged = [json.loads(line) for line in f]
    assert [(r['level'], r['step']) for r in logged if 'loss' in r] == [(7, 1), (7, 2)]
    assert [r['val_num_images'] for r in logged if 'val_num_images' in r] == [2]
