"""The benchmark's printout and files: markdown tables (pasteable into docs) and the JSON record."""

import json
import os
from typing import Any, Sequence

from bokeh_jax.bench.timing import Row


def _fmt(value: Any, spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(cells) + ' |' for cells in rows]
    return '\n'.join(lines)


def format_row(row: Row, peer_rows: Sequence[Row]) -> str:
    """One progress line: JAX's median (min-max) and each peer's with the paired ratio."""
    def stats(r: Row) -> str:
        return (f'{r.impl} {r.median_s * 1e3:.1f} ms ({min(r.times) * 1e3:.1f}-'
                f'{max(r.times) * 1e3:.1f})')
    peers = '  '.join(f'{stats(p)} JAX/{p.impl} x{row.vs[p.impl]:.3f}' for p in peer_rows)
    return f'[bench] {row.name:<28} {stats(row)}  {peers}'


def format_table(rows: Sequence[dict], peers: Sequence[str]) -> str:
    """The main results as a markdown table."""
    head = ['benchmark', 'impl', 'median ms', 'min ms', 'max ms', 'spread', 'img/s', 'GFLOP',
            'GFLOP/s', '% peak', 'compile s', 'peak MB', *[f'JAX/{p}' for p in peers]]
    cells = []
    for r in rows:
        cells.append([
            r['name'],
            r['impl'],
            _fmt(r['median_s'] * 1e3, '.1f'),
            _fmt(r['min_s'] * 1e3, '.1f'),
            _fmt(r['max_s'] * 1e3, '.1f'),
            _fmt(r['spread'] * 100, '.0f') + '%',
            _fmt(r['images_per_s'], '.3g'),
            _fmt(r['gflop'], '.1f'),
            _fmt(r['gflop_per_s'], '.0f'),
            _fmt(r['peak_fraction'] and r['peak_fraction'] * 100, '.0f'),
            _fmt(r['compile_s'], '.1f'),
            _fmt(r['peak_memory_mb'], '.0f') + (f" {r['memory_kind']}" if r['memory_kind'] else ''),
            *[_fmt(r['vs'].get(p), '.3f') for p in peers],
        ])
    return _table(head, cells)


def format_levels(entries: Sequence[dict], peers: Sequence[str]) -> str:
    """Per-level share of the forward pass, coarsest level first, as a markdown table."""
    head = ['level', 'GFLOP', 'JAX ms', 'JAX GFLOP/s']
    for p in peers:
        head += [f'{p} ms', f'{p} GFLOP/s', f'JAX - {p} ms']
    cells = []
    for e in entries:
        rate = lambda s: e['gflop'] / s if s > 0 else None  # noqa: E731
        row = [str(e['level']), f"{e['gflop']:.1f}", f"{e['jax_s'] * 1e3:.1f}",
               _fmt(rate(e['jax_s']), '.0f')]
        for p in peers:
            row += [f"{e[f'{p}_s'] * 1e3:.1f}", _fmt(rate(e[f'{p}_s']), '.0f'),
                    f"{(e['jax_s'] - e[f'{p}_s']) * 1e3:+.1f}"]
        cells.append(row)
    return _table(head, cells)


def format_profile(entries: Sequence[dict], top: int) -> str:
    """The convolution shapes taking the most total time, as a markdown table."""
    has_tf = any('tf_s' in e for e in entries)
    head = ['input', 'kernel', 'kind', 'count', 'GFLOP each', 'JAX GFLOP/s', 'JAX total ms']
    if has_tf:
        head += ['TF GFLOP/s', 'TF total ms']
    cells = []
    for e in entries[:top]:
        row = ['x'.join(map(str, e['lhs'])), 'x'.join(map(str, e['rhs'])),
               'transposed' if e['transposed'] else 'conv', str(e['count']),
               f"{e['gflop']:.2f}", f"{e['jax_gflop_per_s']:.0f}",
               f"{e['jax_total_s'] * 1e3:.1f}"]
        if has_tf:
            row += ([f"{e['tf_gflop_per_s']:.0f}", f"{e['tf_total_s'] * 1e3:.1f}"]
                    if 'tf_s' in e else ['-', '-'])
        cells.append(row)
    return _table(head, cells)


def format_breakdown(entries: Sequence[dict]) -> str:
    """Train-step time per part (`breakdown.PARTS`), JAX and each peer side by side, in ms.

    entries: one per (benchmark, implementation): {'name', 'impl', 'parts': {part: s},
    'wall_s', 'running': {`breakdown.RUNNING` entry: s}}; parts of one benchmark become columns
    next to each other.
    """
    from bokeh_jax.bench.breakdown import PARTS, RUNNING

    columns = [(e['name'], e['impl']) for e in entries]
    head = ['part', *[f'{name} {impl} ms' for name, impl in columns]]
    cells = []
    for part in (*PARTS, 'total (profiled ops)', 'wall (one call)', *RUNNING):
        row = [part]
        for e in entries:
            if part == 'total (profiled ops)':
                value = sum(e['parts'].values())
            elif part == 'wall (one call)':
                value = e['wall_s']
            elif part in RUNNING:
                value = e['running'][part]
            else:
                value = e['parts'].get(part, 0.0)
            row.append(f'{value * 1e3:.1f}')
        cells.append(row)
    return _table(head, cells)


def write_json(results: dict, workdir: str, name: str) -> str:
    """Writes `results` to WORKDIR/<name>; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    return path
