"""A classical, physically based bokeh renderer: thin-lens defocus of an image with a depth map.

It renders the synthetic training set (tfds_ebb/synthetic_bokeh) and is the hand-made baseline
that PyNET is compared against (the paper argues a learned model beats exactly this kind of
renderer on real photos, whose depth maps are imperfect).

Model. With a thin lens focused at disparity f (disparity = 1 / distance, here normalised to
[0, 1] with near = 1, like the EBB! depth maps), a point at disparity d is imaged as a disc of
diameter proportional to |d - f| (the circle of confusion). `defocus` renders that in linear
light as layers:

1. The signed blur diameter `blur_per_disparity * (d - f)` is quantised into at most
   `max_layers` steps; each step is one layer with one disc kernel.
2. Layers are composited back to front (far to near) with the "over" operator on premultiplied
   colour: a layer's colour and coverage are both blurred by its own disc, so a sharp foreground
   keeps a sharp edge and its colour never leaks into the blurred background behind it (the
   halo of a single gather-style blur).
3. A layer is extended under the nearer layers that hide it, up to the largest blur radius that
   can see behind them, with colour filled in from its visible pixels (normalised
   convolution). This is what a real lens sees around an occluder: a blurred background stays
   bright right up to a sharp foreground edge, and a blurred foreground edge turns
   semi-transparent over the background instead of over black.
4. Working in linear light with highlights above 1 makes small bright lights bloom into discs.

Consecutive layers with large blurs are composited on a coarser grid (the result is smooth at
the scale of their radius) and interpolated back once; layers near the focus are done at full
resolution on their bounding box only. A 1024 x 1536 photo takes about 1-3 s on one CPU core.

`render_bokeh` wraps this for ordinary sRGB photos: it expands near-saturated values into
highlights (the inverse of a soft clip), defocuses, and maps back.
"""

from collections.abc import Sequence
import math

import numpy as np
import scipy.fft

from bokeh_jax import image_ops

# Default blur: disc diameter for |d - f| = 1, as a fraction of the image height. A 50 mm f/1.8
# lens on the EBB! camera (APS-C, subject at ~1.5 m) gives about 6 % for a background at
# infinity; the depth maps span near..far as 1..0. The synthetic data set uses this value too.
DEFAULT_STRENGTH = 0.06
# Blurs with a radius above this many pixels are computed at a reduced resolution.
_DIRECT_RADIUS = 6.0


# ----------------------------------------------------------------------------- colour transfer

def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (IEC 61966-2-1)."""
    x = np.asarray(x, np.float32)
    return np.where(x <= 0.04045, x / 12.92, ((np.maximum(x, 0.04045) + 0.055) / 1.055) ** 2.4
                    ).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] -> sRGB-encoded values in [0, 1] (inverse of srgb_to_linear)."""
    x = np.asarray(x, np.float32)
    return np.where(x <= 0.0031308, x * 12.92,
                    1.055 * np.maximum(x, 0.0031308) ** (1 / 2.4) - 0.055).astype(np.float32)


def expand_highlights(linear: np.ndarray, gain: float, threshold: float) -> np.ndarray:
    """Undoes a soft highlight clip: linear values above `threshold` grow so that 1 -> `gain`.

    A photo stores a bright lamp as 1.0, but defocus spreads its true (much larger) energy over a
    disc; expanding the top of the range restores some of it. Identity below the threshold, C1
    continuous, monotonic, and exactly inverted by `compress_highlights`.
    """
    if gain == 1:
        return linear
    u = np.maximum(linear - threshold, 0) / (1 - threshold)
    return linear + (1 - threshold) * (gain - 1) * u * u


def compress_highlights(linear: np.ndarray, gain: float, threshold: float) -> np.ndarray:
    """Inverse of `expand_highlights` (values above its range map above 1)."""
    if gain == 1:
        return linear
    v = np.maximum(linear - threshold, 0) / (1 - threshold)
    u = (np.sqrt(1 + 4 * (gain - 1) * v) - 1) / (2 * (gain - 1))
    return np.where(linear > threshold, threshold + (1 - threshold) * u, linear)


# ----------------------------------------------------------------------------- disc blur

def disc_kernel(radius: float) -> np.ndarray:
    """Normalised disc of the given radius (pixels) with antialiased rim: float32 [k, k]."""
    half = int(math.ceil(radius + 0.5))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    kernel = np.clip(radius + 0.5 - np.hypot(yy, xx), 0, 1).astype(np.float32)
    return kernel / kernel.sum()


