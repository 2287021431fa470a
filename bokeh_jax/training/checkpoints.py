"""Resumable training state: `WORKDIR/checkpoints/<global step>/` (orbax CheckpointManager, async
saves) with items `state` (step, params, Adam state) and `meta` (level, level step, model,
divergence history). A save killed midway leaves a folder `set_aside_incomplete` moves away."""

import os
import re
import time

from absl import logging
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



# Orbax writes a checkpoint into NAME.orbax-checkpoint-tmp* and renames it when complete.
_TMP_MARK = '.orbax-checkpoint-tmp'
_PARAMS_DIR = re.compile(r'^level_[1-7]$')


def set_aside_incomplete(workdir: str) -> list[str]:
    """Moves half-written checkpoints and parameter sets (a save killed midway: orbax's tmp
    folders, or a folder missing one of its items) to WORKDIR/incomplete/, logging each, so that
    resuming starts from the last complete one. Nothing is deleted. Returns the moved paths.

    Call on process 0 only, before any process opens the checkpoints.
    """
    moved = []
    for sub, items, complete_name in (('checkpoints', ('state', 'meta'), str.isdigit),
                                      ('params', ('params', 'meta'), _PARAMS_DIR.match)):
        root = os.path.join(workdir, sub)
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if not os.path.isdir(path):
                continue
            if _TMP_MARK in name:
                why = 'a save that never finished (orbax temporary folder)'
            elif complete_name(name) and not all(
                    os.path.isdir(os.path.join(path, item)) for item in items):
                why = f'missing one of its items {items}'
            else:
                continue
            aside = os.path.join(workdir, 'incomplete', sub,
                                 f'{name}.{time.strftime("%Y%m%d-%H%M%S")}')
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.rename(path, aside)
            logging.warning('Half-written %s (%s) skipped: moved to %s', path, why, aside)
            moved.append(aside)
    return moved
