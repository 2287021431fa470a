"""bokeh_jax.evaluate: `launch.py --mode=eval` end to end on real TFDS builds, and bad inputs.

Expected values are recomputed independently: photos decoded from the stored bytes with PIL,
metrics with TensorFlow's `tf.image.psnr / ssim / ssim_multiscale`, downscaling with
`tf.image.resize(bicubic, antialias=True)`, the model run unpadded-then-padded by hand.
"""

import csv
import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageFilter
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bokeh_jax import checkpoint
from bokeh_jax import classical
from bokeh_jax import dataset
from bokeh_jax import eval_protocol
from bokeh_jax import evaluate
from bokeh_jax import image_ops
from bokeh_jax import input_pipeline
from bokeh_jax import lpips
from bokeh_jax import model as model_lib
from bokeh_jax import reports
from configs import default
import helpers
from tfds_ebb import prepare

CHANNELS = 4
# Synthetic set: 3 validation scenes of 192 x 256, so that 2 devices see a padding entry, the
# full frame fits MS-SSIM (>= 161 px) and the pynet border crop (128 px left) does not.
SYNTHETIC = {'num_train': 1, 'num_validation': 3, 'height': 192, 'width': 256, 'seed': 3}
TILE = 48


def synthetic_overrides(data_dir) -> list[str]:
    return [f'--config.data.data_dir={data_dir}'] + [
        f'--config.data.synthetic.{k}={v}' for k, v in SYNTHETIC.items()]


def synthetic_config(data_dir, **eval_fields):
    config = default.get_config('tiny')
    config.data.data_dir = str(data_dir)
    config.data.synthetic.update(SYNTHETIC)
    config.eval.update(eval_fields)
    return config


def launch(*args):
    return helpers.launch(*args, check=False)


def evaluate_split(config, params, meta, split, **options):
    """(summary, rows) of evaluate.evaluate_split with the config's options, some replaced."""
    result = evaluate.evaluate_split(params, meta, config.data, split,
                                     evaluate.Options.from_config(config, **options))
    return result.summary, result.rows


def save_random_params(workdir, level: int = 1, seed: int = 0, **meta) -> dict:
    params = model_lib.init_params(model_lib.PyNET(CHANNELS), jax.random.key(seed), 4)
    checkpoint.save_params(str(workdir), level, params,
                           {'channels': CHANNELS, 'input_channels': 4, **meta})
    return params


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def tf_scores(prediction: np.ndarray, target: np.ndarray, border: int = 0) -> dict[str, float]:
    """TF's metrics of float [H, W, 3] images in [0, 1] after cutting `border`."""
    if border:
        prediction = prediction[border:-border, border:-border]
        target = target[border:-border, border:-border]
    x, y = tf.constant(prediction[None], tf.float32), tf.constant(target[None], tf.float32)
    out = {'psnr': float(tf.image.psnr(x, y, 1.0)[0]), 'ssim': float(tf.image.ssim(x, y, 1.0)[0])}
    if min(prediction.shape[:2]) >= 161:
        out['ms_ssim'] = float(tf.image.ssim_multiscale(x, y, 1.0)[0])
    return out


def tf_downscale(image: np.ndarray, size) -> np.ndarray:
    resized = tf.image.resize(image[None], size, method='bicubic', antialias=True)[0].numpy()
    return np.clip(resized, 0.0, 1.0)


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """A built synthetic_bokeh set, a workdir with random level-1 params, LPIPS weights."""
    root = tmp_path_factory.mktemp('eval_synthetic')
    prepare.prepare_dataset(synthetic_config(root / 'data').data)
    workdir = root / 'work'
    save_random_params(workdir, steps=7)
    rng = np.random.default_rng(0)
    arrays = {'net': np.array('alex')}
    for key, shape in lpips.expected_shapes('alex').items():
        scale = np.sqrt(2 / np.prod(shape[:-1])) if key.endswith('kernel') else 0.1
        arrays[key] = (np.abs if key.startswith('lin') else lambda v: v)(
            rng.standard_normal(shape) * scale).astype(np.float32)
    lpips_path = str(root / 'lpips_alex.npz')
    np.savez(lpips_path, **arrays)
    builder = tfds.builder_from_directory(
        str(dataset.dataset_builder(synthetic_config(root / 'data').data).data_dir))
    records = builder.as_data_source(
        'validation', decoders={k: tfds.decode.SkipDecoding() for k in ('sharp', 'bokeh', 'depth')})
    photos = [(r['id'].decode(), decode(r['sharp']), decode(r['bokeh'])) for r in records]
    return {'data': root / 'data', 'workdir': workdir, 'lpips': lpips_path, 'photos': photos}


