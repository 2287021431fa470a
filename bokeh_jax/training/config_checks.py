"""Checks of a training config, and the stages of a level, before anything is compiled.

`validate_config` rejects a config that cannot train with an error that names the field. A level
runs as one or two stages (`stages`): its own steps, then an optional finetune stage.
"""

import dataclasses
from typing import Any

import ml_collections

from bokeh_jax import conditioning
from bokeh_jax import control
from bokeh_jax import input_pipeline
from bokeh_jax import model as model_lib
from bokeh_jax import residual as residual_lib
from bokeh_jax.errors import UserError

LOSS_TERMS = ('mae', 'vgg', 'ssim')
LR_SCHEDULES = ('constant', 'cosine', 'linear_decay')
LEVEL1_STARTS = ('random', 'upsample')  # config.train.level1_start
DTYPES = ('float32', 'bfloat16', 'float16')  # config.model.dtype: the computation dtype
BUILDER_CONFIGS = ('rgbd', 'rgb')  # config.data.builder_config


def level_config(config: ml_collections.ConfigDict, level: int) -> ml_collections.ConfigDict:
    return config.train[f'level{level}']


# Fields of config.train.levelK.finetune that replace the level's own in its second stage.
FINETUNE_FIELDS = ('learning_rate', 'lr_schedule', 'warmup_steps', 'decay_steps', 'trainable')


@dataclasses.dataclass(frozen=True)


class Stage:
    """A run of steps of one level with one optimizer: level steps [first, first + cfg.steps).

    cfg is the level's config with this stage's steps (its length: the learning-rate schedule
    spans it), learning rate and schedule, and `trainable` resolved to a mode.
    """
    level: int
    first: int
    cfg: ml_collections.ConfigDict
    name: str  # the config field, for messages

    @property
    def end(self) -> int:
        return self.first + self.cfg.steps


def stages(config: ml_collections.ConfigDict, level: int) -> list[Stage]:
    """The level's stages: its own steps, then `finetune.steps` more (when > 0) with the finetune's
    trainable parameters and learning rate, from fresh Adam state."""
    cfg = level_config(config, level)
    main = ml_collections.ConfigDict(cfg.to_dict())
    main.trainable = cfg.trainable or config.train.trainable
    out = [Stage(level, 0, main, f'config.train.level{level}')]
    finetune = cfg.get('finetune')
    if finetune is not None and finetune.steps:
        second = ml_collections.ConfigDict(main.to_dict())
        second.steps = finetune.steps
        for key in FINETUNE_FIELDS:
            second[key] = finetune[key]
        out.append(Stage(level, cfg.steps, second, f'config.train.level{level}.finetune'))
    return out


