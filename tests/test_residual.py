"""A residual PyNET (model.residual): every level's image is the input's RGB at the level's size
plus the change its head computes; the paper's model untouched; tiles, meta and workdir."""

import flax
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bokeh_jax import checkpoint, control, render, render_jobs, sweep, workdir
from bokeh_jax import model as model_lib
from bokeh_jax.errors import UserError
from bokeh_jax.training import config_checks
from configs import default
from helpers import random_photo, save_png

CHANNELS = 4
CONDITION = ('aperture_focus', 'levels')


def _photo(h=64, w=64, seed=1):
    return np.asarray(jax.random.uniform(jax.random.key(seed), (1, h, w, 4)))


def _params(condition='none', method='input', seed=0):
    model = model_lib.PyNET(CHANNELS, condition=condition, condition_method=method)
    return model_lib.init_params(model, jax.random.key(seed), 4, scheme='he')


def _outputs(params, x, residual, condition='none', method='input'):
    model = model_lib.PyNET(CHANNELS, condition=condition, condition_method=method,
                            residual=residual)
    return jax.jit(lambda p, x: model.apply({'params': p}, x, level=1))(params, x)




def test_same_tree_and_the_paper_unchanged():
    """residual=False is the default; both compute the same logits, so the residual image is the
    paper's less 0.5 plus the base, at every level."""
    assert model_lib.PyNET(CHANNELS).residual is False
    shapes = jax.tree.map(np.shape, _params())
    residual_model = model_lib.PyNET(CHANNELS, residual=True)
    assert jax.tree.map(np.shape, model_lib.init_params(residual_model, jax.random.key(0), 4)) \
        == shapes
    params, x = _params(), _photo()
    paper = _outputs(params, x, False)
    default_model = jax.jit(lambda p, x: model_lib.PyNET(CHANNELS).apply({'params': p}, x))
    for level, image in default_model(params, x).items():
        np.testing.assert_array_equal(paper[level], image)
    residual = _outputs(params, x, True)
    for level in model_lib.LEVELS:
        base = model_lib.residual_base(x[..., :3], level)
        assert residual[level].shape == paper[level].shape == base.shape
        np.testing.assert_allclose(residual[level], paper[level] - 0.5 + base, atol=2e-6)


