"""Divergence rules (bokeh_jax/training/divergence.py): skipped windows and loss spikes."""

import pytest

from bokeh_jax.training import divergence


def test_level_steps_map_to_unskipped_data_steps():
    windows = divergence.normalize([(8, 9), (3, 4), (5, 5)])
    assert windows == [(3, 5), (8, 9)]
    served = [divergence.data_step(s, windows) for s in range(8)]
    assert served == [0, 1, 2, 6, 7, 10, 11, 12]
    # The iterator runs from any level step serve the same data steps.
    for start in range(6):
        steps = []
        for first, count in divergence.segments(start, windows):
            steps.extend(range(first, first + (count if count is not None else 8 - len(steps))))
        assert steps[:8 - start] == served[start:]


def test_loss_monitor_flags_non_finite_and_spikes():
    monitor = divergence.LossMonitor(level=3, factor=5.0, window=20)
    for step in range(12):
        monitor.check(step, {'loss': 1.0 + 0.01 * step})
    monitor.check(12, {'loss': 4.0})  # under 5x the median
    with pytest.raises(divergence.Divergence, match='Level 3 step 13: loss is 6.0 .spike'):
        monitor.check(13, {'loss': 6.0})
    with pytest.raises(divergence.Divergence, match='non-finite'):
        monitor.check(14, {'loss': float('inf')})
    off = divergence.LossMonitor(level=3, factor=0.0, window=20)
    for step in range(12):
        off.check(step, {'loss': 1.0})
    off.check(12, {'loss': 1e6})  # spikes not checked
