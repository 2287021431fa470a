"""Evaluation (`launch.py --mode=eval`): a model's output scored on a whole split.

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

Baselines, scored exactly like the model: `identity` (the sharp photo itself as the prediction)
and `classical` (bokeh_jax.classical.render_bokeh on the sharp photo and its depth map). The eval
batches carry only the half-resolution model input, so the baselines read the full-size photos
from the TFDS records. The classical renderer costs about 1-3 s per EBB! photo on one CPU core;
`config.eval.baselines` selects which baselines run. On `synthetic_bokeh` the classical baseline
is close to perfect: that data set is rendered by the same renderer.

Multi-process: every process runs the same number of steps (the pipeline pads each share with
entries whose `valid` is False) and the same pmapped calls (the image sizes of a step are agreed
over all processes). Per-image rows are gathered so that every process returns the same summary;
process 0 writes the files.
"""

from collections.abc import Sequence
import csv
import dataclasses
import functools
import io
import json
import math
import os
from typing import Any

from absl import logging
import flax.jax_utils
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

from bokeh_jax import checkpoint
from bokeh_jax import classical
from bokeh_jax import image_ops
from bokeh_jax import input_pipeline
from bokeh_jax import lpips as lpips_lib
from bokeh_jax import metrics
from bokeh_jax import model as model_lib

# Pixels cut from every side before scoring, at full resolution (the original cuts 32).
PROTOCOL_BORDERS = {'full': 0, 'pynet': 32}
IMAGE_METRICS = ('psnr', 'ssim', 'ms_ssim')  # always scored; 'lpips' too when weights are given
BASELINES = ('identity', 'classical')
# +1 where higher is better, -1 where lower is: `model_ahead_of` is positive when the model wins.
_BETTER = {'psnr': 1.0, 'ssim': 1.0, 'ms_ssim': 1.0, 'lpips': -1.0}
_LABELS = {'psnr': 'PSNR', 'ssim': 'SSIM', 'ms_ssim': 'MS-SSIM', 'lpips': 'LPIPS'}
_INVALID = (-1, -1)  # level size recorded for the pipeline's padding entries


# ----------------------------------------------------------------------------- checks

def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOL_BORDERS:
        raise ValueError(f'config.eval.protocol must be one of {sorted(PROTOCOL_BORDERS)}, '
                         f'got {protocol!r}')
    return protocol


def check_level(level: Any, field: str = 'config.eval.level') -> int:
    if isinstance(level, bool) or level not in model_lib.LEVELS:
        raise ValueError(f'{field} must be one of the paper levels 1..7 (1 = finest), '
                         f'got {level!r}')
    return int(level)


