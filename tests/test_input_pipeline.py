"""Tests of bokeh_jax/image_ops.py, dataset.py and input_pipeline.py on a real (tiny) TFDS build."""

import io
import pathlib
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from bokeh_jax import classical
from bokeh_jax import dataset
from bokeh_jax.errors import UserError
from bokeh_jax import image_ops
from bokeh_jax import input_pipeline
from bokeh_jax.bench import pipeline as pipeline_bench
from configs import default
from tfds_ebb import prepare

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- image_ops

@pytest.mark.parametrize('size', [(18, 26), (9, 13), (37, 53), (50, 80), (20, 90)])
def test_resize_matches_tensorflow_antialiased_bicubic(size):
    import tensorflow as tf  # the reference only; the library never imports TF
    image = np.random.default_rng(0).random((37, 53, 3), dtype=np.float32)
    expected = tf.image.resize(image, size, method='bicubic', antialias=True).numpy()
    np.testing.assert_allclose(image_ops.resize(image, size), expected, atol=2e-5)


def test_resize_region_equals_cropping_the_whole_resize():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)
    half = image_ops.half_size(128, 192)
    whole = image_ops.resize(photo, half)
    for top, left, h, w in [(10, 20, 32, 32), (0, 0, 32, 32), (32, 64, 32, 32),
                            (0, 50, 64, 46), (31, 1, 33, 95)]:  # interior and every border
        region = image_ops.resize_region(photo, half, (top, left, h, w))
        np.testing.assert_allclose(region, whole[top:top + h, left:left + w], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match='outside the output size'):
        image_ops.resize_region(photo, half, (40, 0, 32, 32))


def test_level_output_size():
    assert [image_ops.level_output_size(512, k) for k in range(1, 8)] == [
        1024, 512, 256, 128, 64, 32, 16]
    assert image_ops.level_output_size(64, 7) == 2
    with pytest.raises(ValueError, match='multiple of 32'):
        image_ops.level_output_size(100, 1)
    with pytest.raises(ValueError, match='level must be in 1..7'):
        image_ops.level_output_size(64, 8)


def test_make_model_input_and_depth():
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    depth = rng.integers(0, 256, (32, 48), dtype=np.uint8)
    x = image_ops.make_model_input(photo, depth)
    assert x.shape == (32, 48, 4) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x[..., 3], depth / 255, atol=1e-6)
    np.testing.assert_allclose(x[..., :3], np.clip(image_ops.resize(photo / 255, (32, 48)), 0, 1),
                               atol=1e-6)
    assert image_ops.make_model_input(photo, None).shape == (32, 48, 3)
    off_by_one = image_ops.make_model_input(photo, depth[:31, :47])  # resized to 32x48
    assert off_by_one.shape == (32, 48, 4)
    with pytest.raises(ValueError, match='depth height must be half the photo height'):
        image_ops.make_model_input(photo, depth[:29])


def test_normalize_depth():
    metric = np.linspace(1, 10, 40 * 60, dtype=np.float32).reshape(40, 60)  # far = large
    out = image_ops.normalize_depth(metric, (64, 96), far_is_bright=True)
    assert out.shape == (32, 48) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert out[0, 0] == 255 and out[-1, -1] == 0  # near = bright
    assert np.all(image_ops.normalize_depth(np.ones((5, 5)), (64, 96)) == 0)
    with pytest.raises(ValueError, match='NaN'):
        image_ops.normalize_depth(np.full((4, 4), np.nan), (8, 8))


def test_pad_to_shape_reflects():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    padded = image_ops.pad_to_shape(x, 5, 6)
    assert padded.shape == (5, 6)
    np.testing.assert_array_equal(padded[3, :4], x[1])  # row 3 mirrors row 1 about row 2
    np.testing.assert_array_equal(padded[:3, 4], x[:, 2])
    np.testing.assert_array_equal(padded[:3, 5], x[:, 1])


# ----------------------------------------------------------------------------- pipeline

