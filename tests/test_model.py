"""PyNET structure: parameter counts of SPEC, level outputs, input checks, per-level cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bokeh_jax import model as model_lib
from bokeh_jax import summary

# SPEC "Parameter counts (base width 32)".
SPEC_PATH_COUNTS = {
    7: 18_898_627,
    6: 28_336_579,
    5: 36_351_811,
    4: 43_205_123,
    3: 47_523_171,
    2: 47_524_827,
    1: 47_524_992,
}


def _apply(model, params, x, level):
    return jax.jit(lambda p, x: model.apply({'params': p}, x, level=level))(params, x)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_counts_match_spec():
    shapes = model_lib.param_shapes(32)  # jax.eval_shape: no weights materialized
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert _count(shapes) == 47_551_791
    assert len(jax.tree.leaves(shapes)) == 440
    assert set(shapes) == {'encoder', *(f'level{k}' for k in range(1, 8))}
    assert _count(shapes['encoder']) == 1_177_792
    assert _count(shapes['level7']['head']) == 13_827
    trunk7 = {k: v for k, v in shapes['level7'].items() if k in ('d1', 'd2', 'd3', 'f')}
    assert _count(trunk7) == 17_707_008
    for level, expected in SPEC_PATH_COUNTS.items():
        assert summary.path_param_count(shapes, level) == expected, level


@pytest.fixture(scope='module')
def tiny():
    model = model_lib.PyNET(channels=4)
    params = model_lib.init_params(model, jax.random.key(0), input_channels=4)
    return model, params


def test_level_argument_returns_coarser_levels_only(tiny):
    model, params = tiny
    x = jax.random.uniform(jax.random.key(1), (2, 64, 96, 4))
    for level in (7, 4, 3, 1):
        out = _apply(model, params, x, level)
        assert sorted(out) == list(range(level, 8))
        for k, image in out.items():
            s = model_lib.level_output_scale(k)
            assert image.shape == (2, int(64 * s), int(96 * s), 3) and image.dtype == jnp.float32
            assert float(image.min()) >= -0.08 - 1e-6 and float(image.max()) <= 1.08 + 1e-6
    # Coarser outputs do not depend on how far down the pyramid the call went.
    full = _apply(model, params, x, 1)
    part = _apply(model, params, x, 4)
    for k in range(4, 8):
        np.testing.assert_allclose(part[k], full[k], atol=1e-6)


def test_init_creates_full_tree_at_any_level():
    model = model_lib.PyNET(channels=4)
    x = jnp.zeros((1, 32, 32, 4))
    full = jax.eval_shape(lambda: model.init(jax.random.key(0), x, level=1))
    coarse = jax.eval_shape(lambda: model.init(jax.random.key(0), x, level=7))
    assert jax.tree.structure(full) == jax.tree.structure(coarse)


def test_init_schemes():
    """'pynet' draws as the original (tf.truncated_normal(stddev=0.01), conv biases 0.01); 'he'
    scales each kernel by its fan-in. Both leave instance norm at scale 1, shift 0."""
    model = model_lib.PyNET(channels=8)
    pynet = model_lib.init_params(model, jax.random.key(0), scheme='pynet')
    he = model_lib.init_params(model, jax.random.key(0), scheme='he')
    flat = lambda p: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p)}
    pynet, he = flat(pynet), flat(he)
    kernels = np.concatenate([v.ravel() for k, v in pynet.items() if k.endswith("['kernel']")])
    assert np.abs(kernels).max() <= 0.02 and kernels.size > 100_000
    # A normal truncated at 2 sigma has std 0.880 sigma.
    np.testing.assert_allclose(kernels.std(), 0.00880, rtol=0.02)
    np.testing.assert_allclose(kernels.mean(), 0, atol=2e-4)
    for key, value in pynet.items():
        if key.endswith("['norm']['scale']"):
            assert (value == 1).all() and (he[key] == 1).all()
        elif key.endswith("['norm']['bias']"):
            assert (value == 0).all() and (he[key] == 0).all()
        elif key.endswith("['bias']"):
            assert (value == np.float32(0.01)).all() and (he[key] == 0).all(), key
    # He: std = gain / sqrt(k * k * inputs), e.g. for one of level 3's 9x9 convs.
    kernel = he["['level3']['d5']['k9a']['conv']['kernel']"]
    fan_in = 9 * 9 * kernel.shape[2]
    np.testing.assert_allclose(kernel.std(), model_lib.LEAKY_RELU_GAIN / np.sqrt(fan_in), rtol=0.05)
    with pytest.raises(ValueError, match='Unknown init scheme'):
        model_lib.init_params(model, jax.random.key(0), scheme='xavier')


def test_upsampling_start_makes_level1_level2_upsampled():
    model = model_lib.PyNET(channels=4)
    params = model_lib.init_params(model, jax.random.key(0), scheme='he')
    x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 4))
    before = model.apply({'params': params}, x, level=2)[2]
    out = model.apply({'params': model_lib.upsampling_start(params)}, x, level=1)
    image = lambda z: np.tanh(z) * 0.58 + 0.5
    # Level 2's logits, recovered from its image (the start shifts them by UPSAMPLING_SHIFT).
    z = np.arctanh((np.asarray(out[2], np.float64)[0] - 0.5) / 0.58) - model_lib.UPSAMPLING_SHIFT
    np.testing.assert_allclose(image(z), np.asarray(before)[0], atol=1e-5)  # the same logits
    level1 = np.asarray(out[1], np.float64)[0]
    assert level1.shape == (128, 128, 3)
    np.testing.assert_allclose(level1[1::2, 1::2], image(z), atol=1e-5)  # copies
    np.testing.assert_allclose(level1[2::2, 1::2], image((z[:-1] + z[1:]) / 2), atol=1e-5)
    np.testing.assert_allclose(level1[1::2, 2::2], image((z[:, :-1] + z[:, 1:]) / 2), atol=1e-5)
    corners = (z[:-1, :-1] + z[1:, :-1] + z[:-1, 1:] + z[1:, 1:]) / 4
    np.testing.assert_allclose(level1[2::2, 2::2], image(corners), atol=1e-5)


def test_rgb_only_input():
    model = model_lib.PyNET(channels=4)
    params = model_lib.init_params(model, jax.random.key(0), input_channels=3)
    assert params['encoder']['e1']['k3a']['conv']['kernel'].shape == (3, 3, 12, 4)
    out = _apply(model, params, jnp.full((1, 32, 64, 3), 0.5), 1)
    assert out[1].shape == (1, 64, 128, 3)


@pytest.mark.parametrize(
    'shape, message',
    [
        ((1, 48, 64, 4), 'multiples of 32'),
        ((1, 64, 40, 4), 'multiples of 32'),
        ((1, 64, 64, 5), '4 channels'),
        ((64, 64, 4), r'\[N, H, W, C\]'),
    ],
)
def test_bad_input_shapes_raise(tiny, shape, message):
    model, params = tiny
    with pytest.raises(ValueError, match=message):
        model.apply({'params': params}, jnp.zeros(shape), level=1)


def test_bad_level_raises(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match='level must be one of'):
        model.apply({'params': params}, jnp.zeros((1, 32, 32, 4)), level=0)


def test_coarse_levels_cost_a_fraction_of_the_full_pass():
    model = model_lib.PyNET(channels=8)
    flops = {k: summary.forward_flops(model, (1, 128, 128, 4), k) for k in (7, 4, 3, 1)}
    assert flops[7] < 0.05 * flops[1]
    assert flops[4] < 0.5 * flops[1]
    assert flops[7] < flops[4] < flops[3] <= flops[1]


def test_output_path_labels():
    on = model_lib.on_output_path
    assert on(('encoder', 'e1', 'k3a', 'conv', 'kernel'), 1)
    assert on(('level7', 'head', 'conv', 'kernel'), 7)
    assert not on(('level7', 'head', 'conv', 'kernel'), 6)
    assert not on(('level7', 'up_a', 'conv', 'kernel'), 7)
    assert on(('level7', 'up_a', 'conv', 'kernel'), 6)
    assert not on(('level5', 'd3', 'k3a', 'conv', 'kernel'), 6)
    assert on(('level2', 'logits', 'conv', 'bias'), 1)
    assert not on(('level1', 'head', 'conv', 'bias'), 2)
