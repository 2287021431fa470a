"""The control maps and the f-number to blur mapping of bokeh_jax.control."""

import pathlib

import numpy as np
import pytest

from bokeh_jax import control


def test_aperture_scale_and_blur_strength_follow_the_aperture_diameter():
    np.testing.assert_allclose(control.aperture_scale([2.0, 4.0, 16.0]), [1.0, 0.5, 0.125])
    assert control.blur_strength(0.06, 2.0) == pytest.approx(0.06)
    # One stop (x sqrt 2 in N) halves the aperture area: the blur diameter falls by sqrt 2.
    assert control.blur_strength(0.06, 2.8) == pytest.approx(0.06 / 1.4, rel=1e-6)


def test_condition_maps_hold_the_scale_and_the_signed_defocus():
    disparity = np.stack([np.full((4, 6), 0.2), np.linspace(0, 1, 24).reshape(4, 6)])
    maps = control.condition_maps('aperture_focus', [2.0, 4.0], disparity, [0.2, 0.5])
    assert maps.shape == (2, 4, 6, 2) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[0, ..., 0], 1.0)
    np.testing.assert_allclose(maps[1, ..., 0], 0.5)
    np.testing.assert_allclose(maps[0, ..., 1], 0.0, atol=1e-7)  # all on the focal plane
    np.testing.assert_allclose(maps[1, ..., 1], 0.5 * (disparity[1] - 0.5), atol=1e-7)
    assert control.condition_maps('aperture', 8.0, disparity).shape == (2, 4, 6, 1)
    assert control.condition_maps('none', 8.0, disparity).shape == (2, 4, 6, 0)


def test_append_condition_adds_channels_after_rgb_and_depth():
    x = np.random.default_rng(0).random((1, 8, 8, 4), dtype=np.float32)
    y = control.append_condition(x, 'aperture_focus', 2.8, 0.3)
    np.testing.assert_array_equal(y[..., :4], x)
    np.testing.assert_allclose(y[..., 5], (2 / 2.8) * (x[..., 3] - 0.3), rtol=1e-6, atol=1e-7)
    assert control.append_condition(x, 'none', 2.8).shape == x.shape
    with pytest.raises(ValueError, match='4 channels'):
        control.append_condition(x[..., :3], 'aperture_focus', 2.8, 0.3)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match='model.condition'):
        control.check_condition('aperture+focus')
    with pytest.raises(ValueError, match='--fnumber'):
        control.check_fnumber('0.5', '--fnumber')
    with pytest.raises(ValueError, match='--fnumber'):
        control.check_fnumber('wide', '--fnumber')
    assert control.check_fnumber('2.8') == 2.8
    with pytest.raises(ValueError, match='X,Y'):
        control.parse_focus('12')
    assert control.parse_focus('10,20') == (10.0, 20.0)


def test_focus_disparity_at_reads_a_robust_median_around_the_point():
    disparity = np.zeros((100, 100), np.float32)
    disparity[:, 50:] = 0.8
    assert control.focus_disparity_at(disparity, 30, 75) == pytest.approx(0.8)
    assert control.focus_disparity_at(disparity, 30, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match='outside'):
        control.focus_disparity_at(disparity, 30, 140)


def test_focus_detail_restores_the_photo_in_focus_only():
    from PIL import Image
    from bokeh_jax import image_ops
    photo = image_ops.to_float(np.asarray(
        Image.open(pathlib.Path(__file__).parent / 'data' / 'photos' / 'chelsea.jpg'))[:128, :192])
    half = np.clip(image_ops.resize(photo, (64, 96)), 0, 1)
    smooth = image_ops.resize(half, (128, 192))  # all a half-resolution model could return
    defocus = np.zeros((64, 96), np.float32)
    defocus[:, 48:] = 0.5  # right half: a disc of 0.5 * 16 = 8 px
    drawn = smooth + np.float32(0.02)  # what a model's heads might add everywhere
    out = control.focus_detail(drawn, photo, defocus, px_per_defocus=16.0)
    np.testing.assert_allclose(out[:, :90], photo[:, :90], atol=1e-5)  # in focus: the photo
    np.testing.assert_array_equal(out[:, 100:], drawn[:, 100:])  # blurred: untouched
    assert np.abs(smooth[:, :90] - photo[:, :90]).mean() > 0.005  # there was detail to restore
    # The fade: a disc of 1.5 px is half the photo blurred by that disc, half the render; the
    # photo's blur grows with the disc.
    fade = control.focus_detail(drawn, photo, np.full((64, 96), 1.5 / 16, np.float32), 16.0)
    small = control.small_disc_blur(photo, np.full((128, 192), 1.5, np.float32))
    np.testing.assert_allclose(fade, (small + drawn) / 2, atol=1e-5)
    detail = [np.abs(np.diff(control.small_disc_blur(photo, np.full((128, 192), d, np.float32)),
                             axis=1)).mean() for d in (0.5, 1.0, 1.25, 1.5, 2.0)]
    assert detail[0] == detail[1] and all(a > b for a, b in zip(detail[1:], detail[2:])), detail
