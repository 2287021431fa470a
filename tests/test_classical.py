"""Tests of the classical thin-lens renderer (bokeh_jax/classical.py)."""

import numpy as np
import pytest

from bokeh_jax import classical

H, W = 96, 128


def _disc_diameter(image: np.ndarray, threshold: float) -> float:
    """Diameter of the disc of pixels above `threshold` (from its area)."""
    return 2 * np.sqrt((image > threshold).sum() / np.pi)


def test_scene_in_the_focal_plane_is_unchanged():
    rng = np.random.default_rng(0)
    image = rng.random((H, W, 3), dtype=np.float32)
    depth = np.full((H // 2, W // 2), 137, np.uint8)  # half resolution, like the datasets
    out = classical.render_bokeh(image, depth)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, image, atol=2e-6)
    # The core itself is exact when nothing is defocused.
    radiance = rng.random((H, W, 3), dtype=np.float32) * 5
    same = classical.defocus(radiance, np.full((H, W), 0.3), 0.3, 40.0)
    np.testing.assert_array_equal(same, radiance)


@pytest.mark.parametrize('direct', [True, False])
def test_disc_blur_matches_a_direct_convolution(direct):
    rng = np.random.default_rng(1)
    stack = rng.random((40, 56, 2), dtype=np.float32)
    radius = 3.5
    kernel = classical.disc_kernel(radius)
    np.testing.assert_allclose(kernel.sum(), 1, atol=1e-6)
    half = kernel.shape[0] // 2
    padded = np.pad(stack, ((half, half), (half, half), (0, 0)))
    expected = np.zeros_like(stack)
    for dy in range(kernel.shape[0]):  # zero-padded 'same' convolution, written out
        for dx in range(kernel.shape[1]):
            expected += kernel[dy, dx] * padded[dy:dy + 40, dx:dx + 56]
    if direct:
        np.testing.assert_allclose(classical.disc_blur(stack, radius), expected, atol=1e-5)
    else:
        # Large radii go through a coarser grid: close to the exact blur for smooth content.
        smooth = classical.disc_blur(stack, 4.0)
        exact = classical._fft_disc_blur(smooth, 12.0)
        coarse = classical.disc_blur(smooth, 12.0)
        inner = (slice(14, -14), slice(14, -14))
        assert np.abs(coarse - exact)[inner].max() < 0.02


def test_blur_grows_with_defocus():
    """A small light at disparity d, focus at 1: its disc is strength * H * |d - 1| wide."""
    image = np.zeros((H, W, 3), np.float32)
    image[46:50, 62:66] = 1.0
    diameters = []
    for d in (0.9, 0.6, 0.3):
        depth = np.full((H, W), d, np.float32)
        out = classical.render_bokeh(image, depth, focus=1.0, strength=0.4, highlight_gain=1)
        diameters.append(_disc_diameter(out[..., 0], 0.02))
        expected = 0.4 * H * (1 - d)
        assert abs(diameters[-1] - expected) < 0.15 * expected + 5, (d, diameters[-1], expected)
    assert diameters[0] < diameters[1] < diameters[2]


def test_sharp_foreground_has_no_halo_over_blurred_background():
    image = np.zeros((H, W, 3), np.float32)
    image[..., 1] = 0.5  # green background
    disparity = np.zeros((H, W), np.float32)
    fg = (slice(30, 70), slice(40, 90))
    image[fg] = [0.8, 0.0, 0.0]  # red foreground, in focus
    disparity[fg] = 1.0
    out = classical.render_bokeh(image, disparity, focus=1.0, strength=0.15)
    outside = np.ones((H, W), bool)
    outside[fg] = False
    assert out[..., 0][outside].max() < 1e-3  # no red leaks into the background
    np.testing.assert_allclose(out[fg], image[fg], atol=1e-5)  # the foreground stays sharp
    # The background is not darkened next to the edge it hides behind.
    np.testing.assert_allclose(out[..., 1][outside], 0.5, atol=2e-3)


def test_blurred_foreground_spreads_over_sharp_background():
    image = np.zeros((H, W, 3), np.float32)
    image[..., 1] = 0.5
    disparity = np.zeros((H, W), np.float32)
    fg = (slice(30, 70), slice(40, 90))
    image[fg] = [0.8, 0.0, 0.0]
    disparity[fg] = 1.0
    out = classical.render_bokeh(image, disparity, focus=0.0, strength=0.15)
    assert out[27, 65, 0] > 0.2  # red spills beyond the foreground's edge ...
    assert out[50, 39, 1] > 0.1  # ... and the edge turns semi-transparent over the green
    np.testing.assert_allclose(out[5:15, 5:20], image[5:15, 5:20], atol=1e-5)  # far from it
    np.testing.assert_allclose(out[45:55, 60:70], image[45:55, 60:70], atol=1e-5)


def test_highlights_bloom_into_bright_discs():
    image = np.full((H, W, 3), 0.1, np.float32)
    image[47:49, 63:65] = 1.0  # a saturated light
    depth = np.zeros((H, W), np.float32)
    plain = classical.render_bokeh(image, depth, focus=1.0, strength=0.2, highlight_gain=1.0)
    bloom = classical.render_bokeh(image, depth, focus=1.0, strength=0.2, highlight_gain=8.0)
    disc = bloom[..., 0] > 0.25
    assert np.pi * 8**2 < disc.sum() < np.pi * 11**2  # a disc of diameter 0.2 * H, not a dot
    assert bloom[disc].mean() > plain[disc].mean() + 0.1
    # Expansion is undone exactly where nothing mixes.
    x = np.linspace(0, 1.2, 50, dtype=np.float32)
    np.testing.assert_allclose(
        classical.compress_highlights(classical.expand_highlights(x, 4.0, 0.6), 4.0, 0.6), x,
        atol=1e-5)


def test_auto_focus_reads_the_central_window():
    disparity = np.zeros((100, 150), np.float32)
    disparity[35:65, 55:95] = 0.7  # a subject covering the middle fifth
    assert classical.auto_focus(disparity) == pytest.approx(0.7)
    image = np.random.default_rng(2).random((100, 150, 3), dtype=np.float32)
    out = classical.render_bokeh(image, disparity)  # focus=None -> the subject stays sharp
    np.testing.assert_allclose(out[45:55, 65:85], image[45:55, 65:85], atol=1e-5)
    assert np.abs(out[5:25, 5:40] - image[5:25, 5:40]).mean() > 0.05


def test_colour_transfer_roundtrip_and_bad_depth():
    x = np.linspace(0, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(classical.linear_to_srgb(classical.srgb_to_linear(x)), x,
                               atol=1e-6)
    with pytest.raises(ValueError, match='depth map must lie in'):
        classical.render_bokeh(np.zeros((8, 8, 3), np.float32), np.full((8, 8), 3.0))
