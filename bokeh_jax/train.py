"""Coarse-to-fine training of PyNET (SPEC "Training recipe"), read top to bottom.

Levels run in `config.train.order` (paper: 7, 6, ..., 1), each for its own steps, batch size,
learning rate and loss weights, each starting from the parameters the previous level ended with.
One `jax.pmap`-ped step per level; gradients and metrics are averaged over all devices of all
processes with `lax.pmean`. The trainable subset is declarative: `trainable_mask` labels every
parameter from its path, and the optimizer zeroes the updates of the rest. A level may end with a
finetune stage (`config.train.levelK.finetune`, not in the paper): more steps with another
trainable subset and learning rate, from fresh Adam state.

Workdir layout:
  checkpoints/<global step>/   resumable state (orbax CheckpointManager): params, Adam state, meta
  params/level_K/              the final parameters of every finished level (checkpoint.py)
  metrics.jsonl, tensorboard/  logs (process 0 only)

Re-running the same command resumes: finished levels are skipped, the current level restarts at
its last checkpoint, and the input pipeline serves the batch of (seed, level, step), so the result
equals an uninterrupted run. SIGTERM / SIGINT save a checkpoint and exit cleanly; a NaN or Inf
loss stops the run with an error and leaves the last good checkpoint untouched.

The model has no stochastic layers: all randomness of training is the data sampling, which the
input pipeline derives from (config.seed, level, step). That is what makes resumption exact.
"""

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from bokeh_jax import checkpoint as checkpoint_lib
from bokeh_jax import image_ops
from bokeh_jax import input_pipeline
from bokeh_jax import losses
from bokeh_jax import metrics as metrics_lib
from bokeh_jax import model as model_lib

AXIS = 'batch'
LOSS_TERMS = ('mae', 'vgg', 'ssim')
LR_SCHEDULES = ('constant', 'cosine', 'linear_decay')
LEVEL1_STARTS = ('random', 'upsample')  # config.train.level1_start


# ----------------------------------------------------------------------------- config checks


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
        raise ValueError(f'config.train.order must list levels from {model_lib.LEVELS}, '
                         f'got {order}')
    if any(a <= b for a, b in zip(order, order[1:])):
        raise ValueError(f'config.train.order must go from coarse to fine (strictly decreasing, '
                         f'e.g. (7, 6, 5, 4, 3, 2, 1)), got {order}')
    crop = config.data.crop_size
    if not isinstance(crop, int) or crop <= 0 or crop % model_lib.SIZE_MULTIPLE:
        raise ValueError(f'config.data.crop_size must be a positive multiple of '
                         f'{model_lib.SIZE_MULTIPLE}, got {crop!r}')
    input_pipeline.cache_bytes(config.data)  # checks config.data.cache_mb
    model_lib.check_conv_impl(config.model.conv_impl)
    _check_choice(config.train.level1_start, LEVEL1_STARTS, 'config.train.level1_start')
    _check_choice(config.model.init, model_lib.INIT_SCHEMES, 'config.model.init')
    _check_trainable(config.train.trainable, 'config.train.trainable')
    for level in order:
        cfg, name = level_config(config, level), f'config.train.level{level}'
        if not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0:
            raise ValueError(f'{name}.batch_size must be a positive integer, '
                             f'got {cfg.batch_size!r}')
        if cfg.batch_size % device_count:
            raise ValueError(f'{name}.batch_size={cfg.batch_size} is not divisible by the '
                             f'{device_count} devices (all processes) that share it')
        weights = {term: cfg.loss[term] for term in LOSS_TERMS}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f'{name}.loss weights must be >= 0 with at least one > 0, '
                             f'got {weights}')
        if not isinstance(cfg.steps, int) or cfg.steps <= 0:
            raise ValueError(f'{name}.steps must be a positive integer, got {cfg.steps!r}')
        finetune = cfg.get('finetune')
        if finetune is not None and (not isinstance(finetune.steps, int) or finetune.steps < 0):
            raise ValueError(f'{name}.finetune.steps must be an integer >= 0 (0 = no finetune '
                             f'stage), got {finetune.steps!r}')
        for stage in stages(config, level):
            _check_stage(stage)
    for key in ('adam_b1', 'adam_b2'):
        value = config.train[key]
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f'config.train.{key} must be in [0, 1), got {value!r}')
    if not isinstance(config.train.adam_eps, (int, float)) or config.train.adam_eps <= 0:
        raise ValueError(f'config.train.adam_eps must be > 0, got {config.train.adam_eps!r}')
    for key in ('log_every', 'checkpoint_every'):
        if config.train[key] <= 0:
            raise ValueError(f'config.train.{key} must be > 0, got {config.train[key]!r}')
    tile = config.train.val_grid_tile
    if not isinstance(tile, int) or tile < 0:
        raise ValueError(f'config.train.val_grid_tile must be an integer >= 0 (0 = no grid), '
                         f'got {tile!r}')


