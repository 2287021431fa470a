"""Reports of a scored split: the summary of means, its text table, the per-image CSV, JSON,
and the grid of the worst and best images (PIL).

evaluate.py scores; this module only arranges and writes what it returns. Files of
`--mode=eval`: WORKDIR/eval/<split>_level<K>_<protocol>/{per_image.csv, summary.json, grid.png}.
"""

from collections.abc import Sequence
import csv
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw

# +1 where higher is better, -1 where lower is: `model_ahead_of` is positive when the model wins.
_BETTER = {'psnr': 1.0, 'ssim': 1.0, 'ms_ssim': 1.0, 'lpips': -1.0}
LABELS = {'psnr': 'PSNR', 'ssim': 'SSIM', 'ms_ssim': 'MS-SSIM', 'lpips': 'LPIPS'}


# ----------------------------------------------------------------------------- summary

def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    mean = float(np.mean(np.asarray(values, np.float64)))
    return mean if math.isfinite(mean) else None


def summarize(rows: Sequence[dict[str, Any]], names: Sequence[str], methods: Sequence[str],
              baselines: Sequence[str], notes: list[str], *, split: str, level: int,
              protocol: str, border: int, meta: dict, min_sizes: dict[str, int]
              ) -> dict[str, Any]:
    """Means over the split's images (rows: see evaluate.evaluate_split).

    min_sizes: {metric: the smallest image side, after the border crop, on which it is defined}
    (eval_protocol.metric_min_size), for the note on a metric that some images lack.

    Returns:
      {split, level, protocol, border (pixels at this level), num_images, checkpoint_level,
      checkpoint_step (None when the parameters do not say), metrics (names), <metric>: the
      model's mean for each metric, baselines: {name: {metric: mean} or None (absent)},
      model_ahead_of: {name: {metric: model - baseline, sign flipped for LPIPS, so positive
      means the model is better} or None}, notes: why anything is null or missing}.
      A mean is None when some image lacks the metric or it is not finite; a note says why.
      When the rows have an `fnumber`, also per_fnumber: {'f/N': {fnumber, num_images,
      <metric>, baselines, model_ahead_of} over that f-number's images}, ascending in N.
    """
    notes = list(notes)
    summary = {
        'split': split, 'level': level, 'protocol': protocol, 'border': border,
        'num_images': len(rows), 'checkpoint_level': meta.get('level'),
        'checkpoint_step': meta.get('step', meta.get('steps')), 'metrics': list(names),
        **_group(rows, names, methods, baselines),
        'notes': notes,
    }
    for name in names:
        column = [row[f'model_{name}'] for row in rows]
        missing = sum(v is None for v in column)
        if missing:
            notes.append(
                f'{name} undefined for {missing} of {len(rows)} images: it needs sides of at '
                f'least {min_sizes[name]} px after cutting the {border}-px '
                'border; its mean is not reported')
        for method in methods:
            values = [row[f'{method}_{name}'] for row in rows]
            mean = summary[name] if method == 'model' else summary['baselines'][method][name]
            if not missing and mean is None and all(v is not None for v in values):
                notes.append(f'{method} {name}: the mean is not finite; not reported')
    if rows and 'fnumber' in rows[0]:
        summary['per_fnumber'] = {
            f'f/{fnumber:g}': {'fnumber': fnumber, **_group(
                [row for row in rows if row['fnumber'] == fnumber], names, methods, baselines)}
            for fnumber in sorted({row['fnumber'] for row in rows})}
    return summary


