"""Evaluation (`launch.py --mode=eval`): a model's output scored on a whole split.

What is compared and how (borders, level sizes, where a metric is defined, the pure predict and
score steps) is eval_protocol.py; this module runs it over a split, with baselines, over all
processes, and hands the rows to reports.py.

Baselines, scored exactly like the model: `identity` (the sharp photo itself as the prediction)
and `classical` (bokeh_jax.classical.render_bokeh on the sharp photo and its depth map), both
on the full-size photos and depth maps that the eval batches carry for them
(input_pipeline.eval_iterator's `with_photos`). The classical renderer costs about 1-3 s per
EBB! photo on one CPU core; `config.eval.baselines` selects which baselines run. On
`synthetic_bokeh` the classical baseline is close to perfect: that data set is rendered by the
same renderer. Where the records say at which f-number N and focal plane the target was taken,
the classical baseline renders at them (strength control.blur_strength(DEFAULT_STRENGTH, N), the
record's focus_disparity; what a conditioned model is told), else at f/2 and classical.auto_focus.

Multi-process: every process runs the same number of steps (the pipeline pads each share with
entries whose `valid` is False) and the same pmapped calls (the image sizes of a step are agreed
over all processes). Per-image rows are gathered so that every process returns the same summary;
process 0 writes the files (reports.py arranges and writes them).

Records with an f-number (synthetic_bokeh, realbokeh) are also summarized per f-number, the
baselines included (reports.summarize's `per_fnumber`); a conditioned model (meta `condition`,
absent = 'none') gets its control maps from the input pipeline.

What is scored is explicit: `evaluate_split(params, meta, data, split, options)` takes
config.data and an `Options` (config.eval and config.model resolved once by
`Options.from_config`); only `run`, the `--mode=eval` entry, reads the whole config.
"""

from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any

from absl import logging
import flax.jax_utils
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from bokeh_jax import checkpoint
from bokeh_jax import classical
from bokeh_jax import control
from bokeh_jax import eval_protocol
from bokeh_jax import image_ops
from bokeh_jax import input_pipeline
from bokeh_jax import lpips as lpips_lib
from bokeh_jax import model as model_lib
from bokeh_jax import reports

BASELINES = ('identity', 'classical')
_INVALID = (-1, -1)  # level size recorded for the pipeline's padding entries


# ----------------------------------------------------------------------------- options

def check_baselines(baselines: Sequence[str]) -> tuple[str, ...]:
    baselines = tuple(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f'config.eval.baselines: unknown baseline(s) {unknown}; expected some '
                         f'of {list(BASELINES)}')
    return baselines


@dataclasses.dataclass(frozen=True)
class Options:
    """How a split is scored: config.eval and config.model, resolved once (`from_config`).

    level: paper level whose output is scored (1 = finest). protocol: a PROTOCOL_BORDERS key.
    baselines: some of BASELINES. max_images: only the split's first that many (0 = all).
    lpips_weights: .npz of LPIPS weights; '' = LPIPS not reported. dtype, conv_impl: the model's
    computation (PyNET's attributes). grid_images: how many worst and best images the grid
    shows (0 = no grid); grid_tile: the height in pixels of one image in it.
    """
    level: int = 1
    protocol: str = 'pynet'
    baselines: tuple[str, ...] = BASELINES
    max_images: int = 0
    lpips_weights: str = ''
    dtype: str = 'float32'
    conv_impl: str = 'xla'
    grid_images: int = 0
    grid_tile: int = 0
    # control.focus_detail on the level-1 output with this blur scale; None = not applied.
    focus_detail_px: float | None = None

    def __post_init__(self):
        eval_protocol.check_protocol(self.protocol)
        eval_protocol.check_level(self.level, 'level')
        object.__setattr__(self, 'baselines', check_baselines(self.baselines))
        if self.max_images < 0:
            raise ValueError(f'max_images must be >= 0 (0 = the whole split), got '
                             f'{self.max_images}')

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, meta: dict | None = None,
                    **overrides: Any) -> 'Options':
        """config.eval (level, protocol, baselines, max_images, lpips_weights, grid_images,
        grid_tile), config.model (dtype, conv_impl) and config.render.focus_detail (with the
        parameters' `meta`), with `overrides` replacing fields."""
        values = {'level': int(config.eval.level), 'protocol': config.eval.protocol,
                  'baselines': tuple(config.eval.baselines),
                  'max_images': int(config.eval.max_images),
                  'lpips_weights': config.eval.lpips_weights, 'dtype': str(config.model.dtype),
                  'conv_impl': config.model.conv_impl, 'grid_images': int(config.eval.grid_images),
                  'grid_tile': int(config.eval.grid_tile),
                  'focus_detail_px': (control.px_per_defocus(config, meta or {})
                                      if config.render.focus_detail else None)}
        return cls(**{**values, **overrides})


