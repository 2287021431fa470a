"""Coarse-to-fine training of PyNET (SPEC "Training recipe"), read top to bottom.

Levels run in `config.train.order` (paper: 7, 6, ..., 1), each for its own steps, batch size,
learning rate and loss weights, each starting from the parameters the previous level ended with.
One `jax.pmap`-ped step per level; gradients and metrics are averaged over all devices of all
processes with `lax.pmean`. The trainable subset is declarative (training/optimizer.py): a label
per parameter from its path. A level may end with a finetune stage (`config.train.levelK.finetune`,
not in the paper): more steps with another trainable subset and learning rate, from fresh Adam
state (training/config_checks.py `stages`).

Workdir layout:
  config.json                  the resolved config of the run (bokeh_jax/workdir.py)
  checkpoints/<global step>/   resumable state (training/checkpoints.py)
  params/level_K/              the final parameters of every finished level (checkpoint.py)
  metrics.jsonl, tensorboard/  logs (process 0 only, training/writer.py)

Re-running the same command resumes: finished levels are skipped, the current level restarts at
its last checkpoint, and the input pipeline serves the batch of (seed, level, data step), so the
result equals an uninterrupted run. A run killed outright (SIGKILL, power loss) may leave a
half-written checkpoint or parameter set: the next run moves it to WORKDIR/incomplete/ and resumes
from the last complete one. SIGTERM / SIGINT save a checkpoint and exit cleanly (status 75); on a
multi-process run a SIGTERM to any process reaches all of them through JAX's preemption sync
point, and they stop at the same step.

A diverged step (NaN / Inf loss, or a spike over the running median: training/divergence.py)
stops the run with an error and leaves the last good checkpoint untouched, or with
config.train.on_divergence='rollback' restores that checkpoint, skips the data steps from it to
the diverged step (recorded in the checkpoints' meta, so resuming skips them too), and goes on.

Metrics stay on the devices between log steps (a host transfer per step would stall an
accelerator's dispatch queue). They are fetched, and checked for NaN / Inf, at every log step and
before anything is written from the parameters (a checkpoint, a validation, an image), so a
non-finite loss between log steps still stops the run before a checkpoint of bad parameters.

The model has no stochastic layers: all randomness of training is the data sampling, which the
input pipeline derives from (config.seed, level, step). That is what makes resumption exact.

Length: the loop is kept in one file on purpose (as big_vision's train.py), so that a reader
follows a step from the batch to the checkpoint, the rollback and the stop without jumping;
everything it only uses lives in training/.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from bokeh_jax import checkpoint as checkpoint_lib
from bokeh_jax import control
from bokeh_jax import image_ops
from bokeh_jax import input_pipeline
from bokeh_jax import losses
from bokeh_jax import metrics as metrics_lib
from bokeh_jax import model as model_lib
from bokeh_jax import residual as residual_lib
from bokeh_jax import workdir as workdir_lib
from bokeh_jax.training import checkpoints
from bokeh_jax.training import config_checks
from bokeh_jax.training import divergence
from bokeh_jax.training import multihost
from bokeh_jax.training import optimizer as optimizer_lib
from bokeh_jax.training import writer as writer_lib
from bokeh_jax.training.multihost import AXIS, Interrupted

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
        # Losses and PSNR in float32 whatever the model computes in (config.model.dtype).
        output = model.apply({'params': params}, batch['input'], level=level)[level]
        output = output.astype(jnp.float32)
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


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Run:
    """What every level of one training run shares."""
    config: ml_collections.ConfigDict
    workdir: str
    model: model_lib.PyNET
    model_meta: dict  # channels, input_channels, condition(_method), residual, source
    manager: ocp.CheckpointManager
    logger: writer_lib.Logger
    stop: multihost.StopRequest
    vgg_params: Any  # replicated VGG-19 weights ({} without a VGG loss term)
    offsets: dict[int, int]  # the first global step of each level
    stop_checks: int = 0  # calls of multihost.should_stop (the preemption sync point's step id)


def initial_params(config: ml_collections.ConfigDict, input_channels: int) -> tuple[Any, str]:
    """Fresh parameters, or those of `config.train.init_from` (a workdir) for fine-tuning.

    Unconditioned parameters start a conditioned config grown by model.condition_params (the
    new weights zero: the same images at first).
    """
    condition = (config.model.condition, config.model.condition_method)
    if config.train.init_from:
        params, meta = checkpoint_lib.load_params(config.train.init_from)
        if (meta['channels'], meta['input_channels']) != (config.model.channels, input_channels):
            raise ValueError(
                f'config.train.init_from={config.train.init_from!r} holds PyNET(channels='
                f'{meta["channels"]}, input_channels={meta["input_channels"]}), but the config '
                f'asks for channels={config.model.channels}, input_channels={input_channels}')
        source = f'{config.train.init_from} (level {meta["level"]})'
        saved = model_lib.condition_of_meta(meta)
        if saved[0] == 'none' and condition[0] != 'none':
            params = model_lib.condition_params(params, *condition, jax.random.key(config.seed))
            return params, f'{source}, grown to condition={condition[0]!r} ({condition[1]})'
        if saved[0] != condition[0] or (saved[0] != 'none' and saved[1] != condition[1]):
            raise ValueError(
                f'config.train.init_from={config.train.init_from!r} holds a model with '
                f'condition={saved[0]!r}, condition_method={saved[1]!r}, but the config asks for '
                f'condition={condition[0]!r}, condition_method={condition[1]!r} (only an '
                f"unconditioned model can start a conditioned one)")
        return params, source
    model = model_lib.PyNET(config.model.channels, condition=condition[0],
                            condition_method=condition[1],
                            residual=residual_lib.from_config(config.model))
    params = model_lib.init_params(model, jax.random.key(config.seed), input_channels,
                                   scheme=config.model.init)
    return params, f'random ({config.model.init} init)'


def _blur_scale(config: ml_collections.ConfigDict) -> dict:
    """{'blur_px_per_defocus': ...} for a model trained on synthetic pairs with a focus map: the
    blur disc (output pixels) per unit of defocus it learns (control.focus_detail); else {}."""
    scale = control.px_per_defocus(config, {})
    return {} if scale is None else {'blur_px_per_defocus': scale}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       config_source: str = '',
                       prepare_data: Callable[[ml_collections.ConfigDict], None] | None = None
                       ) -> dict:
    """Trains every level of config.train.order in `workdir` (resuming), returns final metrics.

    config_source: where the config came from (e.g. 'configs/default.py:demo'), kept with it in
    WORKDIR/config.json. prepare_data: builds the data set of `config.data` if needed, on every
    process (launch.py passes tfds_ebb.prepare.prepare_dataset_once; the library itself only
    reads data sets); None = it is there.
    """
    multihost.maybe_initialize_distributed(config)
    config_checks.validate_config(config, jax.device_count())
    vgg_params = None
    if config_checks.needs_vgg(config):
        vgg_params = losses.load_vgg19(config.train.vgg_weights)  # fails before any compute
    # Nothing above touches the workdir: a rejected config leaves it as it was. Process 0 holds
    # the workdir's lock for the whole run.
    lock = (workdir_lib.exclusive(workdir, 'train') if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        if jax.process_index() == 0:
            workdir_lib.save_config(workdir, config, config_source)
        if prepare_data is not None:
            prepare_data(config.data)
        return _train_levels(config, workdir, vgg_params)


def _train_levels(config: ml_collections.ConfigDict, workdir: str, vgg_params: Any) -> dict:
    if jax.process_index() == 0:
        checkpoints.set_aside_incomplete(workdir)
    if jax.process_count() > 1:  # before any other process opens the checkpoints
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('bokeh_jax: incomplete checkpoints set aside')

    input_channels = config_checks.input_channels(config)
    order = tuple(config.train.order)
    steps_per_level = [config_checks.level_steps(config, k) for k in order]
    residual = residual_lib.from_config(config.model)
    run = _Run(
        config=config, workdir=workdir,
        model=model_lib.PyNET(config.model.channels, dtype=jnp.dtype(config.model.dtype),
                              conv_impl=config.model.conv_impl,
                              condition=config.model.condition,
                              condition_method=config.model.condition_method,
                              residual=residual),
        model_meta={'channels': config.model.channels, 'input_channels': input_channels,
                    'condition': config.model.condition,
                    'condition_method': config.model.condition_method,
                    'residual': residual, 'source': 'train',
                    **_blur_scale(config)},
        manager=checkpoints.checkpoint_manager(workdir, config),
        logger=writer_lib.Logger(workdir, jax.process_index() == 0),
        stop=multihost.StopRequest(),
        vgg_params=multihost.replicate(vgg_params if vgg_params is not None else {}),
        offsets=dict(zip(order, map(int, np.cumsum([0] + steps_per_level)))))
    latest = checkpoints.latest_meta(run.manager)
    finished = {k for k in checkpoint_lib.saved_levels(workdir)
                if checkpoint_lib.read_meta(workdir, k).get('source') == 'train'}

    params = None
    opt_state = None  # carried between levels when fresh_optimizer_per_level is False
    summary = {}
    try:
        with run.stop:
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
                # This level's latest checkpoint, if any.
                saved = latest if latest and latest.get('level') == level else None
                params, opt_state = _train_level(run, level, params, opt_state, saved)
                steps = config_checks.level_steps(config, level)
                checkpoint_lib.save_params(workdir, level, params,
                                           {**run.model_meta, 'steps': steps})
                if not (config.train.final_eval and level == order[-1]):  # scored below
                    summary[level] = _validate(run, params, level, run.offsets[level] + steps)
        if config.train.final_eval:
            # The eval mode on the same images as the validation, with every baseline: it is
            # also the last level's validation record.
            finest = order[-1]
            summary[finest] = summary['final'] = final_evaluation(config, workdir, finest)
            _log_validation(run.logger, finest,
                            run.offsets[finest] + config_checks.level_steps(config, finest),
                            summary['final'])
    finally:
        run.manager.wait_until_finished()
        run.manager.close()
        run.logger.close()
    return summary


@dataclasses.dataclass
class _LevelHistory:
    """What a level's divergence handling has done, stored in every checkpoint's meta."""
    windows: list  # skipped data windows (divergence.py), config's and rollbacks'
    lr_scale: float  # learning-rate factor after rollbacks (1 = none)
    rollbacks: list  # one record per rollback

    def meta(self) -> dict:
        return {'skip_windows': [list(w) for w in self.windows], 'lr_scale': self.lr_scale,
                'rollbacks': self.rollbacks}


def _train_level(run: _Run, level: int, params: Any, opt_state: Any, saved: dict | None
                 ) -> tuple[Any, Any]:
    """Runs the level's stages from its latest checkpoint (`saved`: its meta; None = the start);
    returns the final parameters and optimizer state (host arrays)."""
    config = run.config
    resume = saved['level_step'] if saved else 0
    saved = saved or {}
    history = _LevelHistory(
        windows=divergence.normalize([*config_checks.level_config(config, level).skip_windows,
                                      *saved.get('skip_windows', [])]),
        lr_scale=float(saved.get('lr_scale', 1.0)), rollbacks=list(saved.get('rollbacks', [])))
    level_stages = config_checks.stages(config, level)
    for index, stage in enumerate(level_stages):
        last = index == len(level_stages) - 1
        # A stage that ended at or before the resumed step was finished by an earlier run, and
        # the checkpoint holds its result.
        if resume >= stage.end and not last:
            continue
        if resume <= stage.first:
            history.lr_scale = 1.0  # a rollback's lower rate holds for the rest of its stage
        tx = optimizer_lib.make_optimizer(config, level, stage, history.lr_scale)
        if index or opt_state is None or config.train.fresh_optimizer_per_level:
            opt_state = tx.init(params)  # a finetune stage always starts afresh
        else:
            opt_state = optimizer_lib.carry_moments(opt_state, tx.init(params))
        state = TrainState(step=np.int32(stage.first), params=params, opt_state=opt_state)
        if resume > 0 and resume >= stage.first:
            restored = checkpoints.restore_state(
                run.manager, run.offsets[level] + resume, state)
            # At the previous stage's last step: its parameters, this stage's fresh optimizer
            # state.
            state = state.replace(params=restored.params) if resume == stage.first else restored
            logging.info('Resuming level %d at step %d', level, resume)
        state = _train_stage(run, stage, state, history)
        params, opt_state = state.params, state.opt_state
        if not last:  # the score before finetuning
            _validate(run, params, level, run.offsets[level] + stage.end)
    return params, opt_state


class _PendingMetrics:
    """Per-step metrics left on the devices until `fetch` (log steps, and before anything is
    written from the parameters): then one transfer for all of them, checked in step order."""

    def __init__(self, monitor: divergence.LossMonitor):
        self.monitor = monitor
        self.steps: list[int] = []
        self.values: list[dict] = []
        self.last_saved = 0  # level step of the last good state (a checkpoint or the start)

    def add(self, step: int, metrics: dict) -> None:
        self.steps.append(step)
        self.values.append(metrics)

    def fetch(self) -> dict | None:
        """Host floats of the newest step's metrics (None if none pending); raises
        divergence.Divergence at the first step whose loss is not finite or spiked."""
        if not self.steps:
            return None
        fetched = jax.device_get(self.values)
        steps, self.steps, self.values = self.steps, [], []
        for step, values in zip(steps, fetched):
            host = {k: float(v[0]) for k, v in values.items()}
            self.monitor.check(step, host)
        return host


def _train_stage(run: _Run, stage: config_checks.Stage, state: TrainState,
                 history: _LevelHistory) -> TrainState:
    """Runs a stage of a level from state.step to stage.end, rolling back on divergence when
    config.train.on_divergence='rollback'; returns the host (unreplicated) state."""
    start_state = state
    monitor = divergence.LossMonitor(stage.level, run.config.train.spike_factor,
                                     run.config.train.spike_window)
    compiled = {}  # learning-rate factor -> pmapped step: a rollback at the same rate reuses it
    while True:
        if history.lr_scale not in compiled:
            tx = optimizer_lib.make_optimizer(run.config, stage.level, stage, history.lr_scale)
            compiled[history.lr_scale] = _step_fn(run, stage, tx, state.params)
        try:
            return _run_steps(run, stage, compiled[history.lr_scale], state, history, monitor)
        except divergence.Divergence as diverged:
            state = _roll_back(run, stage, diverged, history, start_state)
            monitor.reset()


def _roll_back(run: _Run, stage: config_checks.Stage, diverged: divergence.Divergence,
               history: _LevelHistory, start_state: TrainState) -> TrainState:
    """The last good state before `diverged`, with its batches added to the skipped windows
    (and the rate lowered); raises FloatingPointError when rolling back is off or used up."""
    config, level = run.config, stage.level
    good = diverged.last_good  # level step
    kept = (f'the last good checkpoint (level step {good}) is kept in {run.workdir}/checkpoints'
            if good > 0 else 'no checkpoint of this level yet')
    if config.train.on_divergence == 'stop':
        raise FloatingPointError(
            f'{diverged} ({diverged.metrics}). Stopped; {kept}. Try a lower '
            f'config.train.level{level}.learning_rate, or config.train.on_divergence='
            f"'rollback'.") from None
    window = (divergence.data_step(good, history.windows),
              divergence.data_step(diverged.step, history.windows))
    record = {'step': diverged.step,
              'loss': diverged.loss if np.isfinite(diverged.loss) else str(diverged.loss),
              'reason': diverged.reason, 'restored_step': good, 'skipped': list(window),
              'lr_scale': history.lr_scale * config.train.rollback_lr_factor}
    if len(history.rollbacks) >= config.train.max_rollbacks:
        listed = '; '.join(
            f'step {r["step"]} loss {r["loss"]} ({r["reason"]}) -> step {r["restored_step"]}, '
            f'data steps {r["skipped"][0]}..{r["skipped"][1]} skipped'
            for r in history.rollbacks) or 'none'
        raise FloatingPointError(
            f'{diverged}: gave up after {len(history.rollbacks)} rollbacks at level {level} '
            f'(config.train.max_rollbacks={config.train.max_rollbacks}): {listed}. {kept}.'
        ) from None
    history.rollbacks.append(record)
    history.windows = divergence.normalize([*history.windows, window])
    history.lr_scale = record['lr_scale']
    logging.warning('Level %d step %d: loss %s (%s); rolled back to level step %d, skipping data '
                    'steps %d..%d, learning-rate factor %g (rollback %d of at most %d)', level,
                    diverged.step, diverged.loss, diverged.reason, good, *window,
                    history.lr_scale, len(history.rollbacks), config.train.max_rollbacks)
    run.logger.scalars(run.offsets[level] + diverged.step + 1, {
        'level': level, 'step': diverged.step + 1, 'rollback': len(history.rollbacks),
        'rollback_loss': record['loss'], 'rollback_reason': diverged.reason,
        'rollback_to_step': good, 'skipped_data_first': window[0],
        'skipped_data_last': window[1], 'lr_scale': history.lr_scale})
    run.manager.wait_until_finished()
    if good == int(start_state.step):
        return start_state
    return checkpoints.restore_state(run.manager, run.offsets[level] + good, start_state)


def _batches(config: ml_collections.ConfigDict, level: int, start: int, batch_size: int,
             windows: list) -> Iterator[dict]:
    """Training batches of level steps start, start + 1, ... with the skipped windows left
    out: one input-pipeline iterator per run of unskipped data steps."""
    for first, count in divergence.segments(start, windows):
        batches = input_pipeline.train_iterator(
            config.data, config.seed, level, first, batch_size=batch_size,
            num_local_devices=jax.local_device_count(), process_index=jax.process_index(),
            process_count=jax.process_count(), condition=config.model.condition)
        try:
            if count is None:
                yield from batches
            else:
                for _ in range(count):
                    yield next(batches)
        finally:
            if hasattr(batches, 'close'):
                batches.close()


def _step_fn(run: _Run, stage: config_checks.Stage, tx: optax.GradientTransformation,
             params: Any) -> Callable:
    """The stage's pmapped train step."""
    trainable = optimizer_lib.trainable_mask(params, stage.level, stage.cfg.trainable)
    # Donating the state saves a copy of it on accelerators; on CPU it made steps ~8% slower.
    donate = () if jax.default_backend() == 'cpu' else (0,)
    return jax.pmap(make_train_step(run.model, stage.level, dict(stage.cfg.loss), tx, trainable),
                    axis_name=AXIS, donate_argnums=donate)