def tiny_config(data_dir, **data):
    config = default.get_config('tiny')
    config.data.data_dir = str(data_dir)
    config.data.synthetic.update({'num_train': 5, 'num_validation': 3})
    config.data.update(data)
    return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A tiny synthetic_bokeh (rgbd and rgb) built once for this module: 5 + 3 scenes, 128x192."""
    path = tmp_path_factory.mktemp('tfds')
    for builder_config in ('rgbd', 'rgb'):
        prepare.prepare_dataset(tiny_config(path, builder_config=builder_config).data)
    return path


def take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def train_batches(config, level=1, start=0, n=3, **kwargs):
    kwargs = {'batch_size': 4, 'num_local_devices': 2} | kwargs
    return take(input_pipeline.train_iterator(config.data, config.seed, level, start, **kwargs),
                n)


@pytest.mark.parametrize('level', range(1, 8))
def test_train_batch_shapes_and_ranges_per_level(data_dir, level):
    (batch,) = train_batches(tiny_config(data_dir), level, n=1)
    size = 128 // 2 ** (level - 1)
    assert batch['input'].shape == (2, 2, 64, 64, 4)
    assert batch['target'].shape == (2, 2, size, size, 3)
    for x in batch.values():
        assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        assert x.std() > 0.01  # real content, not padding


def test_rgb_config_has_three_channels(data_dir):
    (batch,) = train_batches(tiny_config(data_dir, builder_config='rgb'), 3, n=1)
    assert batch['input'].shape == (2, 2, 64, 64, 3)


def test_train_is_deterministic_and_resumable(data_dir):
    config = tiny_config(data_dir)
    first = train_batches(config, 2, n=4)
    again = train_batches(config, 2, n=4)
    resumed = train_batches(config, 2, start=2, n=2)  # as after an interruption at step 2
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a['input'], b['input'])
    for a, b in zip(first[2:], resumed):
        np.testing.assert_array_equal(a['target'], b['target'])
    assert not np.array_equal(first[0]['input'], first[1]['input'])
    other = tiny_config(data_dir)
    other.seed = 1
    assert not np.array_equal(train_batches(other, 2, n=1)[0]['input'], first[0]['input'])


def test_process_shards_are_disjoint_slices_of_the_global_batch(data_dir):
    config = tiny_config(data_dir)
    whole = train_batches(config, 4, n=2, num_local_devices=4)  # 1 process x 4 devices
    parts = [train_batches(config, 4, n=2, num_local_devices=1, process_index=p, process_count=4)
             for p in range(4)]  # 4 processes x 1 device
    for step in range(2):
        for key in ('input', 'target'):
            joined = np.concatenate([part[step][key] for part in parts], axis=0)
            np.testing.assert_array_equal(joined, whole[step][key])
    # 8 global examples per 2 steps: every process saw different crops.
    flat = np.concatenate([p[0]['input'].reshape(1, -1) for p in parts])
    assert len({row.tobytes() for row in flat}) == 4


def test_grain_workers_give_the_same_batches(data_dir):
    config = tiny_config(data_dir)
    expected = train_batches(config, 3, n=3)
    workers = tiny_config(data_dir, num_workers=2)
    for a, b in zip(expected, train_batches(workers, 3, n=3)):
        np.testing.assert_array_equal(a['input'], b['input'])


def test_decoded_record_cache_changes_no_bit_and_stays_within_its_bound(data_dir):
    config = tiny_config(data_dir)
    expected = train_batches(config, 2, n=6)  # 24 examples: several visits of each of 5 records
    cached = tiny_config(data_dir, cache_mb=64)
    for a, b in zip(expected, train_batches(cached, 2, n=6)):
        for key in ('input', 'target'):
            np.testing.assert_array_equal(a[key], b[key])
    # A bound of two and a half records: the least recently used are evicted, nothing changes.
    source = dataset.source(config.data, 'train')
    plain = input_pipeline._TrainExample(source, 0, 2, 64, True)
    one = input_pipeline._Prepared(input_pipeline._Decoded(source[0], True)).nbytes
    small = input_pipeline._TrainExample(source, 0, 2, 64, True, cache_bytes=int(2.5 * one))
    for index in range(15):
        got = small(index)
        for key, value in plain(index).items():
            np.testing.assert_array_equal(got[key], value)
        assert len(small._cache) <= 2 and small._cache.nbytes <= small.cache_bytes
    assert len(small._cache) == 2
    assert len(pickle.loads(pickle.dumps(small))._cache) == 0  # workers start empty


def test_epochs_are_seeded_permutations(data_dir):
    config = tiny_config(data_dir)
    source = dataset.source(config.data, 'train')
    make = input_pipeline._TrainExample(source, 0, 3, 64, True)
    orders = [make.permutation(e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(5))
    assert len({tuple(o) for o in orders}) > 1


def _record(config, split, index):
    return dataset.source(config.data, split)[index]


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def test_training_crop_matches_the_whole_image_recipe(data_dir):
    """Input = crop of make_model_input(whole photo); target = resized matching bokeh crop."""
    config = tiny_config(data_dir)
    record = _record(config, 'train', 2)
    seed = np.random.SeedSequence(7)
    example = input_pipeline.crop_example(record, np.random.default_rng(seed), 64, 3, True)
    rng = np.random.default_rng(seed)  # replays the draws: top, left, turns, flip
    top, left = int(rng.integers(0, 64 - 64 + 1)), int(rng.integers(0, 96 - 64 + 1))
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    photo, bokeh = _decode(record['sharp']), _decode(record['bokeh'])
    whole = image_ops.make_model_input(photo, _decode(record['depth']))
    expected_input = whole[top:top + 64, left:left + 64]
    crop = bokeh[2 * top:2 * top + 128, 2 * left:2 * left + 128] / 255
    expected_target = np.clip(image_ops.resize(crop, (32, 32)), 0, 1)  # level 3: 2c / 4
    augment = lambda x: np.rot90(x, turns)[::-1] if flip else np.rot90(x, turns)
    np.testing.assert_allclose(example['input'], augment(expected_input), atol=1e-5)
    np.testing.assert_allclose(example['target'], augment(expected_target), atol=1e-5)


def test_batch_size_must_divide(data_dir):
    with pytest.raises(ValueError, match=r'config.train.level1.batch_size.*2 x 2'):
        input_pipeline.train_iterator(tiny_config(data_dir).data, 0, 1, 0, batch_size=6,
                                      num_local_devices=2, process_count=2)


def test_too_large_crop_names_the_field(data_dir):
    config = tiny_config(data_dir, crop_size=96)
    with pytest.raises(ValueError, match='config.data.crop_size=96'):
        train_batches(config, 1, n=1)


def test_eval_covers_the_split_once_in_order_with_equal_steps(data_dir):
    config = tiny_config(data_dir)
    per_process = [list(input_pipeline.eval_iterator(config.data, 'validation',
                                                     num_local_devices=1, process_index=p,
                                                     process_count=2))
                   for p in range(2)]
    assert [len(batches) for batches in per_process] == [2, 2]  # 3 images, padded to 4
    ids = [b['id'][0, 0] for batches in per_process for b in batches if b['valid'][0, 0]]
    assert ids == ['validation_00000', 'validation_00001', 'validation_00002']
    assert [b['valid'][0, 0] for b in per_process[1]] == [True, False]
    first = per_process[0][0]
    assert first['input'].shape == (1, 1, 64, 96, 4)
    assert first['target'].shape == (1, 1, 128, 192, 3)
    assert (first['height'][0, 0], first['width'][0, 0]) == (128, 192)
    record = _record(config, 'validation', 0)
    expected = image_ops.make_model_input(_decode(record['sharp']), _decode(record['depth']))
    np.testing.assert_allclose(first['input'][0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(first['target'][0, 0], _decode(record['bokeh']) / 255, atol=1e-6)


def _write_ebb(root: pathlib.Path, sizes: dict[str, tuple[int, int]]) -> None:
    """An EBB! folder (AIM 2020 layout) with one random pair of the given size per id."""
    rng = np.random.default_rng(3)
    for sub in ('original', 'bokeh', 'original_depth'):
        (root / 'Training' / sub).mkdir(parents=True, exist_ok=True)
    for stem, (h, w) in sizes.items():
        for sub in ('original', 'bokeh'):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / 'Training' / sub / f'{stem}.jpg', quality=90)
        Image.fromarray(rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8)).save(
            root / 'Training' / 'original_depth' / f'{stem}.png')


def test_eval_pads_mixed_sizes_by_reflection_to_one_shape(tmp_path):
    _write_ebb(tmp_path / 'manual', {'0': (128, 128), '4400': (70, 100), '4401': (64, 160)})
    config = default.get_config()
    config.data.update({'data_dir': str(tmp_path / 'data'), 'manual_dir': str(tmp_path / 'manual'),
                        'num_workers': 0})
    prepare.prepare_dataset(config.data)
    batches = list(input_pipeline.eval_iterator(config.data, 'val294', num_local_devices=2))
    (batch,) = batches  # the split's largest half size is 35x80 -> every image padded to 64x96
    assert batch['input'].shape == (2, 1, 64, 96, 4)
    assert batch['target'].shape == (2, 1, 128, 192, 3)
    assert batch['id'][:, 0].tolist() == ['4400', '4401']
    assert batch['height'][:, 0].tolist() == [70, 64]
    assert batch['width'][:, 0].tolist() == [100, 160]
    record = _record(config, 'val294', 0)
    unpadded = image_ops.make_model_input(_decode(record['sharp']), _decode(record['depth']))
    assert unpadded.shape == (35, 50, 4)
    expected = np.pad(unpadded, ((0, 29), (0, 46), (0, 0)), mode='reflect')
    np.testing.assert_allclose(batch['input'][0, 0], expected, atol=1e-6)
    bokeh = _decode(record['bokeh'])[:70, :100] / 255
    np.testing.assert_allclose(batch['target'][0, 0],
                               np.pad(bokeh, ((0, 58), (0, 92), (0, 0)), mode='reflect'), atol=1e-6)


# ----------------------------------------------------------------------------- control maps

CONTROL = {'fnumbers': (2.0, 4.0, 16.0), 'focus': 'random', 'seed': 5}


@pytest.fixture(scope='module')
def control_dir(tmp_path_factory):
    """A tiny synthetic_bokeh (rgbd) at three f-numbers with random focal planes."""
    path = tmp_path_factory.mktemp('tfds_control')
    config = tiny_config(path)
    config.data.synthetic.update(CONTROL)
    prepare.prepare_dataset(config.data)
    return path


def _control_config(control_dir, **data):
    config = tiny_config(control_dir, **data)
    config.data.synthetic.update(CONTROL)
    return config


def _controls(config, split):
    """[(fnumber, focus_disparity)] of the split's records, in order."""
    source = dataset.source(config.data, split)
    return [(float(source[i]['fnumber']), float(source[i]['focus_disparity']))
            for i in range(len(source))]


