"""Devices and processes: jax.distributed start-up, pmap replication, agreement across hosts and
the signals that stop a run at a step boundary."""

import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np

AXIS = 'batch'  # the pmap axis name of the train step


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize when asked for, or on a TPU VM / cluster when 'auto'."""
    dist = config.train.distributed
    if dist not in ('auto', 'yes', 'no'):
        raise ValueError(f"config.train.distributed must be 'auto', 'yes' or 'no', got {dist!r}")
    auto = dist == 'auto' and any(
        k in os.environ for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
    if dist == 'no' or (dist == 'auto' and not auto):
        return
    kwargs = {}
    if config.dist.coordinator_address:
        kwargs = dict(coordinator_address=config.dist.coordinator_address,
                      num_processes=config.dist.num_processes, process_id=config.dist.process_id)
    if config.dist.cpu_collectives:
        jax.config.update('jax_cpu_collectives_implementation', config.dist.cpu_collectives)
    jax.distributed.initialize(initialization_timeout=config.dist.initialization_timeout,
                               heartbeat_timeout_seconds=config.dist.heartbeat_timeout, **kwargs)


def replicate(tree: Any) -> Any:
    """One copy of every leaf on each local device, stacked on a leading axis, as pmap takes it.

    Made by a pmap over the same axis name as the train step, so that the arrays carry exactly
    the sharding the step returns (the mesh is named after the pmap axis): a state placed any
    other way compiles the step a second time at its second call.
    """
    if not jax.tree.leaves(tree):
        return tree
    count = jax.local_device_count()
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))), tree)
    return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def unreplicate(tree: Any) -> Any:
    """Host numpy copy of local device 0's replica (identical on every device after pmean)."""
    # The first addressable shard is local device 0's [1, ...] slice. It is copied to the host
    # whole and indexed there: indexing the device array (x[0], or shard.data[0]) dispatches one
    # gather per leaf (seconds for PyNET's 440 tensors and their Adam moments).
    # A copy, not a view: the train step donates (overwrites) these buffers while an async
    # checkpoint may still be writing the host arrays.
    return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data)[0], tree)


def all_processes_agree(flag: bool) -> bool:
    """True if `flag` is set on any process (an all-gather: a collective every process calls)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def should_stop(stop: 'StopRequest', step_id: int) -> bool:
    """Whether every process stops before this step (to save and exit).

    One process: a SIGTERM / SIGINT was caught (StopRequest). Several: JAX's preemption sync
    point (jax.distributed's preemption service, whose notifier catches SIGTERM): once any process
    got the signal, all of them agree on the same step without a collective at every step.
    step_id: increases by one at every call, on every process alike.
    """
    if jax.process_count() == 1:
        return stop.signal is not None
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step_id):
        stop.signal = signal.SIGTERM
        return True
    return False


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and leaves at the next step boundary.

    On a multi-process run SIGTERM is left to JAX's preemption notifier (installed by
    jax.distributed.initialize, which a Python handler would replace), and SIGINT keeps its
    default (KeyboardInterrupt): a flag on one process alone could not stop the others.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def describe(self) -> str:
        if jax.process_count() > 1:
            return 'a preemption notice (SIGTERM to a process; all processes agreed on the step)'
        return f'signal {self.signal}'

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Training stopped on a signal after saving its state; re-run the command to resume."""