def level_steps(config: ml_collections.ConfigDict, level: int) -> int:
    """Steps of the level, all stages."""
    return stages(config, level)[-1].end


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Rejects a config that cannot train, naming the field, before anything is compiled."""
    order = tuple(config.train.order)
    if not order or any(level not in model_lib.LEVELS for level in order):
        raise UserError(f'config.train.order must list levels from {model_lib.LEVELS}, '
                         f'got {order}')
    if any(a <= b for a, b in zip(order, order[1:])):
        raise UserError(f'config.train.order must go from coarse to fine (strictly decreasing, '
                         f'e.g. (7, 6, 5, 4, 3, 2, 1)), got {order}')
    crop = config.data.crop_size
    if not isinstance(crop, int) or crop <= 0 or crop % model_lib.SIZE_MULTIPLE:
        raise UserError(f'config.data.crop_size must be a positive multiple of '
                         f'{model_lib.SIZE_MULTIPLE}, got {crop!r}')
    input_pipeline.cache_bytes(config.data)  # checks config.data.cache_mb
    validate_model_config(config)
    _check_choice(config.train.level1_start, LEVEL1_STARTS, 'config.train.level1_start')
    _check_trainable(config.train.trainable, 'config.train.trainable')
    for level in order:
        cfg, name = level_config(config, level), f'config.train.level{level}'
        if not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0:
            raise UserError(f'{name}.batch_size must be a positive integer, '
                             f'got {cfg.batch_size!r}')
        if cfg.batch_size % device_count:
            raise UserError(f'{name}.batch_size={cfg.batch_size} is not divisible by the '
                             f'{device_count} devices (all processes) that share it')
        weights = {term: cfg.loss[term] for term in LOSS_TERMS}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise UserError(f'{name}.loss weights must be >= 0 with at least one > 0, '
                             f'got {weights}')
        if not isinstance(cfg.steps, int) or cfg.steps <= 0:
            raise UserError(f'{name}.steps must be a positive integer, got {cfg.steps!r}')
        _check_windows(cfg.get('skip_windows', ()), f'{name}.skip_windows')
        finetune = cfg.get('finetune')
        if finetune is not None and (not isinstance(finetune.steps, int) or finetune.steps < 0):
            raise UserError(f'{name}.finetune.steps must be an integer >= 0 (0 = no finetune '
                             f'stage), got {finetune.steps!r}')
        for stage in stages(config, level):
            _check_stage(stage)
    for key in ('adam_b1', 'adam_b2'):
        value = config.train[key]
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f'config.train.{key} must be in [0, 1), got {value!r}')
    if not isinstance(config.train.adam_eps, (int, float)) or config.train.adam_eps <= 0:
        raise UserError(f'config.train.adam_eps must be > 0, got {config.train.adam_eps!r}')
    for key in ('log_every', 'checkpoint_every'):
        if config.train[key] <= 0:
            raise UserError(f'config.train.{key} must be > 0, got {config.train[key]!r}')
    _check_divergence(config.train)
    tile = config.train.val_grid_tile
    if not isinstance(tile, int) or tile < 0:
        raise UserError(f'config.train.val_grid_tile must be an integer >= 0 (0 = no grid), '
                         f'got {tile!r}')


def validate_model_config(config: ml_collections.ConfigDict) -> None:
    """Rejects model fields that would otherwise fail deep inside JAX, naming the field."""
    channels = config.model.channels
    if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
        raise UserError(f'config.model.channels must be a positive integer (the paper: 32), '
                         f'got {channels!r}')
    _check_choice(config.model.dtype, DTYPES, 'config.model.dtype')
    model_lib.check_conv_impl(config.model.conv_impl)
    _check_choice(config.model.init, model_lib.INIT_SCHEMES, 'config.model.init')
    _check_choice(config.data.builder_config, BUILDER_CONFIGS, 'config.data.builder_config')
    condition = config.model.condition
    _check_choice(condition, control.CONDITIONS, 'config.model.condition')
    _check_choice(config.model.condition_method, conditioning.METHODS,
                  'config.model.condition_method')
    for field in ('residual', 'residual_gain'):
        if not isinstance(config.model[field], bool):
            raise UserError(f'config.model.{field} must be True or False, got '
                            f'{config.model[field]!r}')
    try:
        residual_lib.from_config(config.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    if condition == 'aperture_focus' and config.data.builder_config != 'rgbd':
        raise UserError("config.model.condition='aperture_focus' reads the focus from the depth "
                        "map: it needs config.data.builder_config='rgbd', got "
                        f'{config.data.builder_config!r}')


def input_channels(config: ml_collections.ConfigDict) -> int:
    """4 for the RGB-D model (photo + depth, the paper), 3 for the RGB one."""
    return 4 if config.data.builder_config == 'rgbd' else 3


def _check_stage(stage: Stage) -> None:
    cfg, name = stage.cfg, stage.name
    _check_trainable(cfg.trainable, f'{name}.trainable')
    if not cfg.learning_rate > 0:
        raise UserError(f'{name}.learning_rate must be > 0, got {cfg.learning_rate!r}')
    _check_choice(cfg.lr_schedule, LR_SCHEDULES, f'{name}.lr_schedule')
    for key, limit in (('warmup_steps', cfg.steps - 1), ('decay_steps', cfg.steps)):
        if not isinstance(cfg[key], int) or not 0 <= cfg[key] <= limit:
            raise UserError(f'{name}.{key} must be an integer in [0, {limit}] '
                             f'(steps={cfg.steps}), got {cfg[key]!r}')
    if cfg.lr_schedule == 'linear_decay' and cfg.warmup_steps + cfg.decay_steps > cfg.steps:
        raise UserError(f'{name}.warmup_steps + decay_steps must be <= steps={cfg.steps}, '
                         f'got {cfg.warmup_steps} + {cfg.decay_steps}')


def _check_windows(windows: Any, field: str) -> None:
    ok = isinstance(windows, (tuple, list)) and all(
        isinstance(w, (tuple, list)) and len(w) == 2 and all(isinstance(v, int) for v in w)
        and 0 <= w[0] <= w[1] for w in windows)
    if not ok:
        raise UserError(f'{field} must be a list of (first, last) data steps with '
                        f'0 <= first <= last, e.g. ((500, 520),), got {windows!r}')


def _check_divergence(train: ml_collections.ConfigDict) -> None:
    _check_choice(train.on_divergence, ('stop', 'rollback'), 'config.train.on_divergence')
    factor = train.spike_factor
    if not isinstance(factor, (int, float)) or not (factor == 0 or factor > 1):
        raise UserError(f'config.train.spike_factor must be 0 (off) or > 1, got {factor!r}')
    if not isinstance(train.spike_window, int) or train.spike_window < 1:
        raise UserError(f'config.train.spike_window must be an integer >= 1, '
                        f'got {train.spike_window!r}')
    lr = train.rollback_lr_factor
    if not isinstance(lr, (int, float)) or not 0 < lr <= 1:
        raise UserError(f'config.train.rollback_lr_factor must be in (0, 1], got {lr!r}')
    if not isinstance(train.max_rollbacks, int) or train.max_rollbacks < 0:
        raise UserError(f'config.train.max_rollbacks must be an integer >= 0, '
                        f'got {train.max_rollbacks!r}')


def _check_choice(value: Any, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise UserError(f'{field} must be one of {choices}, got {value!r}')


def _check_trainable(mode: Any, field: str) -> None:
    groups = tuple(model_lib.CREATION_ORDER)
    if mode in ('path', 'level') or (
            isinstance(mode, str) and mode and set(mode.split(',')) <= set(groups)):
        return
    raise UserError(f"{field} must be 'path', 'level' or comma-separated groups of {groups} "
                     f"(e.g. 'level2,level1'), got {mode!r}")


def needs_vgg(config: ml_collections.ConfigDict) -> bool:
    return any(level_config(config, level).loss.vgg > 0 for level in config.train.order)

