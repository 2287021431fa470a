"""Divergence of a run: what counts as one, and the data windows a rollback skips.

A step diverged when its loss is not finite, or (config.train.spike_factor > 0) when it exceeds
spike_factor times the median of the `spike_window` losses before it. With
config.train.on_divergence='rollback' the loop restores the last good checkpoint and skips the
batches from that checkpoint's step to the diverged step inclusive.

Skipping is in *data steps*: the input pipeline serves the batch of (seed, level, data step), and
level step s trains on the s-th data step (from 0) that no skipped window covers. A window is
(first, last), data steps inclusive. Config windows (config.train.levelK.skip_windows) and those
of rollbacks are one list, stored in every checkpoint's meta, so skipping is exact and resumable,
and a run given a rollback's window from the start trains exactly as the rolled-back run did.
"""

import bisect
import collections
import dataclasses
from typing import Iterator, Sequence

import numpy as np

Window = tuple[int, int]  # data steps, inclusive

ON_DIVERGENCE = ('stop', 'rollback')


def normalize(windows: Sequence[Sequence[int]]) -> list[Window]:
    """Sorted, merged windows (overlapping or adjacent ones joined)."""
    merged: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in windows):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(a, b) for a, b in merged]


def data_step(level_step: int, windows: Sequence[Window]) -> int:
    """The data step that level step `level_step` trains on (windows normalized)."""
    step = level_step
    for first, last in windows:
        if first > step:
            break
        step += last - first + 1
    return step


def segments(level_step: int, windows: Sequence[Window]) -> Iterator[tuple[int, int | None]]:
    """(first data step, number of batches or None = endless) runs of unskipped data steps that
    level steps `level_step`, `level_step` + 1, ... train on, in order."""
    current = data_step(level_step, windows)
    starts = [first for first, _ in windows]
    index = bisect.bisect_right(starts, current)
    for first, last in windows[index:]:
        yield current, first - current
        current = last + 1
    yield current, None


@dataclasses.dataclass
class Divergence(Exception):
    """A step whose loss is not finite or spiked; raised by `LossMonitor.check`."""
    level: int
    step: int  # level step whose loss diverged
    loss: float
    reason: str  # 'non-finite' or 'spike (x > f * median m)'
    metrics: dict
    last_good: int = 0  # level step of the last good state; set by the loop

    def __str__(self) -> str:
        return f'Level {self.level} step {self.step}: loss is {self.loss} ({self.reason})'


class LossMonitor:
    """Checks each step's loss in order against non-finite values and spikes over the running
    median of the last `window` accepted losses (factor 0 = spikes not checked)."""

    def __init__(self, level: int, factor: float, window: int):
        self.level, self.factor = level, float(factor)
        self.recent: collections.deque = collections.deque(maxlen=max(int(window), 1))
        self.window = int(window)

    def check(self, step: int, metrics: dict) -> None:
        loss = metrics['loss']
        if not np.isfinite(loss):
            raise Divergence(self.level, step, loss, 'non-finite', metrics)
        if self.factor > 0 and len(self.recent) >= min(self.window, 10):
            median = float(np.median(self.recent))
            if loss > self.factor * median:
                raise Divergence(self.level, step, loss,
                                 f'spike: over {self.factor:g} x the median {median:.4g} of the '
                                 f'last {len(self.recent)} losses', metrics)
        self.recent.append(loss)

    def reset(self) -> None:
        """After a rollback: the losses since the restored step no longer belong to the run."""
        self.recent.clear()
