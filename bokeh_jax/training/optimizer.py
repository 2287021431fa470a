"""The optimizer of a level: Adam on a learning-rate schedule, with the updates of the parameters
outside the level's trainable subset zeroed (the subset is a label function of parameter paths)."""

from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from bokeh_jax import model as model_lib
from bokeh_jax.training.config_checks import Stage, stages


def trainable_mask(params: Any, level: int, mode: str) -> Any:
    """Bool tree: True where a parameter is trained at `level`.

    mode 'path': every parameter on the output path of `level` (the paper: coarser levels and the
    encoder are fine-tuned too); 'level': only the group `level{level}`; comma-separated group
    names (e.g. 'level2,level1'): those groups' parameters on the path.
    """
    if mode == 'path':
        keep = lambda path: model_lib.on_output_path(path, level)
    elif mode == 'level':
        keep = lambda path: path[0] == f'level{level}'
    else:
        groups = set(mode.split(','))
        keep = lambda path: path[0] in groups and model_lib.on_output_path(path, level)
    return jax.tree_util.tree_map_with_path(lambda p, _: keep([k.key for k in p]), params)


def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """The level's learning rate by step.

    'constant' (the paper); 'cosine': a cosine decay to zero at the level's last step;
    'linear_decay': constant, then linear to zero over the last `decay_steps` (settles the noisy
    last iterates of a short constant-rate run). Any of them may start with a linear warm-up from
    zero over `warmup_steps`.
    """
    lr, warmup = cfg.learning_rate, cfg.warmup_steps
    if cfg.lr_schedule == 'cosine':
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, cfg.steps, end_value=0.0)
        return optax.cosine_decay_schedule(lr, cfg.steps)
    decay = cfg.decay_steps if cfg.lr_schedule == 'linear_decay' else 0
    pieces = [(warmup, optax.linear_schedule(0.0, lr, warmup)),
              (cfg.steps - warmup - decay, optax.constant_schedule(lr)),
              (decay, optax.linear_schedule(lr, 0.0, decay))]
    pieces = [(length, schedule) for length, schedule in pieces if length > 0]
    if len(pieces) == 1:
        return pieces[0][1]
    boundaries = np.cumsum([length for length, _ in pieces[:-1]]).tolist()
    return optax.join_schedules([schedule for _, schedule in pieces], boundaries)


def make_optimizer(config: ml_collections.ConfigDict, level: int, stage: Stage | None = None,
                   lr_scale: float = 1.0) -> optax.GradientTransformation:
    """Adam at the stage's learning rate (schedule); updates of frozen parameters are zeroed.

    stage: one of `stages(config, level)`; None = the first (the level's own settings).
    lr_scale: a factor on the whole schedule (lowered by divergence rollbacks; same state).

    The state is (Adam moments, schedule step count, mask) with the same structure at every level
    and stage (moments for all parameters; those never reached by a gradient stay zero), which is
    what lets `fresh_optimizer_per_level=False` carry the moments (`carry_moments`) to the next
    level, and any checkpoint restore into any stage's state.
    """
    cfg = (stage or stages(config, level)[0]).cfg
    schedule = learning_rate(cfg)
    if lr_scale != 1.0:
        schedule = lambda count, base=schedule: lr_scale * base(count)
    frozen = lambda params: jax.tree.map(lambda t: not t,
                                         trainable_mask(params, level, cfg.trainable))
    return optax.chain(
        optax.scale_by_adam(b1=config.train.adam_b1, b2=config.train.adam_b2,
                            eps=config.train.adam_eps),
        optax.scale_by_learning_rate(schedule),
        optax.masked(optax.set_to_zero(), frozen),
    )


def carry_moments(previous: Any, fresh: Any) -> Any:
    """`fresh` optimizer state with the Adam moments of `previous` (the schedule restarts)."""
    return (previous[0], *fresh[1:])