@pytest.fixture(scope='module')
def full_run(synthetic):
    """`launch.py --mode=eval` with the full-frame protocol and LPIPS, once for several tests."""
    result = launch('--mode=eval', '--config=configs/default.py:tiny',
                    f'--workdir={synthetic["workdir"]}', *synthetic_overrides(synthetic['data']),
                    '--config.eval.protocol=full', f'--config.eval.grid_tile={TILE}',
                    f'--config.eval.lpips_weights={synthetic["lpips"]}')
    assert result.returncode == 0, result.stderr[-4000:]
    out = synthetic['workdir'] / 'eval' / 'validation_level1_full'
    with open(out / 'per_image.csv') as f:
        rows = list(csv.DictReader(f))
    with open(out / 'summary.json') as f:
        summary = json.load(f)
    return {'stdout': result.stdout, 'rows': rows, 'summary': summary, 'dir': out}


def test_launch_eval_writes_csv_summary_and_grid(synthetic, full_run):
    rows, summary = full_run['rows'], full_run['summary']
    # Every image once, in split order; the padding entry of the second step is not a row.
    assert [r['id'] for r in rows] == [name for name, _, _ in synthetic['photos']]
    assert all((r['height'], r['width'], r['level_height'], r['level_width'])
               == ('192', '256', '192', '256') for r in rows)
    assert {'split', 'level', 'protocol', 'border', 'num_images', 'checkpoint_level',
            'checkpoint_step', 'psnr', 'ssim', 'ms_ssim', 'lpips', 'baselines',
            'model_ahead_of', 'notes'} <= set(summary)
    assert (summary['split'], summary['level'], summary['protocol'], summary['border'],
            summary['num_images'], summary['checkpoint_level'], summary['checkpoint_step']) == (
                'validation', 1, 'full', 0, 3, 1, 7)
    for method, means in [('model', summary)] + list(summary['baselines'].items()):
        for name in ('psnr', 'ssim', 'ms_ssim', 'lpips'):
            column = [float(r[f'{method}_{name}']) for r in rows]
            assert np.isfinite(column).all()
            np.testing.assert_allclose(means[name], np.mean(column), rtol=1e-6)
    for name in ('psnr', 'ssim', 'ms_ssim'):
        for baseline in ('identity', 'classical'):
            np.testing.assert_allclose(summary['model_ahead_of'][baseline][name],
                                       summary[name] - summary['baselines'][baseline][name],
                                       rtol=1e-6)
    np.testing.assert_allclose(summary['model_ahead_of']['identity']['lpips'],
                               summary['baselines']['identity']['lpips'] - summary['lpips'],
                               rtol=1e-6)
    # A random model is far behind the photo itself, and the report says so.
    assert summary['model_ahead_of']['identity']['psnr'] < 0
    assert 'identity' in full_run['stdout'] and 'classical' in full_run['stdout']
    # Worst 2 and best 1 of 3 images; rows input / classical / output / target.
    with Image.open(full_run['dir'] / 'grid.png') as grid:
        width, height = grid.size
    assert height == 30 + 4 * (TILE + 4)
    assert width == 72 + 3 * (round(TILE * 128 / 96) + 4)


def test_identity_baseline_matches_tensorflow(synthetic, full_run):
    name, sharp, bokeh = synthetic['photos'][1]
    row = full_run['rows'][1]
    assert row['id'] == name
    sharp, bokeh = image_ops.to_float(sharp), image_ops.to_float(bokeh)
    expected = tf_scores(sharp, bokeh)
    assert set(expected) == {'psnr', 'ssim', 'ms_ssim'}
    for key, value in expected.items():
        np.testing.assert_allclose(float(row[f'identity_{key}']), value, atol=2e-4, rtol=1e-5)
    lpips_value = lpips.load_lpips(synthetic['lpips'])(sharp[None], bokeh[None])[0]
    np.testing.assert_allclose(float(row['identity_lpips']), lpips_value, rtol=1e-4)


