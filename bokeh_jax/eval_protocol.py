"""The evaluation protocol: what is compared, at which size, with which metrics.

The protocol of the original PyNET (SPEC "Evaluation of the original"): every image in one pass,
the output clipped to [0, 1], PSNR / SSIM / MS-SSIM as TF computes them (bokeh_jax.metrics) and,
when `config.eval.lpips_weights` is set, LPIPS, per image, then averaged over the split.
Protocols: `pynet` cuts a 32-pixel border first (as the original), `full` scores the whole frame.

Sizes. The input pipeline pads every image of a split to one shape (multiples of 32, reflect).
The padded output is cropped back to the image's own size before scoring, so padding never enters
a metric. At level K an H x W photo's output covers (H // 2, W // 2) * 2**(2 - K) pixels (rounded
down; `level_size`), and the target is the part of the bokeh photo those pixels cover, downscaled
2**(K - 1) times (antialiased bicubic, image_ops.resize; `to_level`). The border shrinks with the
level likewise (`level_border`). Metrics need static shapes, so the model is compiled once per
padded shape and level, and the scoring once per distinct image size: few (EBB! has 1024 x 1536
and 1024 x 1600).

Absent values. A metric is undefined for images smaller than its window after the border crop
(`metric_min_size`: MS-SSIM 161 px, SSIM 11, LPIPS 31 alex / 16 vgg16). Such a per-image value is
empty, and a mean over images of which some lack the metric is null with a note in the summary,
never a number over a subset. Without LPIPS weights LPIPS is not reported at all (lpips.py); the
classical baseline of an `rgb` dataset (no depth maps) is null. No image is ever skipped.

evaluate.py runs these pieces over a split (pmapped, with baselines, over all processes).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import image_ops
from bokeh_jax import lpips as lpips_lib
from bokeh_jax import metrics
from bokeh_jax import model as model_lib

# Pixels cut from every side before scoring, at full resolution (the original cuts 32).
PROTOCOL_BORDERS = {'full': 0, 'pynet': 32}
IMAGE_METRICS = ('psnr', 'ssim', 'ms_ssim')  # always scored; 'lpips' too when weights are given


# ----------------------------------------------------------------------------- checks

def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOL_BORDERS:
        raise ValueError(f'config.eval.protocol must be one of {sorted(PROTOCOL_BORDERS)}, '
                         f'got {protocol!r}')
    return protocol


def check_level(level: Any, field: str = 'config.eval.level') -> int:
    if isinstance(level, bool) or level not in image_ops.LEVELS:
        raise ValueError(f'{field} must be one of the paper levels 1..7 (1 = finest), '
                         f'got {level!r}')
    return int(level)


# ----------------------------------------------------------------------------- level geometry

def level_border(protocol: str, level: int) -> int:
    """Border cut from each side of level `level`'s output: the protocol's full-resolution
    border scaled by 2**(1 - level), rounded up (32 px at level 1, 1 px at level 7)."""
    check_protocol(protocol)
    return -(-PROTOCOL_BORDERS[protocol] // 2 ** (level - 1))


def level_size(height: int, width: int, level: int) -> tuple[int, int]:
    """(height, width) of the part of level `level`'s output that shows an H x W photo; the
    rest of the output comes from padding. Level 1: 2 * (H // 2) x 2 * (W // 2)."""
    scale = model_lib.level_output_scale(level)
    half_h, half_w = image_ops.half_size(int(height), int(width))
    return int(half_h * scale), int(half_w * scale)


def to_level(image: np.ndarray, size: Sequence[int], level: int) -> np.ndarray:
    """A full-resolution image as level `level` sees it.

    Args:
      image: float32 [H, W, 3] in [0, 1], full resolution.
      size: level_size(H, W, level).
      level: paper level.

    Returns:
      float32 [size, 3] in [0, 1]: the area that the level's pixels cover, downscaled
      2**(level - 1) times (antialiased bicubic), clipped because the cubic overshoots.
    """
    factor = 2 ** (level - 1)
    region = np.asarray(image[:size[0] * factor, :size[1] * factor], np.float32)
    if factor == 1:
        return region
    return np.clip(image_ops.resize(region, size), 0.0, 1.0)


def metric_min_size(name: str, lpips_net: str = '') -> int:
    """Smallest image side (after the border crop) on which metric `name` is defined."""
    if name == 'psnr':
        return 1
    if name == 'ssim':
        return metrics.FILTER_SIZE
    if name == 'ms_ssim':
        return metrics.ms_ssim_min_size()
    if name == 'lpips':
        return lpips_lib.MIN_SIZE[lpips_net]
    raise ValueError(f'unknown metric {name!r}')


def defined_metrics(size: Sequence[int], border: int, names: Sequence[str],
                    lpips_net: str = '') -> tuple[str, ...]:
    """Those of `names` defined on images of `size` once `border` is cut from each side."""
    side = min(size) - 2 * border
    return tuple(n for n in names if side >= metric_min_size(n, lpips_net))


# ----------------------------------------------------------------------------- pure steps

def predict(params: Any, images: jax.Array, *, model: model_lib.PyNET, level: int) -> jax.Array:
    """Level `level`'s output clipped to [0, 1], as the original scores and saves it.

    Args:
      params: the PyNET parameter tree.
      images: float32 [N, H, W, C] in [0, 1], H and W multiples of 32.

    Returns:
      float32 [N, H * s, W * s, 3] in [0, 1], s = 2**(2 - level) (model.level_output_scale).
    """
    return jnp.clip(model.apply({'params': params}, images, level=level)[level], 0.0, 1.0)


def score(prediction: jax.Array, target: jax.Array, lpips_params: Any, *, size: Sequence[int],
          border: int, names: Sequence[str], lpips_net: str = '') -> dict[str, jax.Array]:
    """Per-image metrics of the top-left `size` part (the image without its padding).

    Args:
      prediction, target: float32 [N, H, W, 3] in [0, 1], H >= size[0], W >= size[1].
      lpips_params: LPIPS weights (lpips.LPIPS.params); unused without 'lpips' in names.
      size: (height, width) scored; static.
      border: pixels cut from each side of that part first.
      names: metrics to compute, all defined at this size (see `defined_metrics`).

    Returns:
      {name: float32 [N]}.
    """
    height, width = size
    prediction = metrics.crop_border(prediction[:, :height, :width], border)
    target = metrics.crop_border(target[:, :height, :width], border)
    scores = metrics.image_metrics(prediction, target, 0, [n for n in names if n != 'lpips'])
    if 'lpips' in names:
        scores['lpips'] = lpips_lib.lpips_distance(lpips_params, prediction, target, lpips_net)
    return scores


def evaluate(params: Any, batch: dict[str, jax.Array], lpips_params: Any, *,
             model: model_lib.PyNET, level: int, size: Sequence[int], border: int,
             names: Sequence[str], lpips_net: str = '') -> tuple[dict[str, jax.Array], jax.Array]:
    """The model's per-image metrics on a batch of whole images of one size (pure; pmap it).

    Args:
      params: the PyNET parameter tree.
      batch: {'input': float32 [N, H, W, C] in [0, 1] (padded, H and W multiples of 32),
        'target': float32 [N, H * s, W * s, 3] in [0, 1], the level's target padded alike}.
      lpips_params, size, border, names, lpips_net: as in `score`.
      model, level: the PyNET and the level whose output is scored.

    Returns:
      ({name: float32 [N]}, the clipped prediction float32 [N, H * s, W * s, 3]).

    `evaluate.evaluate_split` runs the two halves, `predict` and `score`, as separate pmapped
    programs, so that the model is compiled once per padded shape and only the scoring once per
    image size.
    """
    prediction = predict(params, batch['input'], model=model, level=level)
    scores = score(prediction, batch['target'], lpips_params, size=size, border=border,
                   names=names, lpips_net=lpips_net)
    return scores, prediction