@pytest.mark.parametrize('condition,method', [('none', 'input'), CONDITION, ('aperture', 'film')])
def test_zero_logits_give_the_resized_input(condition, method):
    """A residual model's init is the paper's with zero image heads: it starts as the identity."""
    model = model_lib.PyNET(CHANNELS, condition=condition, condition_method=method, residual=True)
    params = model_lib.init_params(model, jax.random.key(0), 4, scheme='he')
    paper = flax.traverse_util.flatten_dict(_params(condition, method))
    for path, value in flax.traverse_util.flatten_dict(params).items():
        head = path[1] in ('head', 'logits')
        np.testing.assert_array_equal(value, 0 * value if head else paper[path])
    photo = _photo()
    x = control.append_condition(photo, condition, 4.0, 0.5) if condition != 'none' else photo
    outputs = _outputs(params, x, True, condition, method)
    rgb = photo[..., :3]
    np.testing.assert_array_equal(outputs[2], rgb)
    for level in (7, 6, 5, 4, 3):
        f = 2 ** (level - 2)
        expected = rgb.reshape(1, 64 // f, f, 64 // f, f, 3).mean(axis=(2, 4))
        np.testing.assert_allclose(outputs[level], expected, atol=1e-6)
    expected = jax.image.resize(rgb, (1, 128, 128, 3), 'cubic')
    np.testing.assert_allclose(outputs[1], expected, atol=1e-6)
    # Bicubic: a 2x upscale keeps a linear ramp, away from the border.
    ramp = np.broadcast_to(np.arange(64, dtype=np.float32)[None, :, None, None] / 64,
                           (1, 64, 64, 3))
    up = np.asarray(model_lib.upscale2x(ramp))[0, 4:-4, 4:-4, 0]
    np.testing.assert_allclose(up, (np.arange(128)[4:-4, None] - 0.5) / 128 * np.ones((1, 120)),
                               atol=1e-6)


def test_tiled_render_matches_one_pass():
    """The RGB base comes to levels 3..1 as one more skip, tiled like e1 (with the control maps
    too: test_aperture_gain_scales_the_change_by_s)."""
    params = _params(seed=2)
    x = _photo(h=320, w=64)[0]
    out_hw = (640, 128)
    max_tile = 2 * (render.HALO_BEFORE + render.HALO_AFTER + 40)  # several tiles along H
    kw = dict(channels=CHANNELS, residual=True)
    untiled = render.render_model_input(params, x, out_hw, max_tile=0, **kw)
    tiled = render.render_model_input(params, x, out_hw, max_tile=max_tile, **kw)
    assert untiled.std() > 0.01
    np.testing.assert_allclose(tiled, untiled, atol=1e-4, rtol=0)
    paper = render.render_model_input(params, x, out_hw, max_tile=0, channels=CHANNELS)
    assert np.abs(paper - untiled).mean() > 0.05


def test_meta_drives_render_and_sweep(tmp_path):
    """A saved residual model's meta makes --mode=render and the sweep render it residually."""
    params = _params(*CONDITION, seed=3)
    work = str(tmp_path / 'work')
    checkpoint.save_params(work, 1, params, {
        'channels': CHANNELS, 'input_channels': 4, 'condition': CONDITION[0],
        'condition_method': CONDITION[1], 'residual': True})
    loaded, meta = checkpoint.load_params(work)
    assert meta['residual'] is True
    rng = np.random.default_rng(5)
    photo, depth = random_photo(rng, 96, 128), rng.random((48, 64)).astype(np.float32)
    photo_path = save_png(tmp_path / 'p.png', photo)
    depth_path = str(tmp_path / 'd.npy')
    np.save(depth_path, depth)
    config = default.get_config('tiny')
    render_jobs.render_paths(config, work, photo_path, depth_path, str(tmp_path / 'o.png'),
                             fnumber='4', focus='60,40')
    x, out_hw = render.model_input(photo, depth, input_channels=4)
    x, focus = render.control_input(x, photo.shape[:2], condition=CONDITION[0], fnumber=4.0,
                                    focus=(60, 40))
    kw = dict(channels=CHANNELS, max_tile=config.render.max_tile)
    expected = render.render_model_input(loaded, x, out_hw, residual=True, **kw)
    expected = render.with_focus_detail(expected, photo, x, control.px_per_defocus(config, meta))
    got = np.asarray(Image.open(tmp_path / 'o.png'), np.float32)
    assert np.abs(got - expected * 255).max() <= 0.5 + 1e-3
    paper = render.render_model_input(loaded, x, out_hw, **kw)
    assert np.abs(paper - expected).mean() > 0.05
    swept = sweep.model_renderer(work, max_tile=0, focus_detail=False)(photo, depth, 4.0, focus)
    np.testing.assert_allclose(
        swept, render.render_model_input(loaded, x, out_hw, channels=CHANNELS, max_tile=0,
                                         residual=True), atol=1e-5)


def test_config_field_is_checked_and_kept_by_the_workdir():
    config = default.get_config('tiny')
    assert config.model.residual is False
    assert default.get_config('control').model.residual is True
    bad = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    bad.model.residual = 1  # e.g. from a config file of one's own
    with pytest.raises(UserError, match='config.model.residual must be True or False, got 1'):
        config_checks.validate_model_config(bad)
    given = ml_collections.ConfigDict(config.to_dict())
    given.model.residual = True
    with pytest.raises(UserError, match='config.model.residual=True disagrees with W/'):
        workdir.check_same_model(config, given, 'W')


def test_aperture_gain_scales_the_change_by_s():
    """residual 'aperture' (model.residual_gain): every level's change is s = 2/N times the
    plain residual model's, on the same parameters; tiles (the maps and the RGB base as skips)
    equal one pass; it needs a conditioned model."""
    model = model_lib.PyNET(CHANNELS, condition=CONDITION[0], condition_method=CONDITION[1])
    params = model_lib.init_params(model, jax.random.key(4), 4, scheme='he')
    photo = _photo(seed=4)
    x = control.append_condition(np.concatenate([photo, photo]), CONDITION[0],
                                 np.array([2.0, 8.0]), 0.5)
    plain = _outputs(params, x, True, *CONDITION)
    gained = _outputs(params, x, 'aperture', *CONDITION)
    for level in model_lib.LEVELS:
        base = model_lib.residual_base(x[..., :3], level)
        change = np.asarray(plain[level] - base)
        assert np.abs(change).mean() > 1e-3, level
        np.testing.assert_allclose(gained[level] - base, change * np.array([1, 0.25])[
            :, None, None, None], atol=2e-6)
    tall = control.append_condition(_photo(h=320, w=64), CONDITION[0], 2.8, 0.5)[0]
    kw = dict(channels=CHANNELS, residual='aperture')
    untiled = render.render_model_input(params, tall, (640, 128), max_tile=0, **kw)
    tiled = render.render_model_input(params, tall, (640, 128), max_tile=2 * (
        render.HALO_BEFORE + render.HALO_AFTER + 40), **kw)
    assert untiled.std() > 0.01
    np.testing.assert_allclose(tiled, untiled, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="residual 'aperture'.*needs a conditioned model"):
        _outputs(_params(), photo, 'aperture')
    config = default.get_config('tiny')
    config.model.residual_gain = True
    with pytest.raises(UserError, match='residual_gain=True needs config.model.residual=True'):
        config_checks.validate_model_config(config)
    config.model.residual = True
    with pytest.raises(UserError, match='config.model.residual_gain.*needs a conditioned model'):
        config_checks.validate_model_config(config)
