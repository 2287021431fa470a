"""What a training schedule will cost on this backend (`launch.py --mode=estimate`).

Times the train step of every stage of every level in config.train.order at the config's batch
size, crop, model width, dtype and loss terms (after a warm-up step that compiles it), and
multiplies by the stage's steps. When a full-batch step is predicted to take more than
`step_budget_s`, the step is timed at one image per device and scaled linearly to the batch (the
output says so). Random parameters and batches: the cost of a step does not depend on the values.
Not counted: the input pipeline (decoding runs beside the step), validation, checkpoints,
compilation.

Memory per level: the device's peak bytes in use where the backend reports them (GPU, TPU), else
the process's peak resident set size (CPU). Both are peaks since the start of the process, so a
level's figure is at least the largest of the levels timed before it.
"""

import dataclasses
import json
import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bokeh_jax import control
from bokeh_jax import image_ops
from bokeh_jax import losses
from bokeh_jax import model as model_lib
from bokeh_jax import train
from bokeh_jax.training import config_checks
from bokeh_jax.training import multihost
from bokeh_jax.training import optimizer as optimizer_lib

VGG19_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)


@dataclasses.dataclass
class StageEstimate:
    level: int
    stage: str  # 'main' or 'finetune'
    steps: int
    batch_size: int  # the config's global batch
    timed_batch: int  # the batch the step was timed at
    step_s: float  # seconds per step at batch_size (scaled when timed_batch < batch_size)
    peak_bytes: int
    peak_kind: str  # 'device peak_bytes_in_use' or 'process peak RSS'

    @property
    def total_s(self) -> float:
        return self.step_s * self.steps


def _peak_memory() -> tuple[int, str]:
    stats = jax.local_devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
        return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process peak RSS'


def _time_step(step, state, batch, vgg, repeats: int) -> float:
    """Seconds per call of `step` after one warm-up (compiling) call."""
    state, metrics = step(state, batch, vgg)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(repeats):
        state, metrics = step(state, batch, vgg)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / repeats


def estimate(config: ml_collections.ConfigDict, repeats: int = 3, step_budget_s: float = 30.0,
             log=print) -> list[StageEstimate]:
    """Times every stage of config.train.order on this process's devices (see the module)."""
    config_checks.validate_config(config, jax.device_count())
    devices = jax.local_device_count()
    crop, channels = config.data.crop_size, config_checks.input_channels(config)
    condition = dict(condition=config.model.condition,
                     condition_method=config.model.condition_method)
    model = model_lib.PyNET(config.model.channels, dtype=jnp.dtype(config.model.dtype),
                            conv_impl=config.model.conv_impl, residual=config.model.residual,
                            **condition)
    params = model_lib.init_params(model_lib.PyNET(config.model.channels, **condition),
                                   jax.random.key(0), channels)
    channels += control.condition_channels(config.model.condition)  # the batches' input
    vgg = {}
    if config_checks.needs_vgg(config):  # random weights of VGG-19's shapes: the same cost
        vgg = losses.VGG19(VGG19_WIDTHS).init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
        vgg = multihost.replicate(vgg['params'])
    rng = np.random.default_rng(0)
    out = []
    for level in config.train.order:
        side = image_ops.level_output_size(crop, level)
        for stage in config_checks.stages(config, level):
            cfg = stage.cfg
            tx = optimizer_lib.make_optimizer(config, level, stage)
            trainable = optimizer_lib.trainable_mask(params, level, cfg.trainable)
            step = jax.pmap(train.make_train_step(model, level, dict(cfg.loss), tx, trainable),
                            axis_name=multihost.AXIS)
            state = multihost.replicate(train.TrainState(step=np.int32(0), params=params,
                                                         opt_state=tx.init(params)))

            def batch(per_device: int) -> dict:
                return {'input': rng.random((devices, per_device, crop, crop, channels),
                                            np.float32),
                        'target': rng.random((devices, per_device, side, side, 3), np.float32)}

            per_device = cfg.batch_size // devices
            timed_batch = devices
            one = _time_step(step, state, batch(1), vgg, 1 if per_device > 1 else repeats)
            step_s = one * per_device
            if per_device > 1 and step_s <= step_budget_s:
                step_s = _time_step(step, state, batch(per_device), vgg, repeats)
                timed_batch = cfg.batch_size
            peak, kind = _peak_memory()
            result = StageEstimate(level, 'main' if stage.first == 0 else 'finetune', cfg.steps,
                                   cfg.batch_size, timed_batch, step_s, peak, kind)
            log(_row(result))
            out.append(result)
    return out


def _hours(seconds: float) -> str:
    return f'{seconds / 3600:.2f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


def _row(e: StageEstimate) -> str:
    scaled = ('' if e.timed_batch == e.batch_size
              else f'  (timed at batch {e.timed_batch}, scaled linearly)')
    return (f'level {e.level} {e.stage:8s} {e.steps:>7,} steps x {e.step_s:8.3f} s '
            f'(batch {e.batch_size}) = {_hours(e.total_s):>9s}   peak {e.peak_bytes / 2**30:6.2f} '
            f'GiB ({e.peak_kind}){scaled}')


def run(config: ml_collections.ConfigDict, workdir: str, step_budget_s: float = 30.0) -> dict:
    """Prints the schedule's estimate per level and in total; writes WORKDIR/estimate.json."""
    device = jax.local_devices()[0]
    print(f'Estimating config.train.order={tuple(config.train.order)} on {jax.device_count()} '
          f'{device.platform} device(s) ({device.device_kind}); crop {config.data.crop_size}, '
          f'channels {config.model.channels}, dtype {config.model.dtype}')
    stages = estimate(config, step_budget_s=step_budget_s)
    total = sum(e.total_s for e in stages)
    print(f'Total: {_hours(total)} of train steps (not counted: input pipeline, validation, '
          f'checkpoints, compilation)')
    result = {'backend': device.platform, 'device_kind': device.device_kind,
              'devices': jax.device_count(), 'total_s': total,
              'stages': [{**dataclasses.asdict(e), 'total_s': e.total_s} for e in stages]}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'estimate.json'), 'w') as f:
            json.dump(result, f, indent=1)
    return result
