"""config.model.dtype='bfloat16': bfloat16 convolutions, float32 parameters, optimizer state,
losses and instance-norm statistics, and a loss that falls like float32's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bokeh_jax import input_pipeline, train
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
    # Both fall, and by about as much (the curves differ by bfloat16 rounding only).
    for losses in (bf16, fp32):
        assert losses[-5:].mean() < 0.8 * losses[:3].mean(), losses
    assert abs(bf16[-5:].mean() - fp32[-5:].mean()) < 0.1 * fp32[-5:].mean(), (bf16, fp32)