def _run_steps(run: _Run, stage: config_checks.Stage, step_fn: Callable, state: TrainState, history: _LevelHistory,
               monitor: divergence.LossMonitor) -> TrainState:
    """Runs level steps state.step .. stage.end; returns the host (unreplicated) state. Raises
    divergence.Divergence (with `last_good`, the level step of the last good state) at the first
    step whose loss diverged."""
    config, level, cfg = run.config, stage.level, stage.cfg
    start, end, offset = int(state.step), stage.end, run.offsets[stage.level]
    if start >= end:
        return state
    batches = _batches(config, level, start, cfg.batch_size, history.windows)
    meta = lambda step: {'level': level, 'level_step': step, **run.model_meta, **history.meta()}
    # Jitted once per level: a jit made at every image summary traced and compiled the model each
    # time.
    forward = jax.jit(functools.partial(run.model.apply, level=level))
    state = multihost.replicate(state)
    pending = _PendingMetrics(monitor)
    pending.last_saved = start

    def save(step: int) -> None:
        pending.fetch()  # never a checkpoint of parameters that went through a NaN
        checkpoints.save_state(run.manager, offset + step, state, meta(step))
        pending.last_saved = step

    bar = writer_lib.progress(level if stage.first == 0 else f'{level} finetune', start, end,
                              run.logger.enabled)
    timer, images_seen = time.perf_counter(), 0
    try:
        for step in range(start, end):
            run.stop_checks += 1
            if multihost.should_stop(run.stop, run.stop_checks):
                if step != pending.last_saved:
                    save(step)
                run.manager.wait_until_finished()
                raise Interrupted(f'Stopped by {run.stop.describe()} at level {level} step '
                                  f'{step}; state saved to {run.workdir}/checkpoints. Re-run to '
                                  f'resume.')
            batch = next(batches)
            state, metrics = step_fn(state, batch, run.vgg_params)
            pending.add(step, metrics)
            images_seen += cfg.batch_size
            done = step + 1
            bar.update(1)
            if done % config.train.log_every == 0 or done == end:
                host = pending.fetch()
                elapsed = time.perf_counter() - timer
                bar.set_postfix(loss=f'{host["loss"]:.4f}', psnr=f'{host["psnr"]:.2f}',
                                refresh=False)  # drawn at the bar's own pace
                run.logger.scalars(offset + done, {
                    'level': level, 'step': done, **host,
                    'steps_per_s': (images_seen / cfg.batch_size) / elapsed,
                    'images_per_s': images_seen / elapsed})
                timer, images_seen = time.perf_counter(), 0
            if config.train.eval_every and done % config.train.eval_every == 0 and done < end:
                pending.fetch()
                _validate(run, multihost.unreplicate(state.params), level, offset + done)
            if config.train.image_every and done % config.train.image_every == 0:
                pending.fetch()
                _log_images(run.logger, forward, state, batch, level, offset + done)
            if done % config.train.checkpoint_every == 0 and done < end:
                save(done)
        # A stage's end is also a checkpoint, so fresh_optimizer_per_level=False can resume.
        save(end)
    except divergence.Divergence as diverged:
        diverged.last_good = pending.last_saved
        raise
    finally:
        bar.close()
        batches.close()
    host = multihost.unreplicate(state)
    return TrainState(step=np.int32(host.step), params=host.params, opt_state=host.opt_state)


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


def _log_images(logger: writer_lib.Logger, forward, state, batch, level: int,
                global_step: int) -> None:
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


def _validate(run: _Run, params: Any, level: int, global_step: int) -> dict:
    """Scores the level's output on the validation split (a few images; config.eval.max_images)
    and logs the scores and a TensorBoard grid of its worst and best images."""
    from bokeh_jax import evaluate

    config = run.config
    # Identity only: the classical renderer costs seconds per photo, too much at every level.
    tile = int(config.train.val_grid_tile)
    options = evaluate.Options.from_config(
        config, run.model_meta, level=level, baselines=('identity',),
        grid_images=int(config.eval.grid_images) if tile else 0, grid_tile=tile)
    result = evaluate.evaluate_split(params, run.model_meta, config.data, config.data.eval_split,
                                     options)
    _log_validation(run.logger, level, global_step, result.summary)
    if result.grid is not None:
        grid = np.asarray(result.grid.convert('RGB'), np.float32) / 255
        run.logger.images(global_step, level, {'validation_grid': grid})
    return result.summary


def _log_validation(logger: writer_lib.Logger, level: int, global_step: int,
                    summary: dict) -> None:
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
