"""Exports (bokeh_jax/export.py): each artifact run by its own runtime against the Flax model."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bokeh_jax import checkpoint, export, image_io, image_ops
from bokeh_jax import model as model_lib
from tests import helpers

CHANNELS = 4
SIZE = (64, 96)  # model input of the TFLite files; the photo is 128 x 192
PHOTO = os.path.join(helpers.ROOT, 'tests', 'data', 'photos', 'chelsea.jpg')


def _workdir(root, input_channels: int) -> str:
    """A workdir with tiny level-1 params on disk, as training leaves them."""
    workdir = str(root / f'run{input_channels}')
    net = model_lib.PyNET(CHANNELS)
    params = model_lib.init_params(net, jax.random.key(input_channels), input_channels,
                                   scheme='he')
    checkpoint.save_params(workdir, 1, params,
                           {'channels': CHANNELS, 'input_channels': input_channels})
    return workdir


def _photo_and_depth() -> tuple[np.ndarray, np.ndarray]:
    """A real photo at 128 x 192 (uint8) and a depth map at half size (near = bright, 0..255)."""
    photo = np.round(np.clip(image_ops.resize(image_io.read_photo(PHOTO), (128, 192)), 0, 255))
    ramp = np.linspace(255, 0, 64)[:, None] * np.ones((1, 96))
    return photo.astype(np.uint8), np.round(ramp).astype(np.uint8)


# One jitted reference for all tests: each input shape compiles once.
_LEVEL1 = jax.jit(export.level1_forward(CHANNELS))


def _jax_level1(params, x: np.ndarray) -> np.ndarray:
    return np.asarray(_LEVEL1(params, x))


@pytest.fixture(scope='module')
def rgbd(tmp_path_factory):
    """(params, output folder) of a tiny RGB-D model exported in every format."""
    root = tmp_path_factory.mktemp('export')
    workdir = _workdir(root, 4)
    params, meta = checkpoint.load_params(workdir, 1)
    output = str(root / 'out')
    export.export(params, meta, output, formats=list(export.FILES), size=SIZE)
    return params, output


def _photo_input() -> np.ndarray:
    photo, depth = _photo_and_depth()
    return image_ops.make_model_input(photo, depth)[None]


def test_tflite_matches_jax_on_a_photo(rgbd):
    params, output = rgbd
    x = _photo_input()
    reference = _jax_level1(params, x)
    figures = {}
    for name in export.TFLITE_VARIANTS:
        interpreter = export.tflite_interpreter(os.path.join(output, export.FILES[name]))
        figures[name] = export.psnr_db(export.run_tflite(interpreter, x), reference)
    print('PSNR against JAX (dB):', {k: round(v, 1) for k, v in figures.items()})
    assert figures['tflite'] >= 60
    assert figures['tflite_fp16'] >= 45
    assert figures['tflite_int8'] >= 20  # reported, not a default format
    # Half the bytes: float16 weights really are stored.
    sizes = {n: os.path.getsize(os.path.join(output, export.FILES[n])) for n in ('tflite',
                                                                                 'tflite_fp16')}
    assert sizes['tflite_fp16'] < 0.6 * sizes['tflite']


def test_tflite_has_only_builtin_ops_at_the_fixed_size(rgbd):
    _, output = rgbd
    interpreter = export.tflite_interpreter(os.path.join(output, export.FILES['tflite']))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert list(inp['shape']) == [1, *SIZE, 4]
    assert list(out['shape']) == [1, 2 * SIZE[0], 2 * SIZE[1], 3]
    ops = {op['op_name'] for op in interpreter._get_ops_details()}
    assert not any(op.startswith('Flex') or op == 'CUSTOM' for op in ops), ops


def test_saved_model_serving_signature_takes_the_photo(rgbd):
    import tensorflow as tf

    params, output = rgbd
    loaded = tf.saved_model.load(os.path.join(output, export.FILES['saved_model']))
    photo, depth = _photo_and_depth()
    result = loaded.signatures['serving_default'](
        photo=tf.constant(photo[None]), depth=tf.constant(depth[None, ..., None]))
    reference = _jax_level1(params, _photo_input())
    figure = export.psnr_db(result['image_float'].numpy(), reference)
    print(f'SavedModel serving_default: {figure:.1f} dB against JAX')
    assert figure >= 60
    image = result['image'].numpy()
    assert image.dtype == np.uint8 and image.shape == (1, 128, 192, 3)
    expected = np.round(np.clip(reference, 0, 1) * 255)
    assert np.abs(image.astype(int) - expected).max() <= 1
    # Any size that is a multiple of 32 through the `model` signature, batch of two.
    x = np.random.default_rng(0).random((2, 32, 64, 4)).astype(np.float32)
    y = loaded.signatures['model'](model_input=tf.constant(x))['image'].numpy()
    assert export.psnr_db(y, _jax_level1(params, x)) >= 60


def test_jax_export_runs_without_the_model_code(rgbd, tmp_path):
    params, output = rgbd
    inputs = {'a': _photo_input(),
              'b': np.random.default_rng(1).random((2, 32, 64, 4)).astype(np.float32)}
    np.savez(tmp_path / 'inputs.npz', **inputs)
    script = textwrap.dedent(f"""
        import sys
        import jax, numpy as np
        from jax import export
        exported = export.deserialize(bytearray(open({os.path.join(output, export.FILES['jax_export'])!r}, 'rb').read()))
        inputs = np.load({str(tmp_path / 'inputs.npz')!r})
        np.savez({str(tmp_path / 'outputs.npz')!r}, **{{k: np.asarray(exported.call(inputs[k])) for k in inputs}})
        assert not [m for m in sys.modules if m.startswith('bokeh_jax') or m == 'flax'], 'imported'
    """)
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path,
                   env=helpers.launch_env())
    outputs = np.load(tmp_path / 'outputs.npz')
    for key, x in inputs.items():
        assert export.psnr_db(outputs[key], _jax_level1(params, x)) >= 60, key


def test_manifest_lists_every_file(rgbd):
    _, output = rgbd
    manifest = json.load(open(os.path.join(output, export.MANIFEST)))
    assert set(manifest['formats']) == set(export.FILES)
    for name, entry in manifest['formats'].items():
        assert os.path.exists(os.path.join(output, entry['path'])), name
        assert entry['bytes'] > 0
    assert manifest['formats']['tflite']['psnr_vs_jax_db'] >= 60
    assert manifest['model_input_size'] == list(SIZE)


def test_rgb_model_exports(tmp_path):
    import tensorflow as tf

    workdir = _workdir(tmp_path, 3)
    params, meta = checkpoint.load_params(workdir, 1)
    output = str(tmp_path / 'rgb')
    # The TFLite and jax.export writers do not depend on the channels; the serving signature does.
    manifest = export.export(params, meta, output, formats='saved_model', size=SIZE)
    assert all(e['psnr_vs_jax_db'] >= 60 for e in manifest['formats'].values()), manifest
    serve = tf.saved_model.load(os.path.join(output, 'saved_model')).signatures['serving_default']
    assert set(serve.structured_input_signature[1]) == {'photo'}
    photo, _ = _photo_and_depth()
    y = serve(photo=tf.constant(photo[None]))['image_float'].numpy()
    reference = _jax_level1(params, image_ops.make_model_input(photo, None)[None])
    assert export.psnr_db(y, reference) >= 60


def test_downscale_half_is_the_training_resize():
    x = np.random.default_rng(2).random((1, 64, 96, 3)).astype(np.float32)
    y = np.asarray(jax.jit(export.downscale_half)(x))
    np.testing.assert_allclose(y[0], image_ops.resize(x[0], (32, 48)), atol=1e-5)


def test_bad_requests_name_the_problem(tmp_path):
    with pytest.raises(export.ExportError, match="'onnx'"):
        export.parse_formats('tflite,onnx')
    with pytest.raises(export.ExportError, match='multiples of 32.*50x96'):
        export.check_size((50, 96))
    existing = tmp_path / 'out'
    existing.mkdir()
    (existing / 'keep.txt').write_text('mine')
    params = model_lib.init_params(model_lib.PyNET(CHANNELS), jax.random.key(0), 4)
    meta = {'channels': CHANNELS, 'input_channels': 4}
    with pytest.raises(export.ExportError, match='already exists.*--overwrite'):
        export.export(params, meta, str(existing), formats='jax_export', size=SIZE)
    assert (existing / 'keep.txt').read_text() == 'mine'
    export.export(params, meta, str(existing), formats='jax_export', size=SIZE, overwrite=True)
    assert sorted(os.listdir(existing)) == [export.MANIFEST, export.FILES['jax_export']]


def test_launch_without_trained_params(tmp_path):
    result = helpers.launch('--mode=export', f'--workdir={tmp_path / "empty"}',
                            f'--output={tmp_path / "out"}', check=False)
    assert result.returncode != 0
    assert 'export failed: No parameters for level 1' in result.stderr
    assert not (tmp_path / 'out').exists()
