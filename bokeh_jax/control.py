"""Aperture and focus control: what a conditioned PyNET is told besides the photo and depth.

A conditioned model (config.model.condition) receives, after the usual RGB(+depth) channels, one
or two control maps at the input's resolution:

- 'aperture': s = 2 / N everywhere (N the f-number; s = 1 at f/2, the scale of Bokehlicious,
  ICCV 2025). Larger s = a wider aperture = more blur.
- 'aperture_focus': s, and the signed defocus map s * (disparity - focus_disparity) (BokehMe's
  formula, CVPR 2022): zero on the focal plane, its sign tells near from far.

The thin-lens blur of a point grows with the aperture diameter, i.e. with 1 / N, so the
synthetic renderer's blur strength at f-number N is `blur_strength(strength_at_f2, N)`, the one
mapping from f-number to blur used everywhere (data generation, sweeps, the page).

PyNET reads the photo at half resolution, so on its own it cannot return the full-resolution
detail of what is in focus, nor a blur of a pixel or two: `focus_detail` keeps the photo where the
blur disc is at most a pixel and the photo blurred by its disc up to two (config.render.
focus_detail; a deviation from the paper, for conditioned models only).
"""

import numpy as np
import scipy.ndimage

from bokeh_jax import classical, image_ops

CONDITIONS = ('none', 'aperture', 'aperture_focus')
REFERENCE_FNUMBER = 2.0  # s = 1 here
FNUMBER_RANGE = (1.0, 32.0)  # what the flags and the page accept
# The full stops from f/2 to f/16: the default set the synthetic builder draws from.
FULL_STOPS = (2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0)


def check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f'model.condition must be one of {CONDITIONS}; got {condition!r}')
    return condition


def condition_channels(condition: str) -> int:
    """How many control maps follow the RGB(+depth) channels: 0, 1 or 2."""
    return CONDITIONS.index(check_condition(condition))


def check_fnumber(value: float, what: str = 'f-number') -> float:
    """`value` as a float inside FNUMBER_RANGE, else a ValueError naming `what`."""
    try:
        fnumber = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be a number (an f-number such as 2.8); got {value!r}') from None
    low, high = FNUMBER_RANGE
    if not np.isfinite(fnumber) or not low <= fnumber <= high:
        raise ValueError(f'{what} must be an f-number between {low:g} and {high:g}; got {value!r}')
    return fnumber


def aperture_scale(fnumber) -> np.ndarray:
    """s = 2 / N (float32; array in, array out)."""
    return (REFERENCE_FNUMBER / np.asarray(fnumber, np.float32)).astype(np.float32)


def blur_strength(strength_at_f2: float, fnumber) -> np.ndarray:
    """The synthetic renderer's blur strength (disc diameter / image height per unit of
    |disparity - focus|) at f-number N: proportional to the aperture diameter, i.e. to s."""
    return (strength_at_f2 * aperture_scale(fnumber)).astype(np.float32)


def condition_maps(condition: str, fnumber, disparity: np.ndarray | None = None,
                   focus_disparity=None) -> np.ndarray:
    """The control maps of a batch: float32 [N, H, W, condition_channels(condition)].

    fnumber: [N] (or a scalar); disparity: [N, H, W] or [N, H, W, 1] in [0, 1], near = 1 (only its
    shape is used for 'aperture'); focus_disparity: [N] (or a scalar), needed for 'aperture_focus'.
    """
    count = condition_channels(condition)
    if disparity is None:
        raise ValueError('condition_maps needs the disparity (or an array of its shape)')
    disparity = np.asarray(disparity, np.float32)
    if disparity.ndim == 4:
        disparity = disparity[..., 0]
    if disparity.ndim != 3:
        raise ValueError(f'disparity must be [N, H, W] or [N, H, W, 1]; got {disparity.shape}')
    n = disparity.shape[0]
    if count == 0:
        return np.zeros((*disparity.shape, 0), np.float32)
    s = np.broadcast_to(aperture_scale(fnumber).reshape(-1), (n,))[:, None, None]
    maps = [np.broadcast_to(s, disparity.shape)]
    if count == 2:
        if focus_disparity is None:
            raise ValueError("condition 'aperture_focus' needs focus_disparity")
        focus = np.broadcast_to(np.asarray(focus_disparity, np.float32).reshape(-1), (n,))
        maps.append(s * (disparity - focus[:, None, None]))
    return np.stack(maps[:count], axis=-1).astype(np.float32)


def append_condition(x: np.ndarray, condition: str, fnumber, focus_disparity=None) -> np.ndarray:
    """x [N, H, W, C] (C = 3 RGB or 4 RGB + depth, depth last) followed by its control maps.
    'aperture_focus' reads the disparity from channel 3, so it needs C = 4."""
    x = np.asarray(x, np.float32)
    if condition_channels(condition) == 0:
        return x
    if condition == 'aperture_focus' and x.shape[-1] != 4:
        raise ValueError("condition 'aperture_focus' needs RGB + depth input (4 channels); got "
                         f'{x.shape[-1]}')
    disparity = x[..., 3] if x.shape[-1] == 4 else x[..., 0]
    return np.concatenate([x, condition_maps(condition, fnumber, disparity, focus_disparity)], -1)


def focus_disparity_at(disparity: np.ndarray, row: float, col: float,
                       radius: float = 0.02) -> float:
    """The disparity a click at (row, col) focuses on: the median of a square of half-side
    `radius` * the map's larger side around it (robust to a click on an edge). row and col are
    pixels of the map; outside it, a ValueError."""
    disparity = np.asarray(disparity, np.float32)
    if disparity.ndim == 3:
        disparity = disparity[..., 0]
    height, width = disparity.shape
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f'focus point ({col:g}, {row:g}) (x, y) lies outside the {width}x{height} '
                         'image')
    half = max(1, int(round(radius * max(height, width))))
    r, c = int(row), int(col)
    window = disparity[max(0, r - half):r + half + 1, max(0, c - half):c + half + 1]
    return float(np.median(window))


