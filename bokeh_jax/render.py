"""Full-resolution rendering of any photo with trained PyNET parameters: tiled inference.

Reading and writing the files is image_io.py's job; the photos and folders of `--mode=render`
are planned and run by render_jobs.py.

The paper's inference (SPEC "Evaluation"), made size-independent:
  1. photo uint8 [H, W, 3] -> x0.5 antialiased bicubic + depth channel, exactly the training
     preprocessing (`image_ops.make_model_input`). An odd H or W first gets one reflected row or
     column, so that the half-resolution grid is exactly x0.5 of the photo.
  2. The model input is reflect-padded at the bottom and right to multiples of 32 (the original
     cut the width down to a multiple of 32 instead; `pad_mode='crop'` does that).
  3. One global pass runs the encoder and the instance-norm levels 7..4, which need statistics of
     the whole image, and returns level 3's inputs (e1, u4a, u4b) at H/2 of the model input.
  4. Levels 3, 2, 1 have no normalization: each output pixel depends only on a window of
     (e1, u4a, u4b), so they run tile by tile on crops with a halo as wide as that window
     (HALO_BEFORE / HALO_AFTER), and the tiles agree with one whole pass up to float rounding.
  5. The level-1 output (2x the model input) is cropped back to H x W and clipped to [0, 1].

Depth convention of the paper's model: an 8-bit map at half the photo's resolution, near =
bright, stretched to the full 0..255 range (MegaDepth maps of EBB!). Any depth map is brought to
that convention by `image_ops.normalize_depth`: resized (antialiased bicubic) to the half
resolution, then stretched to 0..255; set `depth_far_is_bright` for metric depth (large = far).
A map that is already in the convention passes through unchanged.
"""

from collections.abc import Callable
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import control
from bokeh_jax import image_ops
from bokeh_jax import model as model_lib

# Receptive field of levels 3..1 in pixels of level 3's grid (H/2 of the model input), derived from
# SPEC "Structure":
#  - Level 3: a block mb(k) is two k x k 'SAME' convs on every branch, radius 2 * (k // 2) for its
#    largest branch. Along the longest chain d3 (mb5) 4, d4 (mb7) 6, d5..d8 (mb9) 4 x 8, d9 (mb7) 6,
#    d10 (mb5) 4, f (mb3) 2, so f3 reads (e1, u4a, u4b) within +-54 (skips and residuals are
#    shorter paths).
#  - A 3x3 stride-2 transposed conv with TF 'SAME' sends input i to outputs 2i, 2i+1, 2i+2, so
#    output o reads inputs o/2 - 1 and o/2 for even o, only (o-1)/2 for odd o: it is one-sided.
#  Level-1 rows [4a, 4b) read, through the head (3x3), g1 rows [4a-1, 4b]; through up(3), z2 rows
#  [2a-1, 2b]; through the 3x3 logits conv, g2 rows [2a-2, 2b+1]; through up(8), f3 rows [a-2, b];
#  hence (e1, u4a, u4b) rows [a-56, b+55). Columns likewise. tests/test_render.py checks with
#  autodiff that this is exactly the footprint of an output tile.
HALO_BEFORE = 56
HALO_AFTER = 55
# Level-1 output pixels per level-3 pixel: levels 2 and 1 each upsample x2.
FINE_SCALE = 4
PAD_MODES = ('reflect', 'crop')
# config.render.max_tile of configs/default.py.
DEFAULT_MAX_TILE = 2048
# Smallest config.render.max_tile (model-input pixels, halo included) that leaves a tile any core.
MIN_TILE = 2 * (HALO_BEFORE + HALO_AFTER + 1)

NEEDS_DEPTH = (
    "this model takes RGB + depth (4 input channels, like the paper's model), but no depth map "
    'was given. Either pass --depth=PATH: a depth map of the photo at any resolution, near = '
    'bright (MegaDepth/MiDaS-style disparity; for metric depth, where large = far, also set '
    '--config.render.depth_far_is_bright=True), or for a folder of photos a folder with '
    '<name>.png for each photo <name>.jpg; or render with a model trained without depth '
    '(--config.data.builder_config=rgb, 3 input channels), which needs none.'
)