def _check_stage(stage: Stage) -> None:
    cfg, name = stage.cfg, stage.name
    _check_trainable(cfg.trainable, f'{name}.trainable')
    if not cfg.learning_rate > 0:
        raise ValueError(f'{name}.learning_rate must be > 0, got {cfg.learning_rate!r}')
    _check_choice(cfg.lr_schedule, LR_SCHEDULES, f'{name}.lr_schedule')
    for key, limit in (('warmup_steps', cfg.steps - 1), ('decay_steps', cfg.steps)):
        if not isinstance(cfg[key], int) or not 0 <= cfg[key] <= limit:
            raise ValueError(f'{name}.{key} must be an integer in [0, {limit}] '
                             f'(steps={cfg.steps}), got {cfg[key]!r}')
    if cfg.lr_schedule == 'linear_decay' and cfg.warmup_steps + cfg.decay_steps > cfg.steps:
        raise ValueError(f'{name}.warmup_steps + decay_steps must be <= steps={cfg.steps}, '
                         f'got {cfg.warmup_steps} + {cfg.decay_steps}')


def _check_choice(value: Any, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise ValueError(f'{field} must be one of {choices}, got {value!r}')


def _check_trainable(mode: Any, field: str) -> None:
    groups = tuple(model_lib.CREATION_ORDER)
    if mode in ('path', 'level') or (
            isinstance(mode, str) and mode and set(mode.split(',')) <= set(groups)):
        return
    raise ValueError(f"{field} must be 'path', 'level' or comma-separated groups of {groups} "
                     f"(e.g. 'level2,level1'), got {mode!r}")


def needs_vgg(config: ml_collections.ConfigDict) -> bool:
    return any(level_config(config, level).loss.vgg > 0 for level in config.train.order)


# ----------------------------------------------------------------------------- optimizer


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


def make_optimizer(config: ml_collections.ConfigDict, level: int, stage: Stage | None = None
                   ) -> optax.GradientTransformation:
    """Adam at the stage's learning rate (schedule); updates of frozen parameters are zeroed.

    stage: one of `stages(config, level)`; None = the first (the level's own settings).

    The state is (Adam moments, schedule step count, mask) with the same structure at every level
    and stage (moments for all parameters; those never reached by a gradient stay zero), which is
    what lets `fresh_optimizer_per_level=False` carry the moments (`carry_moments`) to the next
    level, and any checkpoint restore into any stage's state.
    """
    cfg = (stage or stages(config, level)[0]).cfg
    frozen = lambda params: jax.tree.map(lambda t: not t,
                                         trainable_mask(params, level, cfg.trainable))
    return optax.chain(
        optax.scale_by_adam(b1=config.train.adam_b1, b2=config.train.adam_b2,
                            eps=config.train.adam_eps),
        optax.scale_by_learning_rate(learning_rate(cfg)),
        optax.masked(optax.set_to_zero(), frozen),
    )


def carry_moments(previous: Any, fresh: Any) -> Any:
    """`fresh` optimizer state with the Adam moments of `previous` (the schedule restarts)."""
    return (previous[0], *fresh[1:])


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # steps done at the current level
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- train step


def make_train_step(model: model_lib.PyNET, level: int, loss_weights: dict[str, float],
                    tx: optax.GradientTransformation, trainable: Any = None) -> Callable:
    """The per-device step: (state, batch, vgg_params) -> (state, metrics); run under pmap.

    batch: {'input': float32 [b, c, c, C], 'target': float32 [b, s, s, 3]} on one device.
    Metrics are averaged over all devices: each weighted loss term, the total, and PSNR of the
    clipped output. `trainable` (a bool tree like the params, None = all) limits differentiation
    to those parameters: the rest get zero gradients without a backward pass through the layers
    only they feed (training levels 2 and 1 alone then costs little more than a forward pass),
    and only the trained gradients are averaged across devices.
    """
    weights = {k: float(v) for k, v in loss_weights.items() if v > 0}

    def loss_fn(params, batch, vgg_params):
        if trainable is not None:
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p),
                                  params, trainable)
        output = model.apply({'params': params}, batch['input'], level=level)[level]
        target = batch['target']
        terms = {'mae': losses.mae(output, target)}
        if 'ssim' in weights:
            terms['ssim'] = losses.ssim_loss(output, target)
        if 'vgg' in weights:
            terms['vgg'] = losses.vgg_loss(vgg_params, output, target)
        loss = sum(weights[k] * terms[k] for k in weights)
        psnr = jnp.mean(metrics_lib.psnr(jnp.clip(output, 0.0, 1.0), target))
        return loss, {'loss': loss, 'psnr': psnr, **terms}

    def step(state: TrainState, batch: dict, vgg_params: Any):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, vgg_params)
        if trainable is None:
            grads = jax.lax.pmean(grads, AXIS)
        else:
            grads = jax.tree.map(lambda g, t: jax.lax.pmean(g, AXIS) if t else g, grads, trainable)
        metrics = jax.lax.pmean(metrics, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


# ----------------------------------------------------------------------------- devices


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
    # The first addressable shard is local device 0's [1, ...] slice; indexing x[0] instead would
    # dispatch one gather per leaf (seconds for PyNET's 440 tensors and their Adam moments).
    # A copy, not a view: the train step donates (overwrites) these buffers while an async
    # checkpoint may still be writing the host arrays.
    return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data[0]), tree)