def focal_disparity(disparity: np.ndarray, point: tuple[float, float] | None = None,
                    radius: float = 0.02) -> float:
    """The disparity a render focuses on: `classical.auto_focus` (the middle of the frame) when
    `point` is None, else `focus_disparity_at` around point = (row, col), pixels of the map,
    clamped to it (a photo pixel scaled to a smaller map may fall on its last row or column)."""
    disparity = np.asarray(disparity, np.float32)
    if disparity.ndim == 3:
        disparity = disparity[..., 0]
    if point is None:
        return classical.auto_focus(disparity)
    row, col = point
    height, width = disparity.shape
    return focus_disparity_at(disparity, min(row, height - 1), min(col, width - 1), radius)


def check_focus_point(point: tuple[float, float], photo_hw: tuple[int, int]) -> None:
    """Raises ValueError unless `point` (x, y), as --focus gives it, is a pixel of the photo."""
    (col, row), (height, width) = point, photo_hw
    if not (0 <= col < width and 0 <= row < height):
        raise ValueError(f'--focus={col:g},{row:g} lies outside the {width}x{height} photo '
                         '(X from 0 to width - 1, Y from 0 to height - 1)')


def parse_focus(text: str) -> tuple[float, float]:
    """'X,Y' (pixels of the photo, x to the right, y down) as (x, y) floats."""
    parts = text.split(',')
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f'--focus must be X,Y (a pixel of the photo, e.g. 640,360); got '
                         f'{text!r}') from None
    return x, y


# focus_detail: the photo is kept where the blur disc is at most DETAIL_FULL_PX wide; up to
# DETAIL_NONE_PX the photo blurred by its disc (SMALL_DISCS_PX, interpolated) fades into the
# model's render.
DETAIL_FULL_PX, DETAIL_NONE_PX = 1.0, 2.0
SMALL_DISCS_PX = (1.0, 1.5, 2.0)


def small_disc_blur(photo: np.ndarray, disc: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: the photo blurred at each pixel by a disc of diameter disc [H, W]
    (pixels), interpolated between SMALL_DISCS_PX (a disc of 1 px or less: the photo)."""
    levels = [photo] + [
        np.stack([scipy.ndimage.convolve(photo[..., c], classical.disc_kernel(d / 2),
                                         mode='nearest') for c in range(photo.shape[-1])], -1)
        for d in SMALL_DISCS_PX[1:]]
    position = np.interp(disc, SMALL_DISCS_PX, np.arange(len(SMALL_DISCS_PX)))
    lower = np.minimum(position.astype(np.int32), len(levels) - 2)
    fraction = (position - lower)[..., None]
    stack = np.stack(levels)
    rows, cols = np.indices(disc.shape)
    return (stack[lower, rows, cols] * (1 - fraction)
            + stack[lower + 1, rows, cols] * fraction).astype(np.float32)


def focus_detail(output: np.ndarray, photo: np.ndarray, defocus: np.ndarray,
                 px_per_defocus: float) -> np.ndarray:
    """`output` with the photo itself where the blur disc is too small for the model to draw.

    Args:
      output: float32 [H, W, 3], a conditioned model's full-resolution render of `photo`.
      photo: float32 [H, W, 3] in [0, 1].
      defocus: the signed defocus map s * (disparity - focus) the model read (its last input
        channel, half resolution or any size: resized to [H, W]).
      px_per_defocus: the blur disc's diameter, in output pixels, per unit of |defocus| that the
        model learned (checkpoint meta `blur_px_per_defocus`: strength at f/2 x scene height).

    Returns w * small + (1 - w) * output: small = the photo blurred by its disc
    (`small_disc_blur`, the photo itself for discs of at most a pixel), w = 1 where the disc is
    at most DETAIL_FULL_PX, 0 from DETAIL_NONE_PX on, linear between. PyNET sees the photo at
    half resolution: in focus its render is at best the photo downscaled and upscaled, plus
    whatever its heads add, and a blur of a pixel or two is below what it can draw.
    """
    height, width = photo.shape[:2]
    disc = px_per_defocus * np.abs(image_ops.resize(np.asarray(defocus, np.float32),
                                                    (height, width)))
    weight = np.clip((DETAIL_NONE_PX - disc) / (DETAIL_NONE_PX - DETAIL_FULL_PX), 0.0, 1.0)
    if not weight.any():
        return np.asarray(output, np.float32)
    small = small_disc_blur(np.asarray(photo, np.float32), disc)
    weight = weight[..., None]
    return (weight * small + (1.0 - weight) * output).astype(np.float32)


def px_per_defocus(config, meta: dict) -> float | None:
    """(config: a ConfigDict or the dict of a workdir's config.json.)
    The blur disc diameter (output pixels) per unit of |defocus| a model learned: from its
    meta, else from the config it was trained with (synthetic pairs: strength at f/2 x scene
    height); None for a model without a focus map or trained on photos (no known scale)."""
    if meta.get('blur_px_per_defocus'):
        return float(meta['blur_px_per_defocus'])
    model, data = config['model'], config['data']
    if model.get('condition') != 'aperture_focus' or data['name'] != 'synthetic_bokeh':
        return None
    return float(data['synthetic']['strength']) * int(data['synthetic']['height'])
