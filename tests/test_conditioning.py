"""A conditioned PyNET (model.condition): its three ways of reading the control maps, the tree of
the unconditioned model inside it, growing released parameters, training, saving, rendering."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bokeh_jax import checkpoint, conditioning, control, onednn, render, train
from bokeh_jax import model as model_lib
from bokeh_jax.errors import UserError
from bokeh_jax.training import config_checks, multihost
from configs import default

CHANNELS = 4
try:
    onednn.find_onednn()
    _HAS_ONEDNN = True
except onednn.OneDNNUnavailable:
    _HAS_ONEDNN = False
FNUMBERS = np.array([2.0, 8.0], np.float32)
FOCUS = np.array([0.3, 0.7], np.float32)
# (condition, method): every method, and 'film' also without a defocus map (no map enters e1).
CASES = [('aperture_focus', 'input'), ('aperture_focus', 'levels'), ('aperture_focus', 'film'),
         ('aperture', 'film')]


def _photo(n=2, h=64, w=64, seed=1):
    return np.asarray(jax.random.uniform(jax.random.key(seed), (n, h, w, 4)))


def _forward(model):
    return jax.jit(lambda p, x: model.apply({'params': p}, x, level=1))


def _flat(tree):
    return {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


@pytest.fixture(scope='module')
def unconditioned():
    model = model_lib.PyNET(CHANNELS)
    params = model_lib.init_params(model, jax.random.key(0), 4, scheme='he')
    return params, _forward(model)(params, _photo())


def test_none_is_the_papers_tree_whatever_the_method():
    none = _flat(model_lib.param_shapes(CHANNELS))
    for method in conditioning.METHODS:
        assert _flat(model_lib.param_shapes(CHANNELS, 4, 'none', method)) == none
    assert model_lib.condition_of(model_lib.param_shapes(CHANNELS)) == ('none', 'input')


@pytest.mark.parametrize('condition,method', CASES)
def test_method_shapes_growth_and_control(condition, method, unconditioned):
    base_params, base_outputs = unconditioned
    model = model_lib.PyNET(CHANNELS, condition=condition, condition_method=method)
    forward = _forward(model)
    x = control.append_condition(_photo(), condition, FNUMBERS, FOCUS)
    assert x.shape[-1] == 4 + control.condition_channels(condition)

    # The unconditioned tree is a subtree; everything added reads the control maps.
    shapes = _flat(model_lib.param_shapes(CHANNELS, 4, condition, method))
    base = _flat(base_params)
    assert {k: shapes[k] for k in base} == base
    added = set(shapes) - set(base)
    assert added and all('control' in k or '/film' in k for k in added), sorted(added)[:5]
    if method == 'levels':  # every level's first conv reads the maps
        for group in ('encoder/e1', 'level7/d1', 'level6/d3', 'level5/d3', 'level4/d3',
                      'level3/d3', 'level2/up', 'level1/up'):
            assert any(k.startswith(group) and 'control' in k for k in added), group

    params = model_lib.init_params(model, jax.random.key(0), 4, scheme='he')
    assert model_lib.condition_of(params) == (condition, method)
    outputs = forward(params, x)
    for level, image in outputs.items():
        s = model_lib.level_output_scale(level)
        assert image.shape == (2, int(64 * s), int(64 * s), 3), level
    # The f-number changes the image (s is read), once the weights that read it are not zero
    # (the FiLM heads start at zero).
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: (rng.normal(0, 0.1, v.shape).astype(np.float32)
                         if conditioning.is_new_weight(tuple(k.key for k in path)) else v), params)
    swapped = control.append_condition(_photo(), condition, FNUMBERS[::-1], FOCUS)
    change = np.abs(np.asarray(forward(params, swapped)[1]) - np.asarray(forward(params, x)[1]))
    assert change.max() > 1e-3

    # Grown from unconditioned parameters: the same images at any f-number and focus.
    grown = model_lib.condition_params(base_params, condition, method)
    assert _flat(grown) == shapes and model_lib.condition_of(grown) == (condition, method)
    for fnumbers in (FNUMBERS, FNUMBERS[::-1]):
        got = forward(grown, control.append_condition(_photo(), condition, fnumbers, FOCUS))
        for level in base_outputs:
            np.testing.assert_allclose(got[level], base_outputs[level], atol=1e-4, rtol=0)


@pytest.mark.parametrize('method', ['levels', 'film'])  # 'levels' includes 'input''s kernel
def test_train_step_moves_the_new_weights_from_zero(method, unconditioned):
    """One SGD step of the real train step on a batch with the control maps: every weight that
    reads them and lies on level 7's path gets a gradient, although it starts at zero."""
    level, condition = 7, 'aperture_focus'
    model = model_lib.PyNET(CHANNELS, condition=condition, condition_method=method)
    params = model_lib.condition_params(unconditioned[0], condition, method)
    tx = optax.sgd(1.0)
    step = jax.pmap(train.make_train_step(model, level, {'mae': 1.0}, tx), axis_name=train.AXIS)
    devices = jax.local_device_count()
    x = control.append_condition(_photo(n=devices), condition, FNUMBERS[:1], FOCUS[:1])
    rng = np.random.default_rng(0)
    batch = {'input': x.reshape(devices, 1, *x.shape[1:]),
             'target': rng.random((devices, 1, 2, 2, 3), np.float32)}
    state = train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
    state, metrics = step(multihost.replicate(state), batch, {})
    assert np.isfinite(np.asarray(metrics['loss'])).all()
    after = flax.traverse_util.flatten_dict(multihost.unreplicate(state.params), sep='/')
    new = {k: v for k, v in flax.traverse_util.flatten_dict(params, sep='/').items()
           if conditioning.is_new_weight(tuple(k.split('/')))}
    on_path = [k for k in new if model_lib.on_output_path(k.split('/'), level)]
    assert on_path
    unmoved = [k for k in on_path if not np.any(after[k] != new[k])]
    assert not unmoved, unmoved


