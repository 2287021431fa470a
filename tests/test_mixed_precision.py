"""config.model.dtype='bfloat16': bfloat16 convolutions, float32 parameters, optimizer state,
losses and instance-norm statistics, and a loss that falls like float32's; on CPU with oneDNN,
a render within 50 dB of the float32 one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bokeh_jax import input_pipeline, onednn, render, train
from bokeh_jax import model as model_lib
from bokeh_jax.training import multihost
from bokeh_jax.training import optimizer as optimizer_lib
from configs import default
from tfds_ebb import prepare

LEVEL, STEPS = 6, 20


@pytest.fixture(scope='module')
def config(tmp_path_factory):
    config = default.get_config('tiny')
    config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
    config.train[f'level{LEVEL}'].learning_rate = 3e-3
    prepare.prepare_dataset(config.data)
    return config


def _train(config, dtype: str):
    model = model_lib.PyNET(4, dtype=jnp.dtype(dtype))
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    tx = optimizer_lib.make_optimizer(config, LEVEL)
    state = multihost.replicate(
        train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params)))
    step = jax.pmap(train.make_train_step(model, LEVEL, {'mae': 100.0}, tx), axis_name=train.AXIS)
    batches = input_pipeline.train_iterator(config.data, config.seed, LEVEL, 0, batch_size=2,
                                            num_local_devices=jax.local_device_count())
    batch = next(batches)  # one batch again and again: a falling curve without sampling noise
    batches.close()
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch, {})
        assert metrics['loss'].dtype == jnp.float32
        losses.append(float(metrics['loss'][0]))
    return state, np.array(losses)


def test_bfloat16_convolutions_with_float32_state_and_losses(config):
    model = model_lib.PyNET(4, dtype=jnp.bfloat16)
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    x = jnp.zeros((1, 64, 64, 4), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, x, level=LEVEL))(params))
    convs = [line for line in jaxpr.splitlines() if 'conv_general_dilated' in line]
    assert convs and all('bf16' in line for line in convs)

    state, bf16 = _train(config, 'bfloat16')
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    _, fp32 = _train(config, 'float32')
    assert np.all(np.isfinite(bf16))
    # The same function up to rounding at the start; both fall, by a like amount. Twenty steps at
    # a high rate amplify rounding, so later losses only agree within a factor (with jax 0.10.2
    # bfloat16 ended 26% lower than float32; with earlier versions within 10%).
    assert abs(bf16[0] - fp32[0]) < 0.02 * fp32[0], (bf16, fp32)
    for losses in (bf16, fp32):
        assert losses[-5:].mean() < 0.5 * losses[:3].mean(), losses
    assert 0.5 < bf16[-5:].mean() / fp32[-5:].mean() < 2.0, (bf16, fp32)


# ----------------------------------------------------------------------------- CPU rendering

def _onednn_missing() -> str:
    try:
        onednn.find_onednn()
    except onednn.OneDNNUnavailable as e:
        return '' if os.environ.get('BOKEH_JAX_TESTS_NEED_ONEDNN') == '1' else str(e)
    return '' if onednn.cpu_has_bf16() else f'this CPU has none of {onednn.BF16_FLAGS}'


_NEEDS_ONEDNN_BF16 = pytest.mark.skipif(bool(_onednn_missing()), reason=_onednn_missing())


def _he_params(channels: int):
    # He's init keeps the signal's scale through level 3's norm-free layers, so rounding errors
    # travel far (the original's std 0.01 shrinks them away). No trained weights ship with the tests.
    return model_lib.init_params(model_lib.PyNET(channels), jax.random.key(0), scheme='he')


@_NEEDS_ONEDNN_BF16
def test_cpu_bfloat16_keeps_the_encoder_in_float32():
    model = model_lib.PyNET(4, dtype=jnp.bfloat16, conv_impl='onednn')
    x = jnp.zeros((1, 64, 64, 4), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, x, level=3))(_he_params(4)))
    calls = [line for line in jaxpr.splitlines() if 'DnnlConvForward' in line]
    float32 = [line for line in calls if 'DnnlConvForwardBf16' not in line]
    # e1..e4: one multi-block of two 3x3 convs each; levels 7..3 all in bfloat16.
    assert len(float32) == 8, float32
    assert len(calls) - len(float32) > 100


@_NEEDS_ONEDNN_BF16
def test_cpu_bfloat16_render_of_a_real_photo_is_within_50db_of_float32():
    from PIL import Image

    path = os.path.join(os.path.dirname(__file__), 'data', 'photos', 'chelsea.jpg')
    photo = np.asarray(Image.open(path).convert('RGB'))[:256, :384]
    ramp = np.linspace(0, 255, photo.shape[1] // 2, dtype=np.float32)
    depth = np.broadcast_to(ramp, (photo.shape[0] // 2, photo.shape[1] // 2)).astype(np.uint8)
    params = _he_params(8)
    out = {dtype: render.render_full_resolution(params, photo, depth, dtype=dtype,
                                                conv_impl='onednn')
           for dtype in ('float32', 'bfloat16')}
    assert out['float32'].std() > 0.02  # a rendering that depends on the photo, not a constant
    psnr = 10 * np.log10(1 / np.mean((out['bfloat16'] - out['float32']) ** 2))  # range [0, 1]
    # Measured 52.8 dB; 40.5 dB with the encoder in bfloat16 too (before). Random weights spread
    # widely across photos and seeds (39-53 dB); the demo's trained ones gave 57-58 dB (level 3)
    # (docs/performance.md). < 120 dB: bfloat16 rounding really happened.
    assert 50 <= psnr < 120, psnr


@_NEEDS_ONEDNN_BF16
def test_launch_render_bfloat16_flag(tmp_path):
    from PIL import Image

    from bokeh_jax import checkpoint
    from tests import helpers

    params = _he_params(4)
    checkpoint.save_params(str(tmp_path / 'work'), 1, params, {'channels': 4, 'input_channels': 4})
    photo = np.asarray(Image.open(os.path.join(
        os.path.dirname(__file__), 'data', 'photos', 'chelsea.jpg')).convert('RGB'))[:128, :192]
    depth = np.broadcast_to(np.linspace(0, 255, 96, dtype=np.float32), (64, 96)).astype(np.uint8)
    helpers.save_png(tmp_path / 'photo.png', photo)
    helpers.save_png(tmp_path / 'depth.png', depth)
    # The paper's config (conv_impl 'xla'): the flag switches the CPU's convolutions to oneDNN.
    result = helpers.launch('--mode=render', f'--workdir={tmp_path}/work', '--bfloat16',
                            f'--input={tmp_path}/photo.png', f'--depth={tmp_path}/depth.png',
                            f'--output={tmp_path}/out.png')
    assert '--bfloat16: bfloat16 convolutions in oneDNN' in result.stderr, result.stderr
    rendered = np.asarray(Image.open(tmp_path / 'out.png'), np.float32) / 255
    expected = render.render_full_resolution(params, photo, depth, conv_impl='onednn')
    assert rendered.shape == expected.shape
    assert 10 * np.log10(1 / np.mean((rendered - expected) ** 2)) > 40  # 8-bit file, bf16 render