# ----------------------------------------------------------------------------- compiled steps

@functools.lru_cache(maxsize=None)
def _pmapped_predict(channels: int, dtype: str, level: int, conv_impl: str,
                     condition: tuple[str, str] = ('none', 'input'),
                     residual: bool | str = False):
    # Cached so that periodic validation during training reuses the compiled program.
    model = model_lib.PyNET(channels=channels, dtype=jnp.dtype(dtype), conv_impl=conv_impl,
                            condition=condition[0], condition_method=condition[1],
                            residual=residual)
    return jax.pmap(functools.partial(eval_protocol.predict, model=model, level=level))


@functools.lru_cache(maxsize=None)
def _pmapped_score(size: tuple[int, int], border: int, names: tuple[str, ...], lpips_net: str):
    return jax.pmap(functools.partial(eval_protocol.score, size=size, border=border,
                                      names=names, lpips_net=lpips_net))


# ----------------------------------------------------------------------------- multi-process

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


def _gather_extremes(extremes: reports.Extremes, tile_shape: tuple[int, ...]
                     ) -> reports.Extremes:
    """The k lowest and highest over all processes (tiles: uint8 `tile_shape` each)."""
    if jax.process_count() == 1:
        return extremes
    count = 2 * extremes.k
    values = np.full((count,), np.nan, np.float32)
    tiles = np.zeros((count, *tile_shape), np.uint8)
    names = [''] * count
    for i, (value, name, tile) in enumerate(extremes.items):
        values[i], tiles[i], names[i] = value, tile, name
    all_values, all_tiles = _all_processes((values, tiles))
    all_names = _gather_strings(names)
    merged = reports.Extremes(extremes.k)
    for value, name, tile in zip(all_values.reshape(-1), all_names,
                                 all_tiles.reshape(-1, *tile_shape)):
        if not math.isnan(value):
            merged.add(float(value), name, tile)
    return merged


# ----------------------------------------------------------------------------- the split

@dataclasses.dataclass
class SplitResult:
    """summary: see reports.summarize; rows: one dict per image in split order (see
    `evaluate_split`); grid: the worst/best image grid, or None when not requested."""
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    grid: Image.Image | None = None