def _fft_disc_blur(stack: np.ndarray, radius: float) -> np.ndarray:
    """Zero-padded ('same') convolution of float32 [H, W, C] with disc_kernel(radius), by FFT."""
    kernel = disc_kernel(radius)
    half = kernel.shape[0] // 2
    h, w = stack.shape[:2]
    shape = (scipy.fft.next_fast_len(h + 2 * half, real=True),
             scipy.fft.next_fast_len(w + 2 * half, real=True))
    spectrum = scipy.fft.rfft2(stack, s=shape, axes=(0, 1))
    # Centre the kernel at the origin (wrapped) so the output is aligned with the input.
    padded = np.zeros(shape, np.float32)
    padded[:kernel.shape[0], :kernel.shape[1]] = kernel
    padded = np.roll(padded, (-half, -half), axis=(0, 1))
    spectrum *= scipy.fft.rfft2(padded)[..., None]
    return scipy.fft.irfft2(spectrum, s=shape, axes=(0, 1))[:h, :w].astype(np.float32)


def _box_downsample(stack: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of [H, W, C]; zero-padded at the bottom/right edge."""
    h, w, c = stack.shape
    hs, ws = -(-h // factor), -(-w // factor)
    if (hs * factor, ws * factor) != (h, w):
        stack = np.pad(stack, ((0, hs * factor - h), (0, ws * factor - w), (0, 0)))
    return stack.reshape(hs, factor, ws, factor, c).mean(axis=(1, 3), dtype=np.float32)


def _upsample_axis(small: np.ndarray, axis: int, factor: int, size: int) -> np.ndarray:
    """Linear interpolation between block centres along `axis` (edges clamped), to `size`."""
    x = np.moveaxis(small, axis, 0)
    n = x.shape[0]
    padded = np.concatenate([x[:1], x, x[-1:]], axis=0)
    out = np.empty((n, factor) + x.shape[1:], np.float32)
    for phase in range(factor):
        # Offset of this output pixel from its block centre, in blocks: in (-0.5, 0.5).
        offset = (phase + 0.5) / factor - 0.5
        if offset < 0:
            out[:, phase] = -offset * padded[:-2] + (1 + offset) * padded[1:-1]
        else:
            out[:, phase] = (1 - offset) * padded[1:-1] + offset * padded[2:]
    out = out.reshape((n * factor,) + x.shape[1:])[:size]
    return np.moveaxis(out, 0, axis)


def _upsample(small: np.ndarray, factor: int, size: Sequence[int]) -> np.ndarray:
    """Inverse of _box_downsample for smooth fields: bilinear [h, w, C] -> [size, C]."""
    return _upsample_axis(_upsample_axis(small, 0, factor, size[0]), 1, factor, size[1])


def _work_factor(radius: float, height: int, width: int) -> int:
    """Grid coarsening (a power of two) at which a layer blurred by `radius` is rendered."""
    if radius <= _DIRECT_RADIUS:
        return 1
    factor = 2 ** int(math.floor(math.log2(radius / (_DIRECT_RADIUS / 2))))
    while factor > 1 and min(height, width) < 8 * factor:
        factor //= 2
    return factor


def disc_blur(stack: np.ndarray, radius: float) -> np.ndarray:
    """Blurs float32 [H, W, C] by a disc of `radius` pixels (zero outside the image).

    Radii below 0.5 pixel return the input unchanged. Radii above _DIRECT_RADIUS are blurred on
    a grid coarser by a power of two (box-averaged, keeping a working radius of >= 3 pixels) and
    interpolated back: the result is smooth at that scale, so little is lost and the cost drops
    by the factor squared. The stack is linear (premultiplied colour and coverage), so averaging
    before blurring mixes nothing that the blur would not mix.
    """
    if radius < 0.5:
        return stack
    h, w = stack.shape[:2]
    factor = _work_factor(radius, h, w)
    if factor == 1:
        return _fft_disc_blur(stack, radius)
    small = _fft_disc_blur(_box_downsample(stack, factor), radius / factor)
    return _upsample(small, factor, (h, w))


# ----------------------------------------------------------------------------- layered defocus

def _layer(premult: np.ndarray, coverage: np.ndarray, hidden: np.ndarray, radius: float,
           reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Blurred premultiplied colour [h, w, 3] and coverage [h, w] of one depth layer.

    premult/coverage: the layer's visible colour (premultiplied) and coverage in [0, 1];
    hidden: coverage of nearer layers, under which the layer is extended up to `reach` pixels.
    """
    if reach >= 0.5 and hidden.any():
        spread = disc_blur(np.concatenate([premult, coverage[..., None]], axis=-1), reach)
        weight = spread[..., 3]
        extension = hidden * (weight > 1e-3)
        fill = spread[..., :3] / np.maximum(weight, 1e-6)[..., None]
        premult = premult + extension[..., None] * fill
        coverage = coverage + extension
    blurred = disc_blur(np.concatenate([premult, coverage[..., None]], axis=-1), radius)
    return np.maximum(blurred[..., :3], 0), np.clip(blurred[..., 3], 0, 1)


def _over(color: np.ndarray, alpha: np.ndarray, top_color: np.ndarray, top_alpha: np.ndarray
          ) -> None:
    """In place: (color, alpha) = (top_color, top_alpha) over (color, alpha), premultiplied."""
    color *= (1 - top_alpha)[..., None]
    color += top_color
    alpha *= 1 - top_alpha
    alpha += top_alpha


def _bounding_box(mask: np.ndarray, grow: int) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(rows[0] - grow, 0), min(rows[-1] + 1 + grow, h)),
            slice(max(cols[0] - grow, 0), min(cols[-1] + 1 + grow, w)))


