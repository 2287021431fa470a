"""Timing primitives of the benchmark: interleaved calls, paired ratios, rows, memory, compiling.

Every figure is a `Row`: the seconds of each timed call of one function on one implementation.
Implementations are timed in one loop, their calls alternating (A B, B A, ...), so that load from
other processes and clock changes hit all of them alike; the ratio of two is the median of the
ratios of adjacent calls (`paired_ratio`).
"""

import dataclasses
import os
import resource
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from bokeh_jax import summary


@dataclasses.dataclass
class Row:
    """One benchmark figure: a function timed on one implementation."""

    name: str  # e.g. 'forward 512x768 float32', 'train L3 b1'
    impl: str  # 'jax', 'tf', 'torch'
    batch: int
    times: list[float]  # seconds per call
    flops: float | None = None  # XLA's count for the JAX program (same function for peers)
    compile_s: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ''  # 'rss' (host, whole process) or 'device'
    xla_memory_mb: float | None = None  # arguments + outputs + temporaries, from the compiler
    vs: dict[str, float] = dataclasses.field(default_factory=dict)  # peer -> t_jax / t_peer
    note: str = ''

    @property
    def median_s(self) -> float:
        return float(np.median(self.times))

    def to_json(self, peak_gflops: float | None) -> dict:
        t = np.asarray(self.times)
        med = float(np.median(t))
        gflops = self.flops / med / 1e9 if self.flops else None
        return {
            'name': self.name,
            'impl': self.impl,
            'batch': self.batch,
            'median_s': med,
            'min_s': float(t.min()),
            'max_s': float(t.max()),
            # Interquartile range relative to the median: how noisy the figure is.
            'spread': float((np.percentile(t, 75) - np.percentile(t, 25)) / med),
            'repeats': len(t),
            'images_per_s': self.batch / med,
            'gflop': self.flops / 1e9 if self.flops else None,
            'gflop_per_s': gflops,
            'peak_fraction': gflops / peak_gflops if gflops and peak_gflops else None,
            'compile_s': self.compile_s,
            'peak_memory_mb': self.peak_memory_mb,
            'memory_kind': self.memory_kind,
            'xla_memory_mb': self.xla_memory_mb,
            'vs': self.vs,
            'note': self.note,
            'times_s': [float(v) for v in t],
        }


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each fn, calls alternating between the fns (A B, B A, A B, ...).

    A fn either blocks until its result is ready and returns anything but a float (timed here),
    or returns the float seconds it measured itself (an out-of-process peer, which thereby leaves
    the pipe round trip out).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            measured = fns[name]()
            elapsed = time.perf_counter() - start
            times[name].append(measured if isinstance(measured, float) else elapsed)
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of a[i] / b[i] over calls made next to each other."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages (/proc/loadavg where it exists)."""
    try:
        with open('/proc/loadavg') as f:
            return tuple(float(v) for v in f.read().split()[:3])
    except OSError:
        return os.getloadavg()


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak


class MemoryProbe:
    """Peak memory of what runs between `start()` and `peak_mb()`.

    On CPU: the process's peak resident set (reset at start where Linux allows, so it holds the
    whole process at its fullest, not only the benchmark's share). On accelerators: the device
    allocator's peak bytes in use, which cannot be reset (the largest benchmark so far wins).
    """

    def __init__(self, device: jax.Device):
        self.device = device
        self.kind = 'rss' if device.platform == 'cpu' else 'device'

    def start(self) -> None:
        if self.kind == 'rss':
            _reset_peak_rss()

    def peak_mb(self) -> float | None:
        if self.kind == 'rss':
            return _peak_rss_mb()
        stats = self.device.memory_stats() or {}
        peak = stats.get('peak_bytes_in_use')
        return peak / 2**20 if peak is not None else None


@dataclasses.dataclass
class Compiled:
    fn: Callable
    compile_s: float
    flops: float | None
    memory_mb: float | None


def compile_jax(jitted: Any, *args: Any, flops_twin: Any = None) -> Compiled:
    """Lowers and compiles a jitted/pmapped function for `args`; reads XLA's cost and memory.

    flops_twin: the same function with XLA's own convolutions (jitted), whose FLOP count is
    reported instead, for programs with custom calls (conv_impl='onednn'), which XLA counts as
    zero FLOPs. It is only lowered, not compiled: its count is that before XLA's optimizations,
    a few % off the compiled program's.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = summary.xla_flops(compiled if flops_twin is None else flops_twin.lower(*args))
    memory_mb = None
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        memory_mb = total / 2**20
    except Exception:  # noqa: BLE001 - some backends have no memory analysis; the row says n/a
        pass
    return Compiled(compiled, compile_s, flops, memory_mb)


def block(x: Any) -> Any:
    return jax.block_until_ready(x)