def test_pynet_protocol_cuts_the_border(synthetic, full_run):
    config = synthetic_config(synthetic['data'], protocol='pynet')
    params, meta = checkpoint.load_params(str(synthetic['workdir']))
    summary, rows = evaluate_split(config, params, meta, 'validation', baselines=('identity',))
    assert summary['border'] == 32 and list(summary['baselines']) == ['identity']
    assert len(rows) == 3
    # 192 - 64 = 128 px left: MS-SSIM is undefined, reported absent with a note, never dropped.
    assert summary['ms_ssim'] is None and summary['baselines']['identity']['ms_ssim'] is None
    assert all(r['model_ms_ssim'] is None and r['identity_ms_ssim'] is None for r in rows)
    assert any('ms_ssim undefined for 3 of 3 images' in note for note in summary['notes'])
    assert 'lpips' not in summary and any('LPIPS not reported' in n for n in summary['notes'])
    for (name, sharp, bokeh), row, full in zip(synthetic['photos'], rows, full_run['rows']):
        assert row['id'] == name == full['id']
        expected = tf_scores(image_ops.to_float(sharp), image_ops.to_float(bokeh), border=32)
        np.testing.assert_allclose(row['identity_psnr'], expected['psnr'], atol=2e-4)
        np.testing.assert_allclose(row['identity_ssim'], expected['ssim'], atol=2e-4)
        for method in ('model', 'identity'):
            assert abs(row[f'{method}_psnr'] - float(full[f'{method}_psnr'])) > 1e-3
            assert abs(row[f'{method}_ssim'] - float(full[f'{method}_ssim'])) > 1e-4


def test_coarser_level_scores_the_downscaled_target(synthetic):
    config = synthetic_config(synthetic['data'], protocol='pynet')
    params, meta = checkpoint.load_params(str(synthetic['workdir']))
    summary, rows = evaluate_split(config, params, meta, 'validation', level=4, max_images=2,
                                   baselines=('identity',))
    # Level 4 of a 192 x 256 photo is 24 x 32; the 32-px border becomes 4 px.
    assert summary['level'] == 4 and summary['border'] == 4 and summary['num_images'] == 2
    assert [(r['level_height'], r['level_width']) for r in rows] == [(24, 32)] * 2
    for (name, sharp, bokeh), row in zip(synthetic['photos'], rows):
        expected = tf_scores(tf_downscale(image_ops.to_float(sharp), (24, 32)),
                             tf_downscale(image_ops.to_float(bokeh), (24, 32)), border=4)
        np.testing.assert_allclose(row['identity_psnr'], expected['psnr'], atol=1e-3)
        np.testing.assert_allclose(row['identity_ssim'], expected['ssim'], atol=5e-4)

    # The pure `evaluate`, pmapped by hand over the pipeline's first batch, gives the same.
    devices = jax.local_device_count()
    batch = next(input_pipeline.eval_iterator(config.data, 'validation',
                                              num_local_devices=devices))
    target = np.stack([[eval_protocol.to_level(t[0], (24, 32), 4)] for t in batch['target']])
    step = jax.pmap(lambda p, b, lp: eval_protocol.evaluate(
        p, b, lp, model=model_lib.PyNET(CHANNELS), level=4, size=(24, 32), border=4,
        names=('psnr', 'ssim')))
    replicated = jax.tree.map(lambda x: jnp.stack([x] * devices), params)
    scores, prediction = step(replicated, {'input': batch['input'], 'target': target},
                              jnp.zeros((devices,)))
    assert prediction.shape == (devices, 1, 24, 32, 3)
    for d in range(min(devices, 2)):
        np.testing.assert_allclose(scores['psnr'][d, 0], rows[d]['model_psnr'], rtol=1e-5)
        np.testing.assert_allclose(scores['ssim'][d, 0], rows[d]['model_ssim'], rtol=1e-5)