def test_saved_conditioned_params_load_and_init_from_grows(tmp_path, unconditioned):
    base_dir, cond_dir = str(tmp_path / 'released'), str(tmp_path / 'conditioned')
    checkpoint.save_params(base_dir, 1, unconditioned[0],
                           {'channels': CHANNELS, 'input_channels': 4, 'source': 'convert'})
    config = default.get_config('tiny')
    config.model.condition, config.model.condition_method = 'aperture', 'levels'
    config.train.init_from = base_dir
    params, source = train.initial_params(config, 4)
    assert model_lib.condition_of(params) == ('aperture', 'levels') and 'grown' in source
    meta = {'channels': CHANNELS, 'input_channels': 4, 'condition': 'aperture',
            'condition_method': 'levels', 'level': 1}
    checkpoint.save_params(cond_dir, 1, params, meta)
    loaded, loaded_meta = checkpoint.load_params(cond_dir)
    assert model_lib.condition_of_meta(loaded_meta) == ('aperture', 'levels')
    assert _flat(loaded) == _flat(params)
    assert render.input_channels_of(loaded) == 4  # photo + depth; the map comes on top
    # A conditioned model does not start another condition or method.
    config.train.init_from = cond_dir
    config.model.condition_method = 'film'
    with pytest.raises(ValueError, match="condition_method='levels'"):
        train.initial_params(config, 4)


def test_tiled_render_matches_one_pass():
    """The fourth skip (the maps on level 3's grid) tiles like e1: same image as one pass. (Here
    'film', which reads s in the tiles; 'levels' in test_residual, 'input' in test_render.)"""
    model = model_lib.PyNET(CHANNELS, condition='aperture_focus', condition_method='film')
    params = model_lib.init_params(model, jax.random.key(2), 4, scheme='he')
    x = control.append_condition(_photo(n=1, h=320, w=64), 'aperture_focus', 2.8, 0.5)[0]
    out_hw = (640, 128)
    max_tile = 2 * (render.HALO_BEFORE + render.HALO_AFTER + 40)  # several tiles along H
    untiled = render.render_model_input(params, x, out_hw, channels=CHANNELS, max_tile=0)
    tiled = render.render_model_input(params, x, out_hw, channels=CHANNELS, max_tile=max_tile)
    assert untiled.std() > 0.01
    np.testing.assert_allclose(tiled, untiled, atol=1e-4, rtol=0)


def test_input_errors_name_the_control_maps():
    model = model_lib.PyNET(CHANNELS, condition='aperture')
    params = model_lib.param_shapes(CHANNELS, 4, 'aperture')
    with pytest.raises(ValueError, match=r"conditioned on 'aperture' takes RGB\(\+depth\) "
                                         r'followed by 1 control map.*4 or 5 channels; got 6'):
        model.apply({'params': params}, np.zeros((1, 64, 64, 6), np.float32))
    with pytest.raises(ValueError, match="'aperture_focus' takes RGB \\+ depth.*6 channels; got 5"):
        model_lib.check_input(np.zeros((1, 64, 64, 5)), 'aperture_focus')
    with pytest.raises(ValueError, match='4 channels \\(RGB \\+ depth\\) or 3'):
        model_lib.check_input(np.zeros((1, 64, 64, 5)))
    with pytest.raises(ValueError, match='condition_method must be one of'):
        model_lib.param_shapes(CHANNELS, 4, 'aperture', 'gain')


def test_config_checks_name_the_condition_fields():
    config = default.get_config('tiny')
    assert (config.model.condition, config.model.condition_method) == ('none', 'input')
    config_checks.validate_model_config(config)
    for field, value, message in (
            ('condition', 'focus', 'config.model.condition must be one of'),
            ('condition_method', 'gain', 'config.model.condition_method must be one of')):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.model[field] = value
        with pytest.raises(UserError, match=message):
            config_checks.validate_model_config(bad)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.model.condition, bad.data.builder_config = 'aperture_focus', 'rgb'
    with pytest.raises(UserError, match="needs config.data.builder_config='rgbd'"):
        config_checks.validate_model_config(bad)


@pytest.mark.skipif(not _HAS_ONEDNN, reason='oneDNN not installed (make onednn)')
def test_onednn_and_bfloat16_read_the_control_maps_too():
    """The joined [photo, maps] convolutions run through oneDNN (bf16 operands with bfloat16),
    and compute what XLA's float32 does."""
    condition, method = 'aperture_focus', 'levels'
    params = model_lib.init_params(
        model_lib.PyNET(CHANNELS, condition=condition, condition_method=method),
        jax.random.key(3), 4, scheme='he')
    x = control.append_condition(_photo(n=1), condition, 4.0, 0.5)
    out = {}
    for impl, dt in (('xla', 'float32'), ('onednn', 'float32'), ('onednn', 'bfloat16')):
        model = model_lib.PyNET(CHANNELS, dtype=jnp.dtype(dt), conv_impl=impl,
                                condition=condition, condition_method=method)
        out[impl, dt] = np.asarray(_forward(model)(params, x)[1])
    reference = out['xla', 'float32']
    np.testing.assert_allclose(out['onednn', 'float32'], reference, atol=1e-4, rtol=0)
    psnr = 10 * np.log10(1 / np.mean((out['onednn', 'bfloat16'] - reference) ** 2))
    assert 35 < psnr < 120, psnr  # bfloat16 rounding, nothing worse
