"""The oneDNN conv backend (config.model.conv_impl='onednn'): numerics against XLA, the model,
a pmapped train step on two devices, and the errors a user meets without oneDNN.

`make test` installs oneDNN first (`make onednn`) and sets BOKEH_JAX_TESTS_NEED_ONEDNN=1, so these
tests run there for real; a bare `pytest` in an environment without oneDNN skips them.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bokeh_jax import model as model_lib
from bokeh_jax import onednn, train
from bokeh_jax.training import multihost
from bokeh_jax.bench import harness
from configs import default

try:
    onednn.find_onednn()
    _MISSING = ''
except onednn.OneDNNUnavailable as e:
    _MISSING = str(e)
if _MISSING and os.environ.get('BOKEH_JAX_TESTS_NEED_ONEDNN') != '1':
    pytest.skip(_MISSING, allow_module_level=True)

DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _xla_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DIMENSIONS)


def _onednn_conv(x, w):
    return onednn.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DIMENSIONS)


def _relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('height, width, cin, cout, k', [
    (7, 9, 3, 5, 3), (11, 5, 8, 4, 5), (9, 13, 6, 10, 7), (13, 11, 5, 3, 9),
])
def test_forward_and_gradients_match_xla(height, width, cin, cout, k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, height, width, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32)
    g = rng.standard_normal((2, height, width, cout), np.float32)
    results = {}
    for name, fn in (('xla', _xla_conv), ('onednn', _onednn_conv)):
        y, vjp = jax.vjp(jax.jit(fn), x, w)
        results[name] = (y, *vjp(g))
    for what, ours, reference in zip(('y', 'dx', 'dw'), results['onednn'], results['xla']):
        assert ours.shape == reference.shape, what
        assert _relative_error(ours, reference) < 1e-5, what


def test_unsupported_convolutions_fall_back_to_xla():
    x = jnp.ones((1, 8, 8, 3))
    w = jnp.ones((2, 2, 3, 4))  # even kernel: not one oneDNN's custom call takes
    ours = onednn.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DIMENSIONS)
    np.testing.assert_array_equal(ours, _xla_conv(x, w))
    assert not onednn.supports(x, w, (1, 1), 'SAME', dimension_numbers=DIMENSIONS)
    assert not onednn.supports(x, jnp.ones((3, 3, 3, 4)), (2, 2), 'SAME',
                               dimension_numbers=DIMENSIONS)
    assert onednn.supports(x, jnp.ones((3, 3, 3, 4)), (1, 1), ((1, 1), (1, 1)),
                           dimension_numbers=DIMENSIONS)


def test_bad_shapes_are_errors_not_crashes():
    with pytest.raises(Exception, match='kernel must be square with an odd side'):
        jax.jit(onednn.forward)(jnp.ones((1, 4, 4, 3)), jnp.ones((2, 2, 3, 4)))
    with pytest.raises(Exception, match=r'kernel must be \[K, K, input channels'):
        jax.jit(onednn.forward)(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 5, 4)))


@pytest.fixture(scope='module')
def tiny_params():
    # He's init: activations and gradients keep their scale through the layers, so that rounding
    # errors are compared on signals that matter (the original's 0.01 shrinks them layer by layer).
    return model_lib.init_params(model_lib.PyNET(4), jax.random.key(0), scheme='he')


def _param_shapes(model):
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    shapes = jax.eval_shape(lambda r, x: model.init(r, x)['params'], jax.random.key(0), x)
    return jax.tree.map(lambda s: s.shape, shapes)


def test_model_forward_and_gradients_match_between_impls(tiny_params):
    onednn_model = model_lib.PyNET(4, conv_impl='onednn')
    assert _param_shapes(model_lib.PyNET(4)) == _param_shapes(onednn_model)
    x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 4))
    # Every multi-block conv runs in oneDNN: one forward custom call per ConvLayer kernel.
    layers = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(tiny_params)
                 if path[-3].key[0] == 'k' and path[-1].key == 'kernel')
    forward = jax.jit(lambda p: onednn_model.apply({'params': p}, x))
    assert forward.lower(tiny_params).as_text().count('@DnnlConvForward(') == layers
    results = {}
    for impl, dtype in (('xla', jnp.float64), ('xla', jnp.float32), ('onednn', jnp.float32)):
        model = model_lib.PyNET(4, dtype=dtype, conv_impl=impl)

        def loss(params, model=model, dtype=dtype):
            out = model.apply({'params': params}, x.astype(dtype), level=3)
            return sum(jnp.mean(image) for image in out.values()), out

        with jax.enable_x64(dtype == jnp.float64):
            params = jax.tree.map(lambda p, dtype=dtype: jnp.asarray(p, dtype), tiny_params)
            (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            results[impl, jnp.dtype(dtype).name] = jax.tree.map(np.asarray, (out, grads))
    exact_out, exact_grads = results['xla', 'float64']
    xla_out, xla_grads = results['xla', 'float32']
    ours_out, ours_grads = results['onednn', 'float32']
    for level in ours_out:
        np.testing.assert_allclose(ours_out[level], xla_out[level], rtol=1e-4, atol=1e-4)
    # Float32 gradients of this deep a network are ~1e-3 (of the largest) off the float64 ones,
    # XLA's and oneDNN's alike: oneDNN's must be as close to float64 as XLA's are.
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(exact_grads))

    def error(grads):
        return max(jax.tree.leaves(jax.tree.map(
            lambda g, e: float(np.max(np.abs(g - e))) / scale, grads, exact_grads)))

    assert error(xla_grads) < 1e-2
    assert error(ours_grads) < 2 * error(xla_grads)


def test_pmapped_train_step_on_two_devices(tiny_params):
    assert jax.local_device_count() == 2, 'run with --xla_force_host_platform_device_count=2'
    level = 3
    # Plain SGD: Adam would blow rounding noise in zero gradients up to full steps.
    tx = optax.sgd(1e-3)
    rng = np.random.default_rng(0)
    batch = {'input': rng.random((2, 1, 64, 64, 4), np.float32),
             'target': rng.random((2, 1, 32, 32, 3), np.float32)}  # level 3: half the input
    after = {}
    for impl in ('xla', 'onednn'):
        model = model_lib.PyNET(4, conv_impl=impl)
        step = jax.pmap(train.make_train_step(model, level, {'mae': 100.0}, tx),
                        axis_name=train.AXIS)
        state = train.TrainState(step=np.int32(0), params=tiny_params,
                                 opt_state=tx.init(tiny_params))
        state, metrics = step(multihost.replicate(state), batch, {})  # loss: before the update
        after[impl] = (multihost.unreplicate(state.params), float(metrics['loss'][0]))
    (params_xla, loss_xla), (params_ours, loss_ours) = after['xla'], after['onednn']
    assert np.isclose(loss_ours, loss_xla, rtol=1e-5)
    # The updates agree to float32 gradient noise (see the float64 comparison above).
    updates = [jax.tree.map(lambda a, b: np.asarray(a) - b, p, tiny_params)
               for p in (params_ours, params_xla)]
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(updates[1]))
    assert scale > 0
    differences = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), *updates)
    assert max(jax.tree.leaves(differences)) < 1e-2 * scale


def test_bench_records_conv_impl_and_counts_flops_as_xla(tmp_path):
    results = {}
    for impl in ('xla', 'onednn'):
        config = default.get_config()
        config.model.channels = 4
        config.model.conv_impl = impl
        config.bench.update(forward_size='64x64', train_levels=(7,), patch=64,
                            render=False, per_level=False, peers=(), repeats=1, warmup=0)
        results[impl] = harness.run(config, str(tmp_path / impl))
    assert results['onednn']['conv_impl'] == 'onednn'
    gflop = {impl: {r['name']: r['gflop'] for r in res['rows']} for impl, res in results.items()}
    # XLA counts a custom call as no FLOPs; the harness reports the XLA twin's count instead,
    # taken before XLA's optimizations (the xla rows: after), which changes it by a few % (6% for
    # the project's tiny level-7 train step, whose metrics XLA partly simplifies away).
    assert gflop['onednn'] == pytest.approx(gflop['xla'], rel=0.1)


def test_missing_onednn_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn, '_registered', False)
    monkeypatch.setattr(onednn.sys, 'prefix', str(tmp_path))
    model = model_lib.PyNET(4, conv_impl='onednn')
    x = jnp.zeros((1, 32, 32, 4))
    with pytest.raises(onednn.OneDNNUnavailable,
                       match=r"conv_impl='onednn' needs `make onednn`.*onednn-devel"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def test_missing_compiler_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn, 'BUILD_DIR', str(tmp_path))  # nothing built there
    monkeypatch.setenv('CXX', 'no-such-compiler')
    with pytest.raises(onednn.OneDNNUnavailable, match="compiler 'no-such-compiler'"):
        onednn.library_path()


def test_unknown_conv_impl_is_rejected():
    with pytest.raises(ValueError, match='config.model.conv_impl must be one of'):
        model_lib.PyNET(4, conv_impl='cudnn').init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))


def test_auto_picks_onednn_where_it_runs_and_xla_where_it_does_not(monkeypatch):
    model_lib.resolve_conv_impl.cache_clear()
    assert model_lib.resolve_conv_impl('auto') == 'onednn'
    assert model_lib.resolve_conv_impl('xla') == 'xla'

    def unavailable():
        raise onednn.OneDNNUnavailable('no oneDNN here')

    model_lib.resolve_conv_impl.cache_clear()
    monkeypatch.setattr(onednn, 'ensure_registered', unavailable)
    try:
        assert model_lib.resolve_conv_impl('auto') == 'xla'
    finally:
        model_lib.resolve_conv_impl.cache_clear()
    with pytest.raises(ValueError, match="config.model.conv_impl must be one of"):
        model_lib.check_conv_impl('fast')


# ----------------------------------------------------------------------------- bfloat16 rendering

_NEEDS_BF16 = pytest.mark.skipif(
    not onednn.cpu_has_bf16(), reason=f'this CPU has none of {onednn.BF16_FLAGS}')


@_NEEDS_BF16
def test_bf16_conv_is_the_conv_of_rounded_operands_with_float32_sums():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 12, 10, 24), np.float32)
    w = rng.standard_normal((5, 5, 24, 8), np.float32)
    rounded = [jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32) for a in (x, w)]
    reference = _xla_conv(*rounded)
    y = jax.jit(onednn.conv_bf16)(x, w)
    assert y.dtype == jnp.float32
    assert _relative_error(y, reference) < 1e-5  # float32 sums of exactly the bf16 products
    assert _relative_error(y, _xla_conv(x, w)) > 1e-4  # and not float32's own convolution


def test_bf16_without_cpu_support_runs_float32_and_says_so(tiny_params, monkeypatch, caplog):
    monkeypatch.setattr(onednn, 'cpu_has_bf16', lambda: False)
    x = jnp.asarray(np.random.default_rng(8).random((1, 64, 64, 4), np.float32))

    def forward(dtype):
        model = model_lib.PyNET(4, dtype=jnp.dtype(dtype), conv_impl='onednn')
        return jax.jit(lambda p, x: model.apply({'params': p}, x, level=3)[3])(tiny_params, x)

    onednn._warn_no_bf16.cache_clear()
    with caplog.at_level('WARNING'):
        bf16 = forward('bfloat16')
    assert 'running them in float32' in caplog.text
    np.testing.assert_allclose(bf16, forward('float32'), atol=1e-6)