def _composite_full_resolution(radiance, rank, layer, radius, reach, color, alpha) -> None:
    """Composites one layer at full resolution, working only on its bounding box."""
    mask = rank == layer
    box = _bounding_box(mask, int(math.ceil(reach + radius)) + 2)
    coverage = mask[box].astype(np.float32)
    layer_color, layer_alpha = _layer(radiance[box] * coverage[..., None], coverage,
                                      (rank[box] > layer).astype(np.float32), radius, reach)
    _over(color[box], alpha[box], layer_color, layer_alpha)


def _composite_coarse(radiance, rank, layers, radii, reaches, factor, color, alpha) -> None:
    """Composites consecutive layers that share a coarsening factor on the coarse grid.

    One pass over the image box-averages each layer's premultiplied colour and coverage (and
    the coverage of everything nearer); the group is composited coarse and interpolated back
    once, which is exact for the "over" operator's associativity and smooth at these radii.
    """
    h, w = rank.shape
    hs, ws = -(-h // factor), -(-w // factor)
    first, count = layers[0], len(layers)
    # Bin 0: farther than the group; 1..count: the group's layers; count + 1: nearer.
    bins = np.clip(rank - first + 1, 0, count + 1)
    cell = (np.arange(h) // factor)[:, None] * ws + (np.arange(w) // factor)[None, :]
    index = (cell * (count + 2) + bins).ravel()
    size = hs * ws * (count + 2)
    norm = np.float32(1 / factor ** 2)
    counts = np.bincount(index, minlength=size).reshape(hs, ws, count + 2) * norm
    sums = np.stack([np.bincount(index, weights=radiance[..., c].ravel(), minlength=size)
                     for c in range(3)], axis=-1).reshape(hs, ws, count + 2, 3) * norm
    counts, sums = counts.astype(np.float32), sums.astype(np.float32)
    nearer = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]  # coverage of bins >= index
    group_color = np.zeros((hs, ws, 3), np.float32)
    group_alpha = np.zeros((hs, ws), np.float32)
    for i, (radius, reach) in enumerate(zip(radii, reaches)):
        layer_color, layer_alpha = _layer(sums[:, :, i + 1], counts[:, :, i + 1],
                                          nearer[:, :, i + 2], radius / factor, reach / factor)
        _over(group_color, group_alpha, layer_color, layer_alpha)
    up = _upsample(np.concatenate([group_color, group_alpha[..., None]], axis=-1), factor, (h, w))
    _over(color, alpha, up[..., :3], up[..., 3])


def defocus(radiance: np.ndarray, disparity: np.ndarray, focus: float,
            blur_per_disparity: float, *, max_layers: int = 16) -> np.ndarray:
    """Thin-lens defocus in linear light, layered back to front (see the module docstring).

    Args:
      radiance: float32 [H, W, 3], linear light, >= 0 (highlights may exceed 1).
      disparity: float [H, W] in [0, 1], near = 1.
      focus: disparity of the focal plane, in [0, 1].
      blur_per_disparity: blur disc diameter in pixels per unit of |disparity - focus|.
      max_layers: upper bound on the number of depth layers (blur steps are >= 1 pixel).

    Returns:
      float32 [H, W, 3], linear light, within the input's range (a convex combination).
    """
    radiance = np.asarray(radiance, np.float32)
    disparity = np.asarray(disparity, np.float32)
    if radiance.ndim != 3 or radiance.shape[-1] != 3 or disparity.shape != radiance.shape[:2]:
        raise ValueError(f'defocus: radiance must be [H, W, 3] and disparity [H, W] of the same '
                         f'size, got {radiance.shape} and {disparity.shape}')
    h, w = disparity.shape
    diameter = (disparity - np.float32(focus)) * np.float32(blur_per_disparity)  # signed
    step = max(1.0, float(diameter.max() - diameter.min()) / max_layers)
    quantized = np.rint(diameter / step).astype(np.int32)
    levels, rank = np.unique(quantized, return_inverse=True)  # rank 0 = farthest layer
    rank = rank.reshape(h, w).astype(np.int32)
    radii = np.abs(levels) * step / 2
    # How far one can see behind the nearer layers' edges: their largest blur radius.
    nearer_radius = np.append(np.maximum.accumulate(radii[::-1])[::-1][1:], 0.0)
    reaches = np.maximum(radii, nearer_radius)
    factors = [_work_factor(r, h, w) for r in radii]

    color = np.zeros(radiance.shape, np.float32)  # premultiplied "over" composite
    alpha = np.zeros((h, w), np.float32)
    layer = 0
    while layer < len(levels):
        end = layer + 1
        while end < len(levels) and factors[end] == factors[layer]:
            end += 1
        if factors[layer] == 1:
            for i in range(layer, end):
                _composite_full_resolution(radiance, rank, i, radii[i], reaches[i], color, alpha)
        else:
            _composite_coarse(radiance, rank, list(range(layer, end)), radii[layer:end],
                              reaches[layer:end], factors[layer], color, alpha)
        layer = end
    # What remains transparent (thin blurred layers over nothing) is renormalised, not darkened.
    return color / np.maximum(alpha, 1e-6)[..., None]


def focus_window(height: int, width: int) -> tuple[slice, slice]:
    """The central window that `auto_focus` reads: the middle fifth of the height and width."""
    return (slice(2 * height // 5, max(3 * height // 5, 2 * height // 5 + 1)),
            slice(2 * width // 5, max(3 * width // 5, 2 * width // 5 + 1)))


def auto_focus(disparity: np.ndarray) -> float:
    """Focus disparity chosen from a depth map: the median over `focus_window`.

    EBB! photos are framed on a subject near the centre, and the synthetic scenes always place
    their subject over the whole window.
    """
    return float(np.median(disparity[focus_window(*disparity.shape[:2])]))


def disparity_from_depth(depth: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A depth map (uint8, uint16 or float in [0, 1]; near = bright; any resolution) as float32
    disparity [size] in [0, 1]."""
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f'depth must be [h, w] or [h, w, 1], got shape {depth.shape}')
    if depth.dtype == np.uint8:
        depth = depth.astype(np.float32) / 255
    elif depth.dtype == np.uint16:
        depth = depth.astype(np.float32) / 65535
    else:
        depth = depth.astype(np.float32)
        if not (np.all(np.isfinite(depth)) and depth.min() >= 0 and depth.max() <= 1):
            raise ValueError('a float depth map must lie in [0, 1] (near = 1); use '
                             'image_ops.normalize_depth to stretch other maps')
    if depth.shape != tuple(size):
        depth = np.clip(image_ops.resize(depth, size), 0, 1)
    return depth


def render_bokeh(image: np.ndarray, depth: np.ndarray, *, focus: float | None = None,
                 strength: float = DEFAULT_STRENGTH, highlight_gain: float = 4.0,
                 highlight_threshold: float = 0.6, max_layers: int = 16) -> np.ndarray:
    """Renders a shallow depth of field from an all-in-focus photo and its depth map.

    Args:
      image: float32 [H, W, 3] in [0, 1], sRGB encoded.
      depth: near = bright; uint8/uint16, or float in [0, 1]; any resolution (resized to H x W).
      focus: disparity in [0, 1] to keep sharp; None = `auto_focus` (central median).
      strength: blur diameter for |disparity - focus| = 1, as a fraction of the image height.
      highlight_gain: how much brighter than 1 a saturated pixel is taken to be (1 = off).
      highlight_threshold: linear value above which highlights are expanded.
      max_layers: see `defocus`.

    Returns:
      float32 [H, W, 3] in [0, 1], sRGB encoded. A scene entirely at the focus disparity comes
      back unchanged (up to float rounding).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'render_bokeh: image must be [H, W, 3], got shape {image.shape}')
    disparity = disparity_from_depth(depth, image.shape[:2])
    if focus is None:
        focus = auto_focus(disparity)
    linear = expand_highlights(srgb_to_linear(np.clip(image, 0, 1)), highlight_gain,
                               highlight_threshold)
    out = defocus(linear, disparity, focus, strength * image.shape[0], max_layers=max_layers)
    out = compress_highlights(out, highlight_gain, highlight_threshold)
    return linear_to_srgb(np.clip(out, 0, 1))
