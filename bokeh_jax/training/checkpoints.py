"""Resumable training state: `WORKDIR/checkpoints/<global step>/` (orbax CheckpointManager, async
saves) with items `state` (step, params, Adam state) and `meta` (level, level step, model)."""

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bokeh_jax.training import multihost


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                 options=options, item_names=('state', 'meta'))


def save_state(manager: ocp.CheckpointManager, global_step: int, state, meta: dict) -> None:
    """Async save of the (replicated) train state; every process must call it."""
    host = multihost.unreplicate(state)
    host = {'step': int(host.step), 'params': host.params, 'opt_state': host.opt_state}
    manager.save(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)), force=True)


def restore_state(manager: ocp.CheckpointManager, global_step: int, like):
    """The train state saved at `global_step`, with the structure of `like` (a TrainState)."""
    target = {'step': 0, 'params': like.params, 'opt_state': like.opt_state}
    target = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), target)
    restored = manager.restore(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
    return like.replace(step=np.int32(restored['step']), params=restored['params'],
                        opt_state=restored['opt_state'])


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return {**meta, 'global_step': step}