# ----------------------------------------------------------------------------------------------
# Model input.
# ----------------------------------------------------------------------------------------------


def input_channels_of(params: Any) -> int:
    """3 (RGB) or 4 (RGB + depth): read from the first kernel (space-to-depth makes it 4x); a
    conditioned model's control maps come on top (model.condition_of)."""
    return model_lib.width_of(params)[1]


def check_depth_aspect(depth_hw: tuple[int, int], photo_hw: tuple[int, int]) -> None:
    """Raises ValueError unless a depth map of size depth_hw has the photo's aspect ratio.

    Tolerance: one depth pixel plus 1% of the width, which covers maps made at rounded sizes.
    """
    (dh, dw), (h, w) = depth_hw, photo_hw
    expected = dh * w / h
    if abs(dw - expected) > 1 + 0.01 * expected:
        raise ValueError(
            f'depth map is {dh}x{dw} (height x width) but the photo is {h}x{w}: the aspect ratios '
            f'differ ({dw / dh:.3f} vs {w / h:.3f}). Was the map made for another photo, or for '
            f'the photo before its EXIF rotation?'
        )


def model_input(
    photo: np.ndarray,
    depth: np.ndarray | None,
    *,
    input_channels: int,
    pad_mode: str = 'reflect',
    depth_far_is_bright: bool = False,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Preprocesses a whole photo like training and pads it for the model.

    Args:
      photo: uint8 [H, W, 3], H, W >= 2.
      depth: [h, w] depth map of the photo at any resolution and scale (see the module docstring),
        or None for an RGB-only model.
      input_channels: 4 (RGB + depth) or 3 (RGB only), as the parameters were trained.
      pad_mode: 'reflect' pads the half-resolution input to multiples of 32; 'crop' cuts it down to
        them, as the original code did.
      depth_far_is_bright: the map is metric depth (large = far) rather than near = bright.

    Returns:
      x: float32 [Hp, Wp, input_channels] in [0, 1], Hp and Wp multiples of 32.
      (out_h, out_w): the top-left part of the [2Hp, 2Wp] level-1 output that shows the photo:
        (H, W) with 'reflect'; (2Hp, 2Wp) with 'crop', smaller than the photo.
    """
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f'photo must be uint8 [H, W, 3]; got {photo.dtype} {photo.shape}')
    height, width = photo.shape[:2]
    if min(height, width) < 2:
        raise ValueError(f'photo is {height}x{width}; it must be at least 2x2 pixels')
    if pad_mode not in PAD_MODES:
        raise ValueError(f'config.render.pad_mode must be one of {PAD_MODES}; got {pad_mode!r}')
    if input_channels == 4 and depth is None:
        raise ValueError(NEEDS_DEPTH)
    if input_channels == 3 and depth is not None:
        raise ValueError(
            'this model is RGB-only (3 input channels, trained without depth); it takes no depth '
            'map: leave out --depth, or use a model trained on RGB + depth'
        )
    if input_channels not in (3, 4):
        raise ValueError(f'input_channels must be 3 or 4; got {input_channels}')
    if depth is not None:
        check_depth_aspect(depth.shape[:2], (height, width))

    if pad_mode == 'crop':
        size = (height, width)
    else:
        size = (height + height % 2, width + width % 2)
        photo = image_ops.pad_to_shape(photo, *size, mode='reflect')
    if depth is not None:
        depth = image_ops.normalize_depth(depth, size, far_is_bright=depth_far_is_bright)
    x = image_ops.make_model_input(photo, depth)
    h, w = x.shape[:2]
    if pad_mode == 'crop':
        m = image_ops.SIZE_MULTIPLE
        h, w = h // m * m, w // m * m
        if min(h, w) == 0:
            raise ValueError(
                f'pad_mode="crop" needs a photo of at least 64x64 pixels; got {height}x{width}'
            )
        return x[:h, :w], (2 * h, 2 * w)
    x = image_ops.pad_to_shape(x, image_ops.round_up(h), image_ops.round_up(w), mode='reflect')
    return x, (height, width)


def control_input(
    x: np.ndarray,
    photo_hw: tuple[int, int],
    *,
    condition: str,
    fnumber: float,
    focus: tuple[float, float] | None = None,
) -> tuple[np.ndarray, float | None]:
    """A conditioned model's input: `model_input`'s x followed by its control maps (control.py).

    The maps are made on the whole padded input, before any tiling, so every tile reads the same
    maps as one untiled pass.

    Args:
      x: float32 [Hp, Wp, C] (`model_input`; C = 4 for 'aperture_focus': its depth channel is the
        disparity the focus is read from).
      photo_hw: the photo's (H, W); x holds it at half resolution in its top-left corner.
      condition: 'none', 'aperture' or 'aperture_focus' (the parameters' meta).
      fnumber: the f-number to render at (control.check_fnumber's range).
      focus: (x, y), a pixel of the photo (x right, y down) to focus on; None = the classical
        renderer's `auto_focus` over the photo's part of the depth channel. Only 'aperture_focus'
        reads it.

    Returns:
      (float32 [Hp, Wp, C + control.condition_channels(condition)], the focal disparity in [0, 1],
      or None when the condition has no focus).
    """
    if control.condition_channels(condition) == 0:
        return x, None
    if condition != 'aperture_focus':
        return control.append_condition(x[None], condition, fnumber)[0], None
    if x.shape[-1] != 4:
        raise ValueError(f"condition 'aperture_focus' needs RGB + depth input; got {x.shape[-1]} "
                         'channels')
    height, width = photo_hw
    # The photo's half-resolution part of x (less in pad_mode 'crop', which cuts the photo).
    shown = (min(x.shape[0], -(-height // 2)), min(x.shape[1], -(-width // 2)))
    disparity = x[: shown[0], : shown[1], 3]
    if focus is not None:
        control.check_focus_point(focus, photo_hw)
    focus_disparity = control.focal_disparity(
        disparity, None if focus is None else (focus[1] / 2, focus[0] / 2))
    return (control.append_condition(x[None], condition, fnumber, focus_disparity)[0],
            focus_disparity)


# ----------------------------------------------------------------------------------------------
# The model, whole or in tiles.
# ----------------------------------------------------------------------------------------------


@functools.cache
def _functions(channels: int, dtype: str, conv_impl: str, condition: tuple[str, str] = (
        'none', 'input'), residual: bool | str = False) -> tuple[Callable, Callable, Callable]:
    """Jitted (whole, coarse, fine_tile) for PyNET(channels, dtype, conv_impl, condition,
    condition_method, residual); cached so they compile once per shape for the life of the
    process."""
    model = model_lib.PyNET(channels, dtype=jnp.dtype(dtype), conv_impl=conv_impl,
                            condition=condition[0], condition_method=condition[1],
                            residual=residual)

    @jax.jit
    def whole(params, x):
        return model.apply({'params': params}, x, level=1)[1]

    @jax.jit
    def coarse(params, x):
        _, skips = model.apply({'params': params}, x, stop_at=3, method=model_lib.PyNET.coarse)
        return skips

    @functools.partial(jax.jit, static_argnames='size')
    def fine_tile(params, skips, origin, size):
        # The crop origin is traced, so all tiles of an image share one compilation. skips: e1,
        # u4a, u4b (and a conditioned model's control maps, a residual model's RGB base), all on
        # level 3's grid.
        crops = [
            jax.lax.dynamic_slice(f, (0, origin[0], origin[1], 0), (1, *size, f.shape[-1]))
            for f in skips
        ]
        return model.apply({'params': params}, *crops, stop_at=1, method=model_lib.PyNET.fine)[1]

    return whole, coarse, fine_tile


def tile_spans(size: int, needed: int, crop: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis of level 3's grid, as (start, stop, crop_start).

    The tiles' outputs [start, stop) cover [0, needed); each tile reads the crop [crop_start,
    crop_start + min(crop, size)), which holds its halo [start - HALO_BEFORE, stop + HALO_AFTER)
    clipped to [0, size). At the image border the crop is shifted inwards rather than padded, so
    every layer's zero 'SAME' padding falls exactly where the whole-image pass has it, and all
    crops have one shape.
    """
    if crop >= size:
        return [(0, needed, 0)]
    core = crop - HALO_BEFORE - HALO_AFTER
    if core < 1:
        raise ValueError(f'a crop of {crop} leaves no room inside the halo')
    return [
        (start, min(start + core, needed), min(max(start - HALO_BEFORE, 0), size - crop))
        for start in range(0, needed, core)
    ]


def tile_crop(size: int, needed: int, max_crop: int) -> int:
    """Crop length along one axis: at most max_crop, shrunk so that its tiles are equal.

    With n = the fewest tiles of at most max_crop that cover `needed`, the crop is just wide
    enough for n equal cores plus the halo (the crop, not the core, is what costs time).
    """
    halo = HALO_BEFORE + HALO_AFTER
    if max_crop >= size:
        return size
    if max_crop <= halo:
        raise ValueError(f'a crop of {max_crop} leaves no room inside the halo ({halo})')
    tiles = -(-needed // (max_crop - halo))
    return min(-(-needed // tiles) + halo, size)


def _check_max_tile(max_tile: int) -> None:
    if max_tile != 0 and max_tile < MIN_TILE:
        raise ValueError(
            f'config.render.max_tile must be 0 (untiled) or >= {MIN_TILE} model-input pixels (the '
            f'halo of levels 1-3 is {HALO_BEFORE}+{HALO_AFTER} level-3 pixels); got {max_tile}'
        )



def check_settings(max_tile: int, pad_mode: str) -> None:
    """Raises ValueError naming the config.render field unless max_tile and pad_mode are valid."""
    _check_max_tile(max_tile)
    if pad_mode not in PAD_MODES:
        raise ValueError(f'config.render.pad_mode must be one of {PAD_MODES}; got {pad_mode!r}')


def render_model_input(
    params: Any,
    x: np.ndarray,
    out_hw: tuple[int, int],
    *,
    channels: int,
    max_tile: int,
    dtype: str = 'float32',
    conv_impl: str = 'xla',
    residual: bool | str = False,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Level-1 output for a padded model input, cropped to out_hw: float32 [*out_hw, 3] in [0, 1].

    Args:
      x: float32 [Hp, Wp, C] in [0, 1] (`model_input`); for a conditioned model (read from the
        params: model.condition_of) followed by its control maps (control.append_condition).
      max_tile: 0 runs levels 1-3 in one pass; otherwise the largest side, in model-input pixels
        and halo included, of the crops they run on (memory of the fine levels ~ max_tile**2).
      dtype, conv_impl: the model's computation dtype and convolutions (PyNET's attributes).
      residual: PyNET.residual, as the parameters were trained (meta.get('residual', False)).
      progress: called as progress(done, total) after the global pass and after each tile
        (total = 1 + tiles; untiled: once, (1, 1)), e.g. for a progress bar of a long render.
    """
    _check_max_tile(max_tile)
    whole, coarse, fine_tile = _functions(channels, str(jnp.dtype(dtype)), conv_impl,
                                          model_lib.condition_of(params), residual)
    params = jax.device_put(params)  # no copy when already on the device
    if max_tile == 0:
        out = np.asarray(whole(params, x[None]))[0, : out_hw[0], : out_hw[1]]
        if progress:
            progress(1, 1)
        return np.clip(out, 0.0, 1.0)

    skips = coarse(params, x[None])
    grid = skips[0].shape[1:3]
    needed = [-(-n // FINE_SCALE) for n in out_hw]
    crop = tuple(tile_crop(grid[i], needed[i], max_tile // 2) for i in (0, 1))
    rows, cols = (tile_spans(grid[i], needed[i], crop[i]) for i in (0, 1))
    logging.debug('level 3 grid %dx%d: %d x %d tiles of %dx%d', *grid, len(rows), len(cols), *crop)
    out = np.empty((FINE_SCALE * needed[0], FINE_SCALE * needed[1], 3), np.float32)
    s = FINE_SCALE
    done, total = 1, 1 + len(rows) * len(cols)
    if progress:
        jax.block_until_ready(skips)  # report the global pass when it has run
        progress(1, total)
    for r0, r1, rc in rows:
        for c0, c1, cc in cols:
            tile = fine_tile(params, skips, jnp.array([rc, cc], jnp.int32), size=crop)
            tile = np.asarray(tile)[0]
            out[s * r0 : s * r1, s * c0 : s * c1] = tile[
                s * (r0 - rc) : s * (r1 - rc), s * (c0 - cc) : s * (c1 - cc)
            ]
            done += 1
            if progress:
                progress(done, total)
    return np.clip(out[: out_hw[0], : out_hw[1]], 0.0, 1.0)


def with_focus_detail(image: np.ndarray, photo: np.ndarray, x: np.ndarray,
                      px_per_defocus: float | None) -> np.ndarray:
    """`render_model_input`'s image of `photo` (uint8) with control.focus_detail applied, reading
    the defocus map from the conditioned input x (its last channel); unchanged when
    px_per_defocus is None (no focus map, or config.render.focus_detail off)."""
    if px_per_defocus is None:
        return image
    height, width = image.shape[:2]
    defocus = x[: max(1, height // 2), : max(1, width // 2), -1]
    detailed = control.focus_detail(image, image_ops.to_float(photo[:height, :width]), defocus,
                                    px_per_defocus)
    return np.clip(detailed, 0.0, 1.0)


def render_full_resolution(
    params: Any,
    photo: np.ndarray,
    depth: np.ndarray | None = None,
    *,
    channels: int | None = None,
    max_tile: int = DEFAULT_MAX_TILE,
    pad_mode: str = 'reflect',
    depth_far_is_bright: bool = False,
    dtype: str = 'float32',
    conv_impl: str = 'xla',
    residual: bool | str = False,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Renders the bokeh version of a whole photo with level-1 PyNET parameters.

    Args:
      params: the full PyNET parameter tree (as from `checkpoint.load_params`).
      photo: uint8 [H, W, 3].
      depth: depth map [h, w] of the photo at any resolution (module docstring), or None for an
        RGB-only model.
      channels: base width of the model the params belong to; None = read from the params.
      max_tile: see `render_model_input`; 0 = untiled.
      pad_mode, depth_far_is_bright: see `model_input`.
      dtype: computation dtype.
      conv_impl: what runs the convolutions, 'xla' or 'onednn' (PyNET.conv_impl).
      residual: see `render_model_input`.
      progress: see `render_model_input`.

    Returns:
      float32 [H, W, 3] in [0, 1] (with pad_mode 'crop': [2Hp, 2Wp, 3], see `model_input`).
    """
    width = int(params['encoder']['e1']['k3a']['conv']['kernel'].shape[-1])
    channels = width if channels is None else channels
    if width != channels:
        raise ValueError(f'channels={channels} but the parameters are of a model of width {width}')
    x, out_hw = model_input(
        photo,
        depth,
        input_channels=input_channels_of(params),
        pad_mode=pad_mode,
        depth_far_is_bright=depth_far_is_bright,
    )
    return render_model_input(params, x, out_hw, channels=channels, max_tile=max_tile, dtype=dtype,
                              conv_impl=conv_impl, residual=residual, progress=progress)