def write_ebb_folder(root) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny EBB! download: val294 ids with two photo widths, depth maps at half size."""
    rng = np.random.default_rng(5)
    photos = {}
    for name, (h, w) in {'4400': (128, 192), '4401': (128, 256), '4402': (128, 192)}.items():
        for folder in ('original', 'bokeh', 'original_depth'):
            os.makedirs(root / 'train' / folder, exist_ok=True)
        coarse = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        sharp = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        sharp.save(root / 'train' / 'original' / f'{name}.jpg', quality=95)
        sharp.filter(ImageFilter.GaussianBlur(3)).save(
            root / 'train' / 'bokeh' / f'{name}.jpg', quality=95)
        depth = rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8)
        Image.fromarray(depth).save(root / 'train' / 'original_depth' / f'{name}.png')
        photos[name] = (decode((root / 'train' / 'original' / f'{name}.jpg').read_bytes()),
                        decode((root / 'train' / 'bokeh' / f'{name}.jpg').read_bytes()))
    return photos


def test_images_of_different_sizes_are_each_scored_at_their_own_size(tmp_path):
    photos = write_ebb_folder(tmp_path / 'ebb')
    config = default.get_config()
    config.model.channels = CHANNELS
    config.data.data_dir = str(tmp_path / 'data')
    config.data.manual_dir = str(tmp_path / 'ebb')
    config.data.num_workers = 0
    config.eval.protocol = 'full'
    config.eval.baselines = ('identity',)
    prepare.prepare_dataset(config.data)
    params = save_random_params(tmp_path / 'work', seed=1)
    summary, rows = evaluate_split(config, params, {'channels': CHANNELS, 'input_channels': 4},
                                   'val294')
    assert [(r['id'], r['width'], r['level_width']) for r in rows] == [
        ('4400', 192, 192), ('4401', 256, 256), ('4402', 192, 192)]
    # The split is padded to the widest image (input 64 x 128); narrower ones are scored on
    # their own 128 x 192, computed here by running the model on the reflect-padded input.
    forward = jax.jit(lambda x: model_lib.PyNET(CHANNELS).apply({'params': params}, x, level=1))
    for row in rows:
        sharp, bokeh = photos[row['id']]
        depth = decode((tmp_path / 'ebb' / 'train' / 'original_depth' /
                        f'{row["id"]}.png').read_bytes())
        x = image_ops.make_model_input(sharp, depth)
        padded = np.pad(x, ((0, 64 - x.shape[0]), (0, 128 - x.shape[1]), (0, 0)), mode='reflect')
        output = forward(padded[None])[1][0]
        output = np.clip(np.asarray(output), 0, 1)[:128, :row['width']]
        expected = tf_scores(output, image_ops.to_float(bokeh))
        np.testing.assert_allclose(row['model_psnr'], expected['psnr'], atol=1e-3)
        np.testing.assert_allclose(row['model_ssim'], expected['ssim'], atol=1e-4)
        identity = tf_scores(image_ops.to_float(sharp), image_ops.to_float(bokeh))
        np.testing.assert_allclose(row['identity_psnr'], identity['psnr'], atol=2e-4)
    assert summary['num_images'] == 3 and summary['split'] == 'val294'
    assert 'per_fnumber' not in summary and 'fnumber' not in rows[0]  # ebb has no f-numbers


def test_records_with_fnumbers_are_also_scored_per_fnumber(tmp_path, capsys):
    """An unconditioned model on a set at f/2 and f/4: the table and summary.json have each
    f-number's means (model and baselines), over exactly that f-number's rows of per_image.csv;
    the classical baseline renders at the record's f-number and focal plane."""
    config = default.get_config('tiny')
    config.data.data_dir = str(tmp_path / 'data')
    config.data.synthetic.update({'num_train': 1, 'num_validation': 5, 'height': 64,
                                  'width': 128, 'seed': 2, 'fnumbers': (2.0, 4.0)})
    config.eval.update({'protocol': 'full', 'baselines': ('identity', 'classical'), 'grid_images': 0,
                        'max_images': 0})
    prepare.prepare_dataset(config.data)
    save_random_params(tmp_path / 'work')
    summary = evaluate.run(config, str(tmp_path / 'work'))
    printed = capsys.readouterr().out
    out = tmp_path / 'work' / 'eval' / 'validation_level1_full'
    with open(out / 'per_image.csv') as f:
        rows = list(csv.DictReader(f))
    with open(out / 'summary.json') as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    groups = summary['per_fnumber']
    assert list(groups) == ['f/2', 'f/4']
    assert sum(g['num_images'] for g in groups.values()) == summary['num_images'] == 5
    for key, group in groups.items():
        mine = [r for r in rows if float(r['fnumber']) == group['fnumber']]
        assert f'f/{float(mine[0]["fnumber"]):g}' == key and group['num_images'] == len(mine)
        for name in ('psnr', 'ssim'):
            np.testing.assert_allclose(group[name],
                                       np.mean([float(r[f'model_{name}']) for r in mine]))
            identity = np.mean([float(r[f'identity_{name}']) for r in mine])
            np.testing.assert_allclose(group['baselines']['identity'][name], identity)
            np.testing.assert_allclose(group['model_ahead_of']['identity'][name],
                                       group[name] - identity)
        assert re.search(rf'^{key} +identity +\d', printed, re.M), printed
    # At f/4 the target is nearer the photo itself (at f/16 here the blur is under a pixel).
    assert (groups['f/4']['baselines']['identity']['psnr']
            > groups['f/2']['baselines']['identity']['psnr'] + 3)
    assert 'per f-number (2):' in printed
    # The classical baseline renders at each record's f-number and focal plane.
    source = dataset.source(config.data, 'validation')
    for i, row in enumerate(rows):
        record = source[i]
        sharp = image_ops.to_float(decode(record['sharp']))
        rendered = classical.render_bokeh(sharp, decode(record['depth']),
                                          strength=0.06 * 2 / float(record['fnumber']),
                                          focus=float(record['focus_disparity']))
        expected = tf_scores(rendered, image_ops.to_float(decode(record['bokeh'])))
        np.testing.assert_allclose(float(row['classical_psnr']), expected['psnr'], atol=2e-3)