def evaluate_split(params: Any, meta: dict, data: ml_collections.ConfigDict, split: str,
                   options: Options) -> SplitResult:
    """Scores level `options.level`'s output on `split` (and the baselines); writes nothing.

    Every process of a multi-process run must call it (it runs pmapped steps and gathers).

    Args:
      params: the PyNET tree, one copy (not replicated over devices).
      meta: at least `channels` and `input_channels` (checkpoint.load_params' meta), and
        `condition`, `condition_method` for a conditioned model (batches then carry its maps).
      data: config.data (which data set; it must be prepared).
      split: TFDS split name.
      options: how to score (see Options).

    Returns:
      SplitResult. rows: one dict per image in split order: id, height, width (the photo),
      level_height, level_width (the scored output), fnumber (only when the records have one),
      and `<method>_<metric>` for method in
      model/identity/classical: float, or None where undefined. grid: when
      options.grid_images > 0.
    """
    level, protocol = options.level, options.protocol
    border = eval_protocol.level_border(protocol, level)
    with_depth = data.builder_config == 'rgbd'
    if int(meta['input_channels']) != (4 if with_depth else 3):
        raise ValueError(
            f'the parameters take {meta["input_channels"]} input channels, but '
            f'config.data.builder_config={data.builder_config!r} gives '
            f'{4 if with_depth else 3}')
    baselines = options.baselines
    notes = []
    if 'classical' in baselines and not with_depth:
        notes.append('classical baseline absent: the rgb data set has no depth maps')
    methods = ('model',) + tuple(b for b in baselines if with_depth or b != 'classical')
    detail = (options.focus_detail_px is not None and level == 1
              and meta.get('condition', 'none') == 'aperture_focus')
    lpips_model = (lpips_lib.load_lpips(options.lpips_weights)
                   if options.lpips_weights else None)
    lpips_net = lpips_model.net if lpips_model else ''
    names = eval_protocol.IMAGE_METRICS + (('lpips',) if lpips_model else ())
    if not lpips_model:
        notes.append('LPIPS not reported: config.eval.lpips_weights is empty')

    num_devices = jax.local_device_count()
    batches = input_pipeline.eval_iterator(
        data, split, num_local_devices=num_devices, process_index=jax.process_index(),
        process_count=jax.process_count(), max_images=options.max_images,
        with_photos=len(methods) > 1 or detail, condition=meta.get('condition', 'none'))
    p_predict = _pmapped_predict(int(meta['channels']), options.dtype, level, options.conv_impl,
                                 model_lib.condition_of_meta(meta),
                                 meta.get('residual', False))
    replicated = flax.jax_utils.replicate(params)
    lpips_params = flax.jax_utils.replicate(lpips_model.params if lpips_model else {})
    row_names = ['input'] + (['classical'] if 'classical' in methods else []) + ['output',
                                                                                  'target']
    extremes = reports.Extremes(options.grid_images)
    tile = None

    ids, sizes, photo_sizes, fnumbers, values = [], [], [], [], []
    try:
        for batch in batches:
            step_ids = [str(v) for v in batch['id'][:, 0]]
            valid = np.asarray(batch['valid'][:, 0], bool)
            heights, widths = batch['height'][:, 0], batch['width'][:, 0]
            sizes_here = [eval_protocol.level_size(h, w, level) if v else _INVALID
                          for v, h, w in zip(valid, heights, widths)]
            prediction = p_predict(replicated, batch['input'])
            if detail:
                prediction = _with_focus_detail(prediction, batch, sizes_here,
                                                options.focus_detail_px)
            out_shape = prediction.shape[2:4]
            images = _level_images(batch, sizes_here, methods, level, out_shape)
            images['model'] = prediction
            step_values = _score_step(images, sizes_here, methods, names, border, lpips_params,
                                      lpips_net)
            if extremes.k:
                tile = tile or (options.grid_tile, round(options.grid_tile
                                                         * batch['input'].shape[3]
                                                         / batch['input'].shape[2]))
                _offer(extremes, batch, images, step_values[:, 0, names.index('psnr')],
                       step_ids, valid, sizes_here, row_names, tile)
            ids += [i if v else '' for i, v in zip(step_ids, valid)]
            sizes += sizes_here
            photo_sizes += [(int(h), int(w)) for h, w in zip(heights, widths)]
            if 'fnumber' in batch:
                fnumbers += [float(v) for v in batch['fnumber'][:, 0]]
            values.append(step_values)
    finally:
        if hasattr(batches, 'close'):
            batches.close()

    # Every process holds the same number of entries, padding included: gather, then drop it.
    # The records of a split either all have an f-number or none has (one TFDS feature spec).
    with_fnumber = len(fnumbers) == len(sizes)
    local = (np.asarray(sizes, np.int32).reshape(-1, 2),
             np.asarray(photo_sizes, np.int32).reshape(-1, 2),
             np.asarray(fnumbers if with_fnumber else [np.nan] * len(sizes), np.float32),
             (np.concatenate(values) if values
              else np.zeros((0, len(methods), len(names)), np.float32)))
    sizes, photo_sizes, fnumbers, values = (x.reshape(-1, *x.shape[2:])
                                            for x in _all_processes(local))
    ids = _gather_strings(ids)
    rows = []
    for i in np.flatnonzero((sizes != np.asarray(_INVALID)).any(axis=1)):
        row = {'id': ids[i], 'height': int(photo_sizes[i][0]), 'width': int(photo_sizes[i][1]),
               'level_height': int(sizes[i][0]), 'level_width': int(sizes[i][1])}
        if with_fnumber:
            row['fnumber'] = round(float(fnumbers[i]), 4)  # float32 2.8 -> 2.8
        for m, method in enumerate(methods):
            for n, name in enumerate(names):
                value = float(values[i, m, n])
                row[f'{method}_{name}'] = None if math.isnan(value) else value
        rows.append(row)
    if not rows:
        raise ValueError(f'split {split!r} of {data.name}/{data.builder_config} '
                         'has no images to evaluate')
    summary = reports.summarize(
        rows, names, methods, baselines, notes, split=split, level=level, protocol=protocol,
        border=border, meta=meta,
        min_sizes={name: eval_protocol.metric_min_size(name, lpips_net) for name in names})
    grid = None
    if extremes.k and tile:
        merged = _gather_extremes(extremes, (len(row_names), *tile, 3))
        grid = reports.grid_image(merged, row_names, tile) if merged.items else None
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
        defined = eval_protocol.defined_metrics(size, border, names, lpips_net)
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