def _group(rows: Sequence[dict[str, Any]], names: Sequence[str], methods: Sequence[str],
           baselines: Sequence[str]) -> dict[str, Any]:
    """Means over `rows`: {num_images, <metric>: the model's, baselines, model_ahead_of} (see
    summarize)."""
    means = {method: {name: _mean([row[f'{method}_{name}'] for row in rows]) for name in names}
             for method in methods}
    group = {'num_images': len(rows), **means['model'],
             'baselines': {b: means.get(b) for b in baselines}, 'model_ahead_of': {}}
    for b in baselines:
        if b not in means:
            group['model_ahead_of'][b] = None
            continue
        group['model_ahead_of'][b] = {
            name: (None if means['model'][name] is None or means[b][name] is None
                   else _BETTER[name] * (means['model'][name] - means[b][name]))
            for name in names}
    return group


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small text table: means per method, then how far the model is ahead;
    the same per f-number when the summary has several."""
    names = summary['metrics']
    step = summary['checkpoint_step']
    first = 2 + max([len('model ahead of ' + b) for b in summary['baselines']] + [len('model')])
    lines = [f"{summary['num_images']} images of split {summary['split']!r}, level "
             f"{summary['level']}, protocol {summary['protocol']} ({summary['border']}-px border)"
             f"; parameters of level {summary['checkpoint_level']}"
             + (f', step {step}' if step is not None else ''),
             ' ' * first + ''.join(f'{LABELS[n]:>10}' for n in names)]

    def cells(values: dict | None, fmt: str) -> str:
        missing = lambda n: values is None or values[n] is None
        return ''.join(f"{'-' if missing(n) else format(values[n], fmt):>10}" for n in names)

    def table(group: dict[str, Any], prefix: str) -> None:
        lines.append((prefix + 'model').ljust(first) + cells({n: group[n] for n in names}, '.4f'))
        for name, means in group['baselines'].items():
            lines.append((prefix + name).ljust(first) + cells(means, '.4f'))
        for name, ahead in group['model_ahead_of'].items():
            lines.append(f'{prefix}model ahead of {name}'.ljust(first) + cells(ahead, '+.4f'))

    table(summary, '')
    if len(summary.get('per_fnumber', ())) > 1:  # one f-number: the table above says it all
        width = max(len(key) for key in summary['per_fnumber']) + 1
        first += width
        lines.append(f'per f-number ({len(summary["per_fnumber"])}):')
        for key, group in summary['per_fnumber'].items():
            lines.append(f'{key}: {group["num_images"]} images')
            table(group, key.ljust(width))
    lines += [f'note: {note}' for note in summary['notes']]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- files

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


def write(out: str, summary: dict[str, Any], rows: Sequence[dict[str, Any]],
          grid: Image.Image | None) -> list[str]:
    """Writes per_image.csv, summary.json and (when given) grid.png into `out`; returns the
    names written."""
    os.makedirs(out, exist_ok=True)
    write_rows(os.path.join(out, 'per_image.csv'), rows)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    written = ['per_image.csv', 'summary.json']
    if grid is not None:
        grid.save(os.path.join(out, 'grid.png'))
        written.append('grid.png')
    return written


# ----------------------------------------------------------------------------- grid of extremes

def tile(image: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
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


class Extremes:
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

    def columns(self) -> list[tuple[str, float, str, np.ndarray]]:
        """(caption, score, id, tiles) of the worst (lowest first), then the best (highest
        first); each image once, also when there are fewer than 2k."""
        worst = min(self.k, (len(self.items) + 1) // 2)
        out = [(f'worst {i + 1}', *self.items[i]) for i in range(worst)]
        best = self.items[worst:][::-1][:self.k]
        return out + [(f'best {i + 1}', *item) for i, item in enumerate(best)]


def grid_image(extremes: Extremes, row_names: Sequence[str], tile: tuple[int, int],
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
        header_draw.text((0, 2), f'{caption}: {LABELS[metric]} {value:.2f}', fill=(0, 0, 0))
        header_draw.text((0, 15), name, fill=(0, 0, 0))
        canvas.paste(header, (x, 0))
        for r in range(len(row_names)):
            canvas.paste(Image.fromarray(tiles[r]), (x, header_h + r * (tile[0] + gap)))
    return canvas