def test_conditioned_train_batches_end_with_the_records_control_maps(control_dir):
    config = _control_config(control_dir)
    plain = train_batches(config)
    focused = train_batches(config, condition='aperture_focus')
    aperture = train_batches(config, condition='aperture')
    cached = train_batches(_control_config(control_dir, cache_mb=64), condition='aperture_focus')
    records = _controls(config, 'train')
    assert len({n for n, _ in records}) >= 2  # the set mixes f-numbers
    for p, f, a, c in zip(plain, focused, aperture, cached):
        assert f['input'].shape == (2, 2, 64, 64, 6) and a['input'].shape == (2, 2, 64, 64, 5)
        np.testing.assert_array_equal(f['input'][..., :4], p['input'])
        np.testing.assert_array_equal(a['input'], f['input'][..., :5])
        np.testing.assert_array_equal(c['input'], f['input'])
        np.testing.assert_array_equal(f['target'], p['target'])
        for x in f['input'].reshape(-1, 64, 64, 6):
            s = x[0, 0, 4]
            np.testing.assert_array_equal(x[..., 4], s)  # s = 2/N everywhere
            focus = x[0, 0, 3] - x[0, 0, 5] / s
            np.testing.assert_allclose(x[..., 5], s * (x[..., 3] - focus), atol=1e-6)
            assert any(abs(s - 2 / n) < 1e-6 and abs(focus - d) < 1e-5 for n, d in records), (
                s, focus, records)