def _with_focus_detail(prediction: Any, batch: dict[str, np.ndarray],
                       sizes: Sequence[tuple[int, int]], px_per_defocus: float) -> np.ndarray:
    """The level-1 prediction [D, 1, H, W, 3] with control.focus_detail applied per image."""
    prediction = np.array(jax.device_get(prediction))
    for d, size in enumerate(sizes):
        if size == _INVALID or min(size) <= 0:
            continue
        height, width = int(batch['height'][d, 0]), int(batch['width'][d, 0])
        half_h, half_w = image_ops.half_size(height, width)
        prediction[d, 0, :height, :width] = control.focus_detail(
            prediction[d, 0, :height, :width],
            image_ops.to_float(batch['photo'][d, 0, :height, :width]),
            batch['input'][d, 0, :half_h, :half_w, -1], px_per_defocus)
    return prediction


def _level_images(batch: dict[str, np.ndarray], sizes: Sequence[tuple[int, int]],
                  methods: Sequence[str], level: int, out_shape: Sequence[int]
                  ) -> dict[str, np.ndarray]:
    """Target and baseline images of one step at the level's size, padded like the output:
    {'target' | baseline: float32 [D, 1, *out_shape, 3]} (zeros outside each image).

    The baselines are made from the batch's full-size photos and depth maps (`with_photos`)."""
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
            images['target'][d, 0, :size[0], :size[1]] = eval_protocol.to_level(
                batch['target'][d, 0], size, level)
        if not baselines:
            continue
        height, width = int(batch['height'][d, 0]), int(batch['width'][d, 0])
        sharp = image_ops.to_float(batch['photo'][d, 0, :height, :width])
        if 'identity' in baselines:
            images['identity'][d, 0, :size[0], :size[1]] = eval_protocol.to_level(
                sharp, size, level)
        if 'classical' in baselines:
            depth = batch['depth'][d, 0, :int(batch['depth_height'][d, 0]),
                                   :int(batch['depth_width'][d, 0])]
            rendered = classical.render_bokeh(sharp, depth, **_classical_controls(batch, d))
            images['classical'][d, 0, :size[0], :size[1]] = eval_protocol.to_level(
                rendered, size, level)
    return images


def _classical_controls(batch: dict[str, np.ndarray], d: int) -> dict[str, float]:
    """render_bokeh's strength and focus for entry d: the record's f-number and focal plane where
    the batch carries them (module docstring), else the renderer's defaults."""
    controls = {}
    if 'fnumber' in batch:
        # control.blur_strength in float64, exactly the default at f/2 (the synthetic builder's)
        controls['strength'] = classical.DEFAULT_STRENGTH * float(
            control.aperture_scale(batch['fnumber'][d, 0]))
    if 'focus_disparity' in batch:
        controls['focus'] = float(batch['focus_disparity'][d, 0])
    return controls


def _offer(extremes: reports.Extremes, batch: dict[str, np.ndarray], images: dict[str, Any],
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
        extremes.add(float(value), name,
                     np.stack([reports.tile(pictures[r], tile) for r in row_names]))


# ----------------------------------------------------------------------------- the mode

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--mode=eval`: scores WORKDIR's parameters on config.data.eval_split.

    The data set must be prepared (launch.py's run_eval does it). Writes
    WORKDIR/eval/<split>_level<K>_<protocol>/{per_image.csv, summary.json, grid.png} (process 0)
    and prints the summary. Returns the summary.
    """
    eval_protocol.check_protocol(config.eval.protocol)
    level = eval_protocol.check_level(config.eval.level)
    params_level = int(config.eval.params_level)
    if params_level:
        eval_protocol.check_level(params_level, 'config.eval.params_level')
    check_baselines(config.eval.baselines)
    params, meta = checkpoint.load_params(workdir, params_level or None)
    trained = meta.get('level')
    if trained is not None and level < int(trained):
        raise ValueError(
            f'{checkpoint.params_dir(workdir, trained)}: these parameters were trained down to '
            f'level {trained} only, so the level-{level} output is untrained; set '
            f'config.eval.level >= {trained} or train further')
    split = config.data.eval_split
    options = Options.from_config(config, meta)
    result = evaluate_split(params, meta, config.data, split, options)
    summary = result.summary
    if jax.process_index() == 0:
        out = reports.output_dir(workdir, split, level, options.protocol)
        written = reports.write(out, summary, result.rows, result.grid)
        print(reports.format_summary(summary))
        print(f'Wrote {out}/: {", ".join(written)}')
    logging.info('eval summary: %s', summary)
    return summary