def all_processes_agree(flag: bool) -> bool:
    """True if `flag` is set on any process (so that every process stops at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and leaves at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Training stopped on a signal after saving its state; re-run the command to resume."""


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                 options=options, item_names=('state', 'meta'))


def save_state(manager: ocp.CheckpointManager, global_step: int, state: TrainState,
               meta: dict) -> None:
    """Async save of the (replicated) state; every process must call it."""
    host = unreplicate(state)
    host = {'step': int(host.step), 'params': host.params, 'opt_state': host.opt_state}
    manager.save(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)), force=True)


def restore_state(manager: ocp.CheckpointManager, global_step: int, like: TrainState) -> TrainState:
    target = {'step': 0, 'params': like.params, 'opt_state': like.opt_state}
    target = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), target)
    restored = manager.restore(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
    return TrainState(step=np.int32(restored['step']), params=restored['params'],
                      opt_state=restored['opt_state'])


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return {**meta, 'global_step': step}


# ----------------------------------------------------------------------------- logging


class Logger:
    """Metrics JSONL, TensorBoard scalars/images and a progress bar; silent on processes > 0."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
            except ImportError:
                logging.warning('tensorboardX is not installed: no TensorBoard logs')

    def scalars(self, global_step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({'global_step': global_step, **record}) + '\n')
        self.jsonl.flush()
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ('level', 'step'):
                    self.writer.add_scalar(f'level{record.get("level", "")}/{key}', value,
                                           global_step)

    def images(self, global_step: int, level: int, images: dict[str, np.ndarray]) -> None:
        if self.enabled and self.writer:
            for name, image in images.items():
                self.writer.add_image(f'level{level}/{name}', np.clip(image, 0, 1), global_step,
                                      dataformats='HWC')

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer:
                self.writer.close()


def _progress(level: int | str, start: int, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=f'level {level}', disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)


# ----------------------------------------------------------------------------- the loop


def _prepare_dataset_once(config: ml_collections.ConfigDict) -> None:
    """Builds the dataset if needed: process 0 first, the others once it is there."""
    from tfds_ebb import prepare  # the builders; the library itself only reads the data set

    prepare.prepare_dataset_once(config.data)


def initial_params(config: ml_collections.ConfigDict, input_channels: int) -> tuple[Any, str]:
    """Fresh parameters, or those of `config.train.init_from` (a workdir) for fine-tuning."""
    if config.train.init_from:
        params, meta = checkpoint_lib.load_params(config.train.init_from)
        if (meta['channels'], meta['input_channels']) != (config.model.channels, input_channels):
            raise ValueError(
                f'config.train.init_from={config.train.init_from!r} holds PyNET(channels='
                f'{meta["channels"]}, input_channels={meta["input_channels"]}), but the config '
                f'asks for channels={config.model.channels}, input_channels={input_channels}')
        return params, f'{config.train.init_from} (level {meta["level"]})'
    model = model_lib.PyNET(config.model.channels)
    params = model_lib.init_params(model, jax.random.key(config.seed), input_channels,
                                   scheme=config.model.init)
    return params, f'random ({config.model.init} init)'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every level of config.train.order in `workdir` (resuming), returns final metrics."""
    maybe_initialize_distributed(config)
    validate_config(config, jax.device_count())
    vgg_params = None
    if needs_vgg(config):
        vgg_params = losses.load_vgg19(config.train.vgg_weights)  # fails before any compute
    _prepare_dataset_once(config)

    is_main = jax.process_index() == 0
    input_channels = 4 if config.data.builder_config == 'rgbd' else 3
    model = model_lib.PyNET(config.model.channels, dtype=jnp.dtype(config.model.dtype),
                            conv_impl=config.model.conv_impl)
    model_meta = {'channels': config.model.channels, 'input_channels': input_channels,
                  'source': 'train'}
    manager = checkpoint_manager(workdir, config)
    logger = Logger(workdir, is_main)
    order = tuple(config.train.order)
    offsets = dict(zip(order, map(int, np.cumsum([0] + [level_steps(config, k) for k in order]))))
    vgg_replicated = replicate(vgg_params if vgg_params is not None else {})
    latest = latest_meta(manager)
    finished = {k for k in checkpoint_lib.saved_levels(workdir)
                if checkpoint_lib.read_meta(workdir, k).get('source') == 'train'}

    params, source = None, None
    opt_state = None  # carried between levels when fresh_optimizer_per_level is False
    summary = {}
    try:
        with StopRequest() as stop:
            for level in order:
                if level in finished:
                    params, _ = checkpoint_lib.load_params(workdir, level)
                    logging.info('Level %d already finished; skipping', level)
                    opt_state = None
                    continue
                if params is None:
                    params, source = initial_params(config, input_channels)
                    logging.info('Initial parameters: %s', source)
                if level == 1 and config.train.level1_start == 'upsample':
                    # Before any restore: a resumed level 1 gets its checkpointed parameters.
                    params = model_lib.upsampling_start(params)
                # Level step of this level's latest checkpoint (0: none): a stage that ended at or
                # before it was finished by an earlier run, and the checkpoint holds its result.
                resume = latest['level_step'] if latest and latest.get('level') == level else 0
                level_stages = stages(config, level)
                for index, stage in enumerate(level_stages):
                    last = index == len(level_stages) - 1
                    if resume >= stage.end and not last:
                        continue
                    tx = make_optimizer(config, level, stage)
                    if index or opt_state is None or config.train.fresh_optimizer_per_level:
                        opt_state = tx.init(params)  # a finetune stage always starts afresh
                    else:
                        opt_state = carry_moments(opt_state, tx.init(params))
                    state = TrainState(step=np.int32(stage.first), params=params,
                                       opt_state=opt_state)
                    if resume > 0 and resume >= stage.first:
                        restored = restore_state(manager, latest['global_step'], state)
                        # At the previous stage's last step: its parameters, this stage's fresh
                        # optimizer state.
                        state = (state.replace(params=restored.params) if resume == stage.first
                                 else restored)
                        logging.info('Resuming level %d at step %d', level, resume)
                    state = _train_level(config, workdir, stage, model, tx, state, manager,
                                         offsets[level], vgg_replicated, logger, stop, model_meta)
                    params, opt_state = state.params, state.opt_state
                    if not last:  # the score before finetuning
                        _validate(config, params, model_meta, level, logger,
                                  offsets[level] + stage.end)
                steps = level_stages[-1].end
                checkpoint_lib.save_params(workdir, level, params, {**model_meta, 'steps': steps})
                if not (config.train.final_eval and level == order[-1]):  # scored below
                    summary[level] = _validate(config, params, model_meta, level, logger,
                                               offsets[level] + steps)
        if config.train.final_eval:
            # The eval mode on the same images as the validation, with every baseline: it is
            # also the last level's validation record.
            finest = order[-1]
            summary[finest] = summary['final'] = final_evaluation(config, workdir, finest)
            _log_validation(logger, finest, offsets[finest] + level_steps(config, finest),
                            summary['final'])
    finally:
        manager.wait_until_finished()
        manager.close()
        logger.close()
    return summary


def final_evaluation(config: ml_collections.ConfigDict, workdir: str, level: int) -> dict:
    """The eval mode on the finest trained level (files in WORKDIR/eval/), with both baselines."""
    from bokeh_jax import evaluate

    config = config.copy_and_resolve_references()
    config.eval.level = level
    config.eval.params_level = level
    result = evaluate.run(config, workdir)
    identity = (result['baselines'].get('identity') or {}).get('psnr')
    if jax.process_index() == 0 and identity is not None and result.get('psnr') is not None:
        print(f'Held-out {result["split"]} ({result["num_images"]} images), level {level}: '
              f'PyNET {result["psnr"]:.2f} dB PSNR vs identity {identity:.2f} dB '
              f'({result["psnr"] - identity:+.2f} dB)')
    return result


def _train_level(config, workdir, stage: Stage, model, tx, state, manager, offset, vgg_params,
                 logger, stop, model_meta) -> TrainState:
    """Runs a stage of a level from state.step to stage.end; returns the host (unreplicated)
    state. `offset` is the level's first global step."""
    level, cfg, start, end = stage.level, stage.cfg, int(state.step), stage.end
    if start >= end:
        return state
    trainable = trainable_mask(state.params, level, cfg.trainable)
    # Donating the state saves a copy of it on accelerators; on CPU it made steps ~8% slower
    # (median of 8 paired runs of the demo's level-3 step).
    donate = () if jax.default_backend() == 'cpu' else (0,)
    step_fn = jax.pmap(make_train_step(model, level, dict(cfg.loss), tx, trainable),
                       axis_name=AXIS, donate_argnums=donate)
    batches = input_pipeline.train_iterator(
        config.data, config.seed, level, start, batch_size=cfg.batch_size,
        num_local_devices=jax.local_device_count(), process_index=jax.process_index(),
        process_count=jax.process_count())
    meta = lambda step: {'level': level, 'level_step': step, **model_meta}
    # Jitted once per level: a jit made at every image summary traced and compiled the model (or
    # fetched it from the compilation cache) each time, ~3 s per summary at the demo's level 3.
    forward = jax.jit(functools.partial(model.apply, level=level))
    state = replicate(state)
    bar = _progress(level if stage.first == 0 else f'{level} finetune', start, end, logger.enabled)
    last_saved, timer, images_seen = start, time.perf_counter(), 0
    try:
        for step in range(start, end):
            if all_processes_agree(stop.signal is not None):
                if step != last_saved:
                    save_state(manager, offset + step, state, meta(step))
                manager.wait_until_finished()
                raise Interrupted(f'Stopped by signal {stop.signal} at level {level} step {step}; '
                                  f'state saved to {workdir}/checkpoints. Re-run to resume.')
            batch = next(batches)
            state, metrics = step_fn(state, batch, vgg_params)
            metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics['loss']):
                raise FloatingPointError(
                    f'Level {level} step {step}: loss is {metrics["loss"]} ({metrics}). Stopped; '
                    f'the last good checkpoint (level step {last_saved}) is kept in '
                    f'{workdir}/checkpoints. Try a lower config.train.level{level}.learning_rate.')
            images_seen += cfg.batch_size
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f'{metrics["loss"]:.4f}', psnr=f'{metrics["psnr"]:.2f}',
                            refresh=False)  # drawn at the bar's own pace
            if done % config.train.log_every == 0 or done == end:
                elapsed = time.perf_counter() - timer
                logger.scalars(offset + done, {
                    'level': level, 'step': done, **metrics,
                    'steps_per_s': (images_seen / cfg.batch_size) / elapsed,
                    'images_per_s': images_seen / elapsed})
                timer, images_seen = time.perf_counter(), 0
            if config.train.eval_every and done % config.train.eval_every == 0 and done < end:
                _validate(config, unreplicate(state.params), model_meta, level, logger,
                          offset + done)
            if config.train.image_every and done % config.train.image_every == 0:
                _log_images(logger, forward, state, batch, level, offset + done)
            if done % config.train.checkpoint_every == 0 and done < end:
                save_state(manager, offset + done, state, meta(done))
                last_saved = done
        # A stage's end is also a checkpoint, so fresh_optimizer_per_level=False can resume.
        save_state(manager, offset + end, state, meta(end))
    finally:
        bar.close()
        if hasattr(batches, 'close'):
            batches.close()
    host = unreplicate(state)
    return TrainState(step=np.int32(host.step), params=host.params, opt_state=host.opt_state)