def test_conditioned_eval_batches_carry_fnumber_and_control_maps(control_dir):
    config = _control_config(control_dir)
    records = _controls(config, 'validation')
    plain = list(input_pipeline.eval_iterator(config.data, 'validation', num_local_devices=2))
    batches = list(input_pipeline.eval_iterator(config.data, 'validation', num_local_devices=2,
                                                condition='aperture_focus'))
    assert len(batches) == 2  # 3 images and a padding entry
    fnumbers = [b['fnumber'][d, 0] for b in batches for d in range(2)]
    assert fnumbers[:3] == [n for n, _ in records] and np.isnan(fnumbers[3])
    assert [b['fnumber'][d, 0] for b in plain for d in range(2)][:3] == fnumbers[:3]
    for i, (fnumber, focus) in enumerate(records):
        x = batches[i // 2]['input'][i % 2, 0]
        assert x.shape == (64, 96, 6)
        np.testing.assert_array_equal(x[..., :4], plain[i // 2]['input'][i % 2, 0])
        np.testing.assert_allclose(x[..., 4], 2 / fnumber, rtol=1e-6)
        np.testing.assert_allclose(x[..., 5], 2 / fnumber * (x[..., 3] - focus), atol=1e-6)
    np.testing.assert_array_equal(batches[1]['input'][1, 0], 0)


def test_conditioning_needs_fnumbers_and_focuses_automatically_without_a_plane(tmp_path):
    """ebb has no f-number: a conditioned pipeline names the data set. A record with an f-number
    but no focal plane (realbokeh) focuses where classical.auto_focus puts it."""
    _write_ebb(tmp_path / 'manual', {'0': (128, 128), '4400': (70, 100), '4401': (64, 160)})
    config = default.get_config()
    config.data.update({'data_dir': str(tmp_path / 'data'), 'manual_dir': str(tmp_path / 'manual'),
                        'num_workers': 0, 'crop_size': 32})
    prepare.prepare_dataset(config.data)
    with pytest.raises(UserError, match=r"condition='aperture' needs records with an f-number, "
                                        r'but ebb/rgbd has none'):
        input_pipeline.eval_iterator(config.data, 'val294', num_local_devices=1,
                                     condition='aperture')
    with pytest.raises(UserError, match='ebb/rgbd has none'):
        input_pipeline.train_iterator(config.data, 0, 1, 0, batch_size=1, num_local_devices=1,
                                      condition='aperture_focus')
    record = {**_record(config, 'val294', 0), 'fnumber': np.float32(4.0)}
    make = input_pipeline._EvalExample([record], 0, 1, (64, 96), 4, condition='aperture_focus',
                                       with_fnumber=True)
    example = make(0)
    x = example['input'][:35, :50]  # the image; the rest is padding
    focus = classical.auto_focus(x[..., 3])
    assert example['fnumber'] == 4.0
    np.testing.assert_allclose(x[..., 4], 0.5)
    np.testing.assert_allclose(x[..., 5], 0.5 * (x[..., 3] - focus), atol=1e-6)


def test_prepare_regenerates_a_stale_synthetic_set(tmp_path):
    config = tiny_config(tmp_path, builder_config='rgb')
    config.data.synthetic.update({'num_train': 1, 'num_validation': 1})
    prepare.prepare_dataset(config.data)
    config.data.synthetic.update({'num_validation': 2, 'height': 64})
    prepare.prepare_dataset(config.data)  # other settings than on disk: regenerated
    builder = dataset.dataset_builder(config.data)
    assert builder.info.metadata['height'] == 64
    assert builder.info.splits['validation'].num_examples == 2
    (batch,) = list(input_pipeline.eval_iterator(config.data, 'validation', num_local_devices=2))
    assert batch['input'].shape == (2, 1, 32, 96, 3)
    config.data.synthetic.update({'fnumbers': (2.8, 8.0), 'focus': 'random'})
    prepare.prepare_dataset(config.data)  # other f-numbers: regenerated
    metadata = dataset.dataset_builder(config.data).info.metadata
    assert (metadata['fnumbers'], metadata['focus']) == ([2.8, 8.0], 'random')
    (batch,) = list(input_pipeline.eval_iterator(config.data, 'validation', num_local_devices=2))
    assert set(batch['fnumber'][:, 0].tolist()) <= {np.float32(2.8), 8.0}
    assert not dataset.synthetic_differs(config.data, metadata)  # read back equal: kept


def test_concurrent_prepare_builds_once(tmp_path):
    """Processes of one job (same machine) preparing at once: one builds, the others wait."""
    script = f'''
import sys
sys.path.insert(0, {str(REPO)!r})
from configs import default
from bokeh_jax import dataset
from tfds_ebb import prepare
config = default.get_config('tiny')
config.data.data_dir = {str(tmp_path)!r}
config.data.synthetic.update({{'num_train': 2, 'num_validation': 1}})
prepare.prepare_dataset(config.data)
print('SPLITS', dataset.dataset_builder(config.data).info.splits['train'].num_examples)
'''
    runs = [subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and 'SPLITS 2' in out, err[-3000:]
    assert len(list(tmp_path.glob('synthetic_bokeh/rgbd/*/dataset_info.json'))) == 1


def test_prepare_ebb_without_manual_dir_explains(tmp_path):
    config = default.get_config()
    config.data.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r'manual_dir is empty(.|\n)*Training/original'):
        prepare.prepare_dataset(config.data)


def test_pipeline_does_not_import_tensorflow(data_dir):
    script = f'''
import sys
sys.path.insert(0, {str(REPO)!r})
from configs import default
from bokeh_jax import input_pipeline
from tfds_ebb import prepare
config = default.get_config('tiny')
config.data.data_dir = {str(data_dir)!r}
config.data.synthetic.update({{'num_train': 5, 'num_validation': 3}})
prepare.prepare_dataset(config.data)
it = input_pipeline.train_iterator(config.data, config.seed, 1, 0, batch_size=2,
                                   num_local_devices=1)
next(it)
next(input_pipeline.eval_iterator(config.data, 'validation', num_local_devices=1))
loaded = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))
print('TF_MODULES', loaded)
'''
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            check=True)
    assert 'TF_MODULES []' in result.stdout, result.stdout + result.stderr


def test_benchmark_reports_throughput(data_dir):
    result = pipeline_bench.pipeline_speed(tiny_config(data_dir), 3, 2)
    assert result['examples_per_sec'] > 0 and result['batch_size'] == 2