def check_baselines(baselines: Sequence[str]) -> tuple[str, ...]:
    baselines = tuple(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f'config.eval.baselines: unknown baseline(s) {unknown}; expected some '
                         f'of {list(BASELINES)}')
    return baselines


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

    `evaluate_split` runs the two halves, `predict` and `score`, as separate pmapped programs,
    so that the model is compiled once per padded shape and only the scoring once per image size.
    """
    prediction = predict(params, batch['input'], model=model, level=level)
    scores = score(prediction, batch['target'], lpips_params, size=size, border=border,
                   names=names, lpips_net=lpips_net)
    return scores, prediction


@functools.lru_cache(maxsize=None)
def _pmapped_predict(channels: int, dtype: str, level: int, conv_impl: str):
    # Cached so that periodic validation during training reuses the compiled program.
    model = model_lib.PyNET(channels=channels, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
    return jax.pmap(functools.partial(predict, model=model, level=level))


@functools.lru_cache(maxsize=None)
def _pmapped_score(size: tuple[int, int], border: int, names: tuple[str, ...], lpips_net: str):
    return jax.pmap(functools.partial(score, size=size, border=border, names=names,
                                      lpips_net=lpips_net))


# ----------------------------------------------------------------------------- host helpers

def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Photos:
    """The full-resolution sharp photos (and depth maps) of this process's share of a split.

    Positions follow the order documented by input_pipeline.eval_iterator: process p reads the
    records [p * n, (p + 1) * n), n = ceil(N / process_count). Every read is checked against the
    id the eval batch carries at that position.
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str, max_images: int):
        builder = input_pipeline.dataset_builder(config)
        keys = [k for k in ('sharp', 'bokeh', 'depth') if k in builder.info.features]
        self._split = split
        self._records = builder.as_data_source(
            split, decoders={k: tfds.decode.SkipDecoding() for k in keys})
        total = len(self._records)
        if max_images > 0:
            total = min(total, max_images)
        share = -(-total // jax.process_count())
        self._first = min(jax.process_index() * share, total)

    def get(self, position: int, expected_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [H, W, 3] sharp photo and uint8 depth map (None without depth) at `position`."""
        index = self._first + position
        record = self._records[index]
        name = _text(record['id'])
        if name != expected_id:
            raise RuntimeError(
                f'split {self._split!r}: record {index} is {name!r} but the eval batch holds '
                f'{expected_id!r} there; evaluate and input_pipeline.eval_iterator disagree on '
                'the order of images')
        depth = _decode(record['depth']) if 'depth' in record else None
        return _decode(record['sharp']), depth


def _all_processes(tree: Any) -> Any:
    """numpy arrays of equal shape on every process -> stacked [process_count, ...]."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


def _gather_strings(strings: Sequence[str]) -> list[str]:
    """Every process's list (all of one length), concatenated in process order."""
    if jax.process_count() == 1:
        return list(strings)
    encoded = [s.encode() for s in strings]
    length = int(_all_processes(np.int32(max([len(e) for e in encoded] + [1]))).max())
    codes = np.zeros((len(encoded), length), np.uint8)
    for i, e in enumerate(encoded):
        codes[i, :len(e)] = np.frombuffer(e, np.uint8)
    gathered = _all_processes(codes).reshape(-1, length)
    return [bytes(row).rstrip(b'\0').decode() for row in gathered]


def _step_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The distinct image sizes of this step on all processes, so all make the same calls."""
    gathered = _all_processes(np.asarray(sizes, np.int32)).reshape(-1, 2)
    return sorted({tuple(int(v) for v in s) for s in gathered} - {_INVALID})


def _tile(image: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """float [h, w, 3] in [0, 1] -> uint8 [tile, 3]: scaled to fit, centred on black."""
    h, w = image.shape[:2]
    scale = min(tile[0] / h, tile[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.BICUBIC))
    out = np.zeros((*tile, 3), np.uint8)
    top, left = (tile[0] - nh) // 2, (tile[1] - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


class _Extremes:
    """The k lowest- and k highest-scoring images so far, with their grid tiles."""

    def __init__(self, k: int):
        self.k = k
        self.items = []  # (score, id, tiles [rows, T, Tw, 3]), ascending by score

    def wants(self, value: float) -> bool:
        if self.k <= 0 or math.isnan(value):
            return False
        if len(self.items) < 2 * self.k:
            return True
        return value < self.items[self.k - 1][0] or value > self.items[-self.k][0]

    def add(self, value: float, name: str, tiles: np.ndarray) -> None:
        self.items.append((value, name, tiles))
        self.items.sort(key=lambda item: (item[0], item[1]))
        if len(self.items) > 2 * self.k:
            self.items = self.items[:self.k] + self.items[-self.k:]

    def gathered(self, tile_shape: tuple[int, ...]) -> '_Extremes':
        """The k lowest and highest over all processes."""
        if jax.process_count() == 1:
            return self
        count = 2 * self.k
        values = np.full((count,), np.nan, np.float32)
        tiles = np.zeros((count, *tile_shape), np.uint8)
        names = [''] * count
        for i, (value, name, tile) in enumerate(self.items):
            values[i], tiles[i], names[i] = value, tile, name
        all_values, all_tiles = _all_processes((values, tiles))
        all_names = _gather_strings(names)
        merged = _Extremes(self.k)
        for value, name, tile in zip(all_values.reshape(-1), all_names,
                                     all_tiles.reshape(-1, *tile_shape)):
            if not math.isnan(value):
                merged.add(float(value), name, tile)
        return merged

    def columns(self) -> list[tuple[str, float, str, np.ndarray]]:
        """(caption, score, id, tiles) of the worst (lowest first), then the best (highest
        first); each image once, also when there are fewer than 2k."""
        worst = min(self.k, (len(self.items) + 1) // 2)
        out = [(f'worst {i + 1}', *self.items[i]) for i in range(worst)]
        best = self.items[worst:][::-1][:self.k]
        return out + [(f'best {i + 1}', *item) for i, item in enumerate(best)]


def grid_image(extremes: _Extremes, row_names: Sequence[str], tile: tuple[int, int],
               metric: str = 'psnr') -> Image.Image:
    """One column per image (worst, then best by `metric`), one row per `row_names` entry."""
    columns = extremes.columns()
    label_w, header_h, gap = 72, 30, 4
    height = header_h + len(row_names) * (tile[0] + gap)
    width = label_w + max(len(columns), 1) * (tile[1] + gap)
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(row_names):
        draw.text((4, header_h + r * (tile[0] + gap) + tile[0] // 2), row, fill=(0, 0, 0))
    for c, (caption, value, name, tiles) in enumerate(columns):
        x = label_w + c * (tile[1] + gap)
        # Drawn on a strip of the tile's width so that long ids are cut, not run into the next.
        header = Image.new('RGB', (tile[1], header_h), (255, 255, 255))
        header_draw = ImageDraw.Draw(header)
        header_draw.text((0, 2), f'{caption}: {_LABELS[metric]} {value:.2f}', fill=(0, 0, 0))
        header_draw.text((0, 15), name, fill=(0, 0, 0))
        canvas.paste(header, (x, 0))
        for r in range(len(row_names)):
            canvas.paste(Image.fromarray(tiles[r]), (x, header_h + r * (tile[0] + gap)))
    return canvas


# ----------------------------------------------------------------------------- the split

@dataclasses.dataclass
class SplitResult:
    """summary: see `summarize`; rows: one dict per image in split order (see `evaluate_split`);
    grid: the worst/best image grid, or None when not requested."""
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    grid: Image.Image | None = None


def _with_max_images(config: ml_collections.ConfigDict, max_images: int | None
                     ) -> ml_collections.ConfigDict:
    if max_images is None:
        return config
    if max_images < 0:
        raise ValueError(f'max_images must be >= 0 (0 = the whole split), got {max_images}')
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.max_images = int(max_images)
    return config


def evaluate_split(config: ml_collections.ConfigDict, params: Any, meta: dict, split: str, *,
                   level: int = 1, max_images: int | None = None,
                   baselines: Sequence[str] | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scores level `level`'s output on `split` (and the baselines); writes nothing.

    Every process of a multi-process run must call it (it runs pmapped steps and gathers).

    Args:
      config: the experiment config: config.data (which data set; it must be prepared),
        config.model.dtype / conv_impl, config.eval.protocol / lpips_weights / baselines /
        max_images.
      params: the PyNET tree, one copy (not replicated over devices).
      meta: at least `channels` and `input_channels` (checkpoint.load_params' meta).
      split: TFDS split name.
      level: paper level whose output is scored (1 = finest).
      max_images: only the first that many images; None = config.eval.max_images (0 = all).
      baselines: which of BASELINES to score too; None = config.eval.baselines.

    Returns:
      (summary, rows). summary: see `summarize`. rows: one dict per image in split order: id,
      height, width (the photo), level_height, level_width (the scored output), and
      `<method>_<metric>` for method in model/identity/classical: float, or None where undefined.
    """
    result = evaluate_with_grid(config, params, meta, split, level=level, max_images=max_images,
                                baselines=baselines, grid_images=0)
    return result.summary, result.rows


def evaluate_with_grid(config: ml_collections.ConfigDict, params: Any, meta: dict, split: str, *,
              level: int, max_images: int | None, baselines: Sequence[str] | None,
              grid_images: int, grid_tile: int = 0) -> SplitResult:
    """evaluate_split, plus the grid of the `grid_images` worst and best images when > 0."""
    protocol = check_protocol(config.eval.protocol)
    level = check_level(level, 'level')
    border = level_border(protocol, level)
    with_depth = config.data.builder_config == 'rgbd'
    if int(meta['input_channels']) != (4 if with_depth else 3):
        raise ValueError(
            f'the parameters take {meta["input_channels"]} input channels, but '
            f'config.data.builder_config={config.data.builder_config!r} gives '
            f'{4 if with_depth else 3}')
    baselines = check_baselines(config.eval.baselines if baselines is None else baselines)
    notes = []
    if 'classical' in baselines and not with_depth:
        notes.append('classical baseline absent: the rgb data set has no depth maps')
    methods = ('model',) + tuple(b for b in baselines if with_depth or b != 'classical')
    lpips_model = (lpips_lib.load_lpips(config.eval.lpips_weights)
                   if config.eval.lpips_weights else None)
    lpips_net = lpips_model.net if lpips_model else ''
    names = IMAGE_METRICS + (('lpips',) if lpips_model else ())
    if not lpips_model:
        notes.append('LPIPS not reported: config.eval.lpips_weights is empty')
    config = _with_max_images(config, max_images)

    num_devices = jax.local_device_count()
    batches = input_pipeline.eval_iterator(
        config, split, num_local_devices=num_devices, process_index=jax.process_index(),
        process_count=jax.process_count())
    photos = (_Photos(config, split, int(config.eval.max_images))
              if len(methods) > 1 else None)
    p_predict = _pmapped_predict(int(meta['channels']), str(config.model.dtype), level,
                                 config.model.conv_impl)
    replicated = flax.jax_utils.replicate(params)
    lpips_params = flax.jax_utils.replicate(lpips_model.params if lpips_model else {})
    row_names = ['input'] + (['classical'] if 'classical' in methods else []) + ['output',
                                                                                  'target']
    extremes = _Extremes(int(grid_images))
    tile = None

    ids, sizes, photo_sizes, values = [], [], [], []
    try:
        for step, batch in enumerate(batches):
            step_ids = [_text(v) for v in batch['id'][:, 0]]
            valid = np.asarray(batch['valid'][:, 0], bool)
            heights, widths = batch['height'][:, 0], batch['width'][:, 0]
            sizes_here = [level_size(h, w, level) if v else _INVALID
                          for v, h, w in zip(valid, heights, widths)]
            prediction = p_predict(replicated, batch['input'])
            out_shape = prediction.shape[2:4]
            images = _level_images(batch, photos, step * num_devices, sizes_here, methods,
                                   level, out_shape)
            images['model'] = prediction
            step_values = _score_step(images, sizes_here, methods, names, border, lpips_params,
                                      lpips_net)
            if extremes.k:
                tile = tile or (int(grid_tile), round(grid_tile * batch['input'].shape[3]
                                                       / batch['input'].shape[2]))
                _offer(extremes, batch, images, step_values[:, 0, names.index('psnr')],
                       step_ids, valid, sizes_here, row_names, tile)
            ids += [i if v else '' for i, v in zip(step_ids, valid)]
            sizes += sizes_here
            photo_sizes += [(int(h), int(w)) for h, w in zip(heights, widths)]
            values.append(step_values)
    finally:
        if hasattr(batches, 'close'):
            batches.close()

    # Every process holds the same number of entries, padding included: gather, then drop it.
    local = (np.asarray(sizes, np.int32).reshape(-1, 2),
             np.asarray(photo_sizes, np.int32).reshape(-1, 2),
             (np.concatenate(values) if values
              else np.zeros((0, len(methods), len(names)), np.float32)))
    sizes, photo_sizes, values = (x.reshape(-1, *x.shape[2:]) for x in _all_processes(local))
    ids = _gather_strings(ids)
    rows = []
    for i in np.flatnonzero((sizes != np.asarray(_INVALID)).any(axis=1)):
        row = {'id': ids[i], 'height': int(photo_sizes[i][0]), 'width': int(photo_sizes[i][1]),
               'level_height': int(sizes[i][0]), 'level_width': int(sizes[i][1])}
        for m, method in enumerate(methods):
            for n, name in enumerate(names):
                value = float(values[i, m, n])
                row[f'{method}_{name}'] = None if math.isnan(value) else value
        rows.append(row)
    if not rows:
        raise ValueError(f'split {split!r} of {config.data.name}/{config.data.builder_config} '
                         'has no images to evaluate')
    summary = summarize(rows, names, methods, baselines, notes, split=split, level=level,
                        protocol=protocol, border=border, meta=meta, lpips_net=lpips_net)
    grid = None
    if extremes.k and tile:
        merged = extremes.gathered((len(row_names), *tile, 3))
        grid = grid_image(merged, row_names, tile) if merged.items else None
        if grid is None:
            summary['notes'].append('no grid: PSNR is undefined for every image')
    return SplitResult(summary, rows, grid)


def _score_step(images: dict[str, Any], sizes: Sequence[tuple[int, int]],
                methods: Sequence[str], names: Sequence[str], border: int, lpips_params: Any,
                lpips_net: str) -> np.ndarray:
    """Scores of one step: float32 [D, methods, names], NaN where a metric is undefined.

    images: {'target' and each method: [D, 1, h, w, 3] padded}; sizes: each entry's image size
    (_INVALID for padding entries).
    """
    values = np.full((len(sizes), len(methods), len(names)), np.nan, np.float32)
    for size in _step_sizes(sizes):
        defined = defined_metrics(size, border, names, lpips_net)
        if not defined:
            continue
        p_score = _pmapped_score(size, border, defined, lpips_net)
        on = [d for d, s in enumerate(sizes) if s == size]
        for m, method in enumerate(methods):
            scores = jax.device_get(p_score(images[method], images['target'], lpips_params))
            for n, name in enumerate(names):
                if name in scores:
                    values[on, m, n] = scores[name][on, 0]
    return values


def _level_images(batch: dict[str, np.ndarray], photos: _Photos | None, first: int,
                  sizes: Sequence[tuple[int, int]], methods: Sequence[str], level: int,
                  out_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Target and baseline images of one step at the level's size, padded like the output:
    {'target' | baseline: float32 [D, 1, *out_shape, 3]} (zeros outside each image)."""
    num_devices = len(sizes)
    baselines = [m for m in methods if m != 'model']
    if level == 1:
        images = {'target': batch['target']}
    else:
        images = {'target': np.zeros((num_devices, 1, *out_shape, 3), np.float32)}
    for method in baselines:
        images[method] = np.zeros((num_devices, 1, *out_shape, 3), np.float32)
    for d, size in enumerate(sizes):
        if size == _INVALID or min(size) <= 0:
            continue
        if level > 1:
            images['target'][d, 0, :size[0], :size[1]] = to_level(batch['target'][d, 0], size,
                                                                  level)
        if not baselines:
            continue
        sharp, depth = photos.get(first + d, _text(batch['id'][d, 0]))
        sharp = image_ops.to_float(sharp)
        if 'identity' in baselines:
            images['identity'][d, 0, :size[0], :size[1]] = to_level(sharp, size, level)
        if 'classical' in baselines:
            rendered = classical.render_bokeh(sharp, depth)
            images['classical'][d, 0, :size[0], :size[1]] = to_level(rendered, size, level)
    return images


def _offer(extremes: _Extremes, batch: dict[str, np.ndarray], images: dict[str, Any],
           psnr: np.ndarray, ids: Sequence[str], valid: np.ndarray,
           sizes: Sequence[tuple[int, int]], row_names: Sequence[str],
           tile: tuple[int, int]) -> None:
    """Hands this step's images to `extremes`, making tiles only for those it keeps."""
    output = None
    for d, (value, name) in enumerate(zip(psnr, ids)):
        if not valid[d] or min(sizes[d]) <= 0 or not extremes.wants(float(value)):
            continue
        if output is None:
            output = np.asarray(jax.device_get(images['model']))
        h, w = sizes[d]
        half_h, half_w = image_ops.half_size(int(batch['height'][d, 0]),
                                             int(batch['width'][d, 0]))
        pictures = {'input': batch['input'][d, 0, :half_h, :half_w, :3],
                    'output': output[d, 0, :h, :w], 'target': images['target'][d, 0, :h, :w]}
        if 'classical' in images:
            pictures['classical'] = images['classical'][d, 0, :h, :w]
        extremes.add(float(value), name, np.stack([_tile(pictures[r], tile) for r in row_names]))


# ----------------------------------------------------------------------------- summary

def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    mean = float(np.mean(np.asarray(values, np.float64)))
    return mean if math.isfinite(mean) else None


def summarize(rows: Sequence[dict[str, Any]], names: Sequence[str], methods: Sequence[str],
              baselines: Sequence[str], notes: list[str], *, split: str, level: int,
              protocol: str, border: int, meta: dict, lpips_net: str = '') -> dict[str, Any]:
    """Means over the split's images.

    Returns:
      {split, level, protocol, border (pixels at this level), num_images, checkpoint_level,
      checkpoint_step (None when the parameters do not say), metrics (names), <metric>: the
      model's mean for each metric, baselines: {name: {metric: mean} or None (absent)},
      model_ahead_of: {name: {metric: model - baseline, sign flipped for LPIPS, so positive
      means the model is better} or None}, notes: why anything is null or missing}.
      A mean is None when some image lacks the metric or it is not finite; a note says why.
    """
    notes = list(notes)
    means = {method: {name: _mean([row[f'{method}_{name}'] for row in rows]) for name in names}
             for method in methods}
    for name in names:
        column = [row[f'model_{name}'] for row in rows]
        missing = sum(v is None for v in column)
        if missing:
            notes.append(
                f'{name} undefined for {missing} of {len(rows)} images: it needs sides of at '
                f'least {metric_min_size(name, lpips_net)} px after cutting the {border}-px '
                'border; its mean is not reported')
        for method in methods:
            values = [row[f'{method}_{name}'] for row in rows]
            if not missing and means[method][name] is None and all(v is not None for v in values):
                notes.append(f'{method} {name}: the mean is not finite; not reported')
    summary = {
        'split': split, 'level': level, 'protocol': protocol, 'border': border,
        'num_images': len(rows), 'checkpoint_level': meta.get('level'),
        'checkpoint_step': meta.get('step', meta.get('steps')), 'metrics': list(names),
        **means['model'],
        'baselines': {b: means.get(b) for b in baselines},
        'model_ahead_of': {},
        'notes': notes,
    }
    for b in baselines:
        if b not in means:
            summary['model_ahead_of'][b] = None
            continue
        summary['model_ahead_of'][b] = {
            name: (None if means['model'][name] is None or means[b][name] is None
                   else _BETTER[name] * (means['model'][name] - means[b][name]))
            for name in names}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small text table: means per method, then how far the model is ahead."""
    names = summary['metrics']
    step = summary['checkpoint_step']
    first = 2 + max([len('model ahead of ' + b) for b in summary['baselines']] + [len('model')])
    lines = [f"{summary['num_images']} images of split {summary['split']!r}, level "
             f"{summary['level']}, protocol {summary['protocol']} ({summary['border']}-px border)"
             f"; parameters of level {summary['checkpoint_level']}"
             + (f', step {step}' if step is not None else ''),
             ' ' * first + ''.join(f'{_LABELS[n]:>10}' for n in names)]

    def cells(values: dict | None, fmt: str) -> str:
        missing = lambda n: values is None or values[n] is None
        return ''.join(f"{'-' if missing(n) else format(values[n], fmt):>10}" for n in names)

    lines.append('model'.ljust(first) + cells({n: summary[n] for n in names}, '.4f'))
    for name, means in summary['baselines'].items():
        lines.append(name.ljust(first) + cells(means, '.4f'))
    for name, ahead in summary['model_ahead_of'].items():
        lines.append(f'model ahead of {name}'.ljust(first) + cells(ahead, '+.4f'))
    lines += [f'note: {note}' for note in summary['notes']]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- the mode

def output_dir(workdir: str, split: str, level: int, protocol: str) -> str:
    return os.path.join(workdir, 'eval', f'{split}_level{level}_{protocol}')


def write_rows(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Per-image CSV; undefined values are empty cells, floats at full precision."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: '' if v is None else (repr(v) if isinstance(v, float) else v)
                             for k, v in row.items()})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--mode=eval`: scores WORKDIR's parameters on config.data.eval_split.

    Builds the data set if it is not prepared yet, then writes
    WORKDIR/eval/<split>_level<K>_<protocol>/{per_image.csv, summary.json, grid.png} (process 0)
    and prints the summary. Returns the summary.
    """
    protocol = check_protocol(config.eval.protocol)
    level = check_level(config.eval.level)
    params_level = int(config.eval.params_level)
    if params_level:
        check_level(params_level, 'config.eval.params_level')
    check_baselines(config.eval.baselines)
    params, meta = checkpoint.load_params(workdir, params_level or None)
    trained = meta.get('level')
    if trained is not None and level < int(trained):
        raise ValueError(
            f'{checkpoint.params_dir(workdir, trained)}: these parameters were trained down to '
            f'level {trained} only, so the level-{level} output is untrained; set '
            f'config.eval.level >= {trained} or train further')
    split = config.data.eval_split
    if jax.process_index() == 0:
        input_pipeline.prepare_dataset(config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('bokeh_jax.evaluate: data set prepared')
    result = evaluate_with_grid(config, params, meta, split, level=level, max_images=None,
                                baselines=None, grid_images=int(config.eval.grid_images),
                                grid_tile=int(config.eval.grid_tile))
    summary = result.summary
    if jax.process_index() == 0:
        out = output_dir(workdir, split, level, protocol)
        os.makedirs(out, exist_ok=True)
        write_rows(os.path.join(out, 'per_image.csv'), result.rows)
        with open(os.path.join(out, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        if result.grid is not None:
            result.grid.save(os.path.join(out, 'grid.png'))
        print(format_summary(summary))
        print(f'Wrote {out}/: per_image.csv, summary.json'
              + (', grid.png' if result.grid is not None else ''))
    logging.info('eval summary: %s', summary)
    return summary