def _log_images(logger: Logger, forward, state, batch, level: int, global_step: int) -> None:
    """Input, target and output of the batch's first image; forward = jitted model.apply."""
    if not logger.enabled:
        return
    params = jax.tree.map(lambda x: x[0], state.params)
    x = batch['input'][0, :1]
    output = forward({'params': params}, x)[level]
    size = output.shape[1:3]
    logger.images(global_step, level, {
        'input': image_ops.resize(np.asarray(x[0, ..., :3]), size),
        'target': batch['target'][0, 0], 'output': np.asarray(output[0])})


def _validate(config, params, model_meta, level, logger, global_step) -> dict:
    """Scores the level's output on the validation split (a few images; config.eval.max_images)
    and logs the scores and a TensorBoard grid of its worst and best images."""
    from bokeh_jax import evaluate

    # Identity only: the classical renderer costs seconds per photo, too much at every level.
    tile = int(config.train.val_grid_tile)
    options = evaluate.Options.from_config(
        config, level=level, baselines=('identity',),
        grid_images=int(config.eval.grid_images) if tile else 0, grid_tile=tile)
    result = evaluate.evaluate_split(params, model_meta, config.data, config.data.eval_split,
                                     options)
    _log_validation(logger, level, global_step, result.summary)
    if result.grid is not None:
        grid = np.asarray(result.grid.convert('RGB'), np.float32) / 255
        logger.images(global_step, level, {'validation_grid': grid})
    return result.summary


def _log_validation(logger: Logger, level: int, global_step: int, summary: dict) -> None:
    flat = {f'val_{k}': v for k, v in _scalars(summary).items()}
    logger.scalars(global_step, {'level': level, **flat})
    logging.info('Level %d validation: %s', level, flat)


def _scalars(tree: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f'{prefix}{key}_'))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f'{prefix}{key}'] = value
    return out
