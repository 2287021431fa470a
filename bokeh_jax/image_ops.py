"""Image primitives shared by training, evaluation and rendering (numpy only, no TensorFlow).

One resize is used everywhere (training crops, evaluation, rendering, the classical renderer):
`resize`, a separable Keys cubic (a = -0.5) with antialiasing. It follows the sampling rule of
`tf.image.resize(method='bicubic', antialias=True)` and `jax.image.resize(method='cubic',
antialias=True)` (half-pixel centres; when downscaling by s the kernel is stretched by s; taps that
fall outside the image are dropped and the remaining weights renormalised), so it agrees with both
to float32 rounding (tests/test_input_pipeline.py checks it against TF). The original PyNET code
used `scipy.misc.imresize(..., interp='bicubic')`, i.e. PIL's antialiased bicubic, which is the same
filter rounded to uint8.

Conventions: photos are uint8 [H, W, 3]; depth maps are 8-bit, near = bright, at half resolution
`half_size(H, W) = (H // 2, W // 2)`; model inputs are float32 [H // 2, W // 2, C] in [0, 1] with
C = 4 (R, G, B, depth) or 3 (R, G, B) (SPEC "Levels").
"""

from collections.abc import Sequence
import math

import numpy as np

# Keys cubic convolution parameter; -0.5 is the value TF/JAX/PIL use for antialiased bicubic.
CUBIC_A = -0.5
# Half-width of the cubic kernel in input pixels at scale 1 (it is stretched when downscaling).
CUBIC_RADIUS = 2.0
# Model input height and width must be multiples of this: space-to-depth (2), four max-pools (2**4).
SIZE_MULTIPLE = 32
# The paper's levels, coarsest first: level K's output is 2**(2 - K) times the model input.
LEVELS = (7, 6, 5, 4, 3, 2, 1)


def keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = CUBIC_A, evaluated at distances `x` (any shape)."""
    x = np.abs(x)
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _taps(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights of output samples start..stop-1 of a resize in_size -> out_size.

    Returns int [n, taps] indices (taps off the image may lie outside 0..in_size-1; their weight
    is 0) and float32 [n, taps] weights that sum to 1 along taps.
    """
    inv_scale = in_size / out_size
    kernel_scale = max(inv_scale, 1.0)  # stretch the kernel when downscaling: antialiasing
    support = CUBIC_RADIUS * kernel_scale
    centers = (np.arange(start, stop, dtype=np.float64) + 0.5) * inv_scale - 0.5
    num_taps = int(math.ceil(2 * support)) + 1
    first = np.floor(centers - support).astype(np.int64) + 1
    index = first[:, None] + np.arange(num_taps)[None, :]
    weights = keys_cubic((index - centers[:, None]) / kernel_scale)
    weights = np.where((index >= 0) & (index < in_size), weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    used = np.any(weights != 0, axis=0)  # drop taps that never contribute
    return index[:, used], weights[:, used].astype(np.float32)


def _plan(in_size: int, out_size: int, start: int, stop: int):
    """Taps of outputs start..stop-1 on one axis (None: identity) and the input range [lo, hi)
    they read; the range may reach past the image, where the weights are 0."""
    if in_size == out_size:  # the cubic kernel interpolates: scale 1 is the identity
        return None, start, stop
    index, weights = _taps(in_size, out_size, start, stop)
    lo, hi = int(index.min()), int(index.max()) + 1
    return (index - lo, weights), lo, hi


def _apply_taps(x: np.ndarray, axis: int, taps) -> np.ndarray:
    """Weighted sum over taps along `axis`; x covers exactly the taps' input range."""
    if taps is None:
        return x
    index, weights = taps
    n = index.shape[0]
    step = int(index[1, 0] - index[0, 0]) if n > 1 else 1
    # Integer scale factors (the usual x0.5, x0.25) give evenly spaced taps: strided views
    # instead of gathers.
    strided = step > 0 and np.array_equal(index, index[0] + step * np.arange(n)[:, None])
    where = [slice(None)] * x.ndim
    shape = [1] * x.ndim
    shape[axis] = n
    out = term = None
    for t in range(index.shape[1]):
        if strided:
            where[axis] = slice(int(index[0, t]), int(index[0, t]) + step * (n - 1) + 1, step)
            rows = x[tuple(where)]
        else:
            rows = np.take(x, index[:, t], axis=axis)
        w = weights[:, t].reshape(shape)
        if out is None:
            out = np.multiply(rows, w)
            term = np.empty_like(out)
        else:  # reuse one buffer: the passes are memory bound
            out += np.multiply(rows, w, out=term)
    return out


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Antialiased bicubic resize of [H, W] or [H, W, C] to `size` = (height, width).

    Any numeric dtype in; float32 out, same value scale as the input, not clipped (the cubic
    kernel overshoots slightly at edges).
    """
    return resize_region(image, size, (0, 0, size[0], size[1]))


def resize_region(image: np.ndarray, size: Sequence[int], box: Sequence[int]) -> np.ndarray:
    """The window `box` = (top, left, height, width) of `resize(image, size)`, computed cheaply.

    Only the input pixels inside the kernel support of the window are read (and converted to
    float): the window's footprint in the input plus a margin of CUBIC_RADIUS * (input/output
    scale) pixels, i.e. 4 input pixels for a x0.5 downscale. The result equals cropping the
    resized whole image everywhere, also at the image border, where both truncate the kernel and
    renormalise its weights.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f'resize expects [H, W] or [H, W, C], got shape {image.shape}')
    out_h, out_w = int(size[0]), int(size[1])
    top, left, height, width = (int(v) for v in box)
    if min(out_h, out_w, height, width) <= 0:
        raise ValueError(f'resize: empty size {size} or box {box}')
    if top < 0 or left < 0 or top + height > out_h or left + width > out_w:
        raise ValueError(f'resize: box {box} lies outside the output size {size}')
    in_h, in_w = image.shape[:2]
    rows, r0, r1 = _plan(in_h, out_h, top, top + height)
    cols, c0, c1 = _plan(in_w, out_w, left, left + width)
    # The float32 window, zero where the kernel reaches past the image (weight 0 there).
    x = np.zeros((r1 - r0, c1 - c0) + image.shape[2:], np.float32)
    x[max(-r0, 0):min(in_h, r1) - r0, max(-c0, 0):min(in_w, c1) - c0] = (
        image[max(r0, 0):min(in_h, r1), max(c0, 0):min(in_w, c1)])
    return _apply_taps(_apply_taps(x, 0, rows), 1, cols)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [...] in 0..255 -> float32 [...] in [0, 1]."""
    if image.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image, got {image.dtype}')
    return image.astype(np.float32) * np.float32(1 / 255)


def half_size(height: int, width: int) -> tuple[int, int]:
    """Size of the half-resolution model input (and depth map) for an H x W photo.

    Rounds down, like the original code's `imresize(photo, 0.5)`.
    """
    return height // 2, width // 2


def level_output_size(crop: int, level: int) -> int:
    """Side of level `level`'s output for a `crop` x `crop` half-resolution input patch.

    Level 1 (finest) is 2 * crop (the full-resolution photo), level 7 is 2 * crop / 64.
    """
    if not 1 <= level <= len(LEVELS):
        raise ValueError(f'level must be in 1..{len(LEVELS)}, got {level}')
    if crop <= 0 or crop % SIZE_MULTIPLE:
        raise ValueError(f'crop size must be a positive multiple of {SIZE_MULTIPLE}, got {crop}')
    return 2 * crop // 2 ** (level - 1)


def check_depth_size(depth_hw: Sequence[int], photo_hw: Sequence[int], what: str) -> None:
    """Raises ValueError unless a depth map of size depth_hw is half of photo_hw (+-1 pixel)."""
    for axis, d, p in zip(('height', 'width'), depth_hw, photo_hw):
        if abs(2 * d - p) > 2:
            raise ValueError(
                f'{what}: depth map is {depth_hw[0]}x{depth_hw[1]} but the photo is '
                f'{photo_hw[0]}x{photo_hw[1]}; the depth {axis} must be half the photo {axis} '
                f'({p / 2:g}, +-1 pixel)')


def make_model_input(photo: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
    """The model input for a whole photo.

    Args:
      photo: uint8 [H, W, 3].
      depth: uint8 [h, w] or [h, w, 1] with (h, w) = half_size(H, W) up to one pixel (resized to
        exactly that when it differs), near = bright; None for the `rgb` configuration.

    Returns:
      float32 [H // 2, W // 2, 4] (R, G, B, depth) or [H // 2, W // 2, 3] without depth, in [0, 1].
    """
    if photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f'photo must be [H, W, 3], got shape {photo.shape}')
    size = half_size(*photo.shape[:2])
    rgb = np.clip(resize(to_float(photo), size), 0.0, 1.0)
    if depth is None:
        return rgb
    return np.concatenate([rgb, depth_channel(depth, photo.shape[:2])], axis=-1)


def depth_channel(depth: np.ndarray, photo_hw: Sequence[int]) -> np.ndarray:
    """uint8 depth [h, w] or [h, w, 1] (half of photo_hw, +-1) -> float32 [H/2, W/2, 1] in [0, 1].

    The map is resized to exactly half_size(*photo_hw) when it is one pixel off.
    """
    depth = depth[..., 0] if depth.ndim == 3 else depth
    if depth.ndim != 2:
        raise ValueError(f'depth must be [h, w] or [h, w, 1], got shape {depth.shape}')
    check_depth_size(depth.shape, photo_hw, 'make_model_input')
    size = half_size(*photo_hw)
    out = to_float(depth)
    if out.shape != size:
        out = np.clip(resize(out, size), 0.0, 1.0)
    return out[..., None]


def normalize_depth(depth: np.ndarray, photo_hw: Sequence[int], *, far_is_bright: bool = False
                    ) -> np.ndarray:
    """Turns a depth/disparity map of any resolution and dtype into the model's depth channel.

    Resizes to half_size(*photo_hw) (the resize above), then stretches the values to the full
    0..255 range like the MegaDepth maps of EBB!. Set `far_is_bright` for metric depth (large =
    far) so that the result is near = bright. A constant map (to float32 precision) gives all
    zeros.

    Args:
      depth: [h, w] or [h, w, 1], any real dtype, finite.
      photo_hw: (H, W) of the photo the map belongs to.

    Returns:
      uint8 [H // 2, W // 2].
    """
    depth = np.asarray(depth)
    depth = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
    if depth.ndim != 2:
        raise ValueError(f'depth map must be [h, w] or [h, w, 1], got shape {depth.shape}')
    depth = depth.astype(np.float32)
    if not np.all(np.isfinite(depth)):
        raise ValueError('depth map has NaN or infinite values')
    depth = resize(depth, half_size(*photo_hw))
    if far_is_bright:
        depth = -depth
    lo, hi = float(depth.min()), float(depth.max())
    # A constant map resizes to float32 rounding noise, which stretching would blow up.
    if hi - lo <= 1e-5 * max(abs(hi), abs(lo)):
        return np.zeros(depth.shape, np.uint8)
    return np.round((depth - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def pad_to_shape(image: np.ndarray, height: int, width: int, mode: str = 'reflect') -> np.ndarray:
    """Pads [H, W, ...] at the bottom and right to [height, width, ...] (numpy pad `mode`)."""
    pad_h, pad_w = height - image.shape[0], width - image.shape[1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f'cannot pad {image.shape[:2]} to the smaller {(height, width)}')
    pads = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pads, mode=mode)


def round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple


def parse_size(text: str, field: str, multiple: int = 1) -> tuple[int, int]:
    """'512x768' -> (512, 768), both positive multiples of `multiple`; ValueError naming `field`."""
    try:
        h, w = (int(v) for v in str(text).lower().split('x'))
    except ValueError:
        raise ValueError(f'{field} must look like 512x768, got {text!r}') from None
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f'{field} must be positive multiples of {multiple}, got {text!r}')
    return h, w