def test_no_params_fails_through_launch(synthetic, tmp_path):
    result = launch('--mode=eval', '--config=configs/default.py:tiny', f'--workdir={tmp_path}',
                    *synthetic_overrides(synthetic['data']))
    assert result.returncode != 0
    assert 'No trained parameters' in result.stderr and str(tmp_path) in result.stderr


@pytest.mark.parametrize('fields, error, message', [
    ({'protocol': 'nope'}, ValueError, "config.eval.protocol must be one of .* got 'nope'"),
    ({'level': 8}, ValueError, 'config.eval.level must be one of the paper levels'),
    ({'params_level': 2}, FileNotFoundError, r'No parameters for level 2 at .*level_2'),
    ({'baselines': ('identity', 'oracle')}, ValueError, r"unknown baseline\(s\) \['oracle'\]"),
    ({'lpips_weights': '/nonexistent/lpips.npz'}, FileNotFoundError,
     'LPIPS weights file not found: /nonexistent/lpips.npz'),
])
def test_bad_eval_config_fails_clearly(synthetic, fields, error, message):
    with pytest.raises(error, match=message):
        evaluate.run(synthetic_config(synthetic['data'], **fields), str(synthetic['workdir']))


def test_missing_split_fails_clearly(synthetic):
    config = synthetic_config(synthetic['data'])
    config.data.eval_split = 'val294'
    with pytest.raises(ValueError, match=r"split 'val294' not in synthetic_bokeh"):
        evaluate.run(config, str(synthetic['workdir']))


def test_mismatched_params_fail_clearly(synthetic, tmp_path):
    save_random_params(tmp_path, level=3)
    with pytest.raises(ValueError, match='trained down to level 3 only'):
        evaluate.run(synthetic_config(synthetic['data']), str(tmp_path))
    config = synthetic_config(synthetic['data'])
    config.data.builder_config = 'rgb'
    params, meta = checkpoint.load_params(str(synthetic['workdir']))
    with pytest.raises(ValueError, match="take 4 input channels, but config.data.builder_config="
                                         "'rgb' gives 3"):
        evaluate_split(config, params, meta, 'validation')


def test_multi_process_gathers_concatenate_in_process_order(monkeypatch):
    # Two processes simulated: the second holds this one's positive values plus one, so
    # 'a' becomes 'b', size 24 becomes 25, PSNR 10 becomes 11; zeros, -1 and NaN stay.
    def allgather(tree):
        return jax.tree.map(
            lambda x: np.stack([np.asarray(x), np.where(np.asarray(x) > 0, x + 1, x)]), tree)

    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(evaluate.multihost_utils, 'process_allgather', allgather)
    assert evaluate._gather_strings(['a', 'ab', '']) == ['a', 'ab', '', 'b', 'bc', '']
    assert evaluate._step_sizes([(24, 32), evaluate._INVALID]) == [(24, 32), (25, 33)]
    extremes = reports.Extremes(1)
    extremes.add(10.0, 'x', np.full((1, 2, 2, 3), 7, np.uint8))
    merged = evaluate._gather_extremes(extremes, (1, 2, 2, 3))
    assert [(value, name) for value, name, _ in merged.items] == [(10.0, 'x'), (11.0, 'y')]
    assert merged.items[0][2].max() == 7 and merged.items[1][2].max() == 8
