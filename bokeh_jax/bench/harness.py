"""`launch.py --mode=bench`: how fast PyNET runs, against the same network in other frameworks.

One run measures, on whatever backend JAX has (CPU, GPU, TPU):
  - a convolution peak: one large level-3 shaped conv (9x9, 4c -> c channels at H/2 x W/2 for
    base width c), whose best GFLOP/s is the yardstick every other row is a fraction of;
  - the full-resolution forward pass (`config.bench.forward_size`, output twice that size), per
    computation dtype (`forward_dtypes`; 'bfloat16' on CPU: bf16 convolutions in oneDNN);
  - the project's train step (`bokeh_jax.train.make_train_step`, 100 * MAE, Adam) for each level
    in `train_levels` and batch in `train_batches`, on the paper's patch (`patch`);
  - rendering a large photo with `bokeh_jax.render.render_full_resolution` (`render`);
  - per level, the time the forward pass spends in that level (`per_level`);
  - optionally (`profile`), every distinct convolution shape of the forward pass with its
    GFLOP/s and total time, slowest first;
  - optionally (`breakdown`), one train step per level of `train_levels` split into parts
    (convolutions by direction, instance norm, activations, ...) from both frameworks' profilers.
Each row gives the median, min, max and spread over `repeats` timed calls after `warmup`,
images/s, XLA's FLOP count, achieved GFLOP/s and its fraction of the peak, compile time and peak
memory; the run records the load average (/proc/loadavg) before and after.

Peers (`config.bench.peers`) are the same network in TensorFlow (`tf_peer`) and PyTorch
(`torch_peer`), each run when installed, in a worker process of its own (`peer_process`, default)
on the same weights and inputs. Peer and JAX calls alternate within one loop so that load from
other processes hits both alike; the ratio column is the median over those adjacent pairs of
t_jax / t_peer (< 1: JAX is faster).
"""

import datetime
import importlib
import json
import os
import platform

import jax
import ml_collections
import optax

from bokeh_jax import model as model_lib
from bokeh_jax.bench import breakdown, peers, report, suite
from bokeh_jax.bench.timing import load_average


def environment(peer_versions: dict[str, str]) -> dict:
    """What produced the figures: date, machine, device, versions, flags."""
    import flax

    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'cpu': cpu,
        'cpu_count': os.cpu_count(),
        'backend': jax.default_backend(),
        'device': device.device_kind,
        'device_count': jax.device_count(),
        'versions': {
            'python': platform.python_version(),
            'jax': jax.__version__,
            'jaxlib': importlib.import_module('jaxlib').__version__,
            'flax': flax.__version__,
            'optax': optax.__version__,
            **peer_versions,
        },
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
    }


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Rejects a bench config that cannot run, naming the field."""
    suite.size(cfg, 'forward_size')
    suite.size(cfg, 'render_size')
    for dtype in cfg.forward_dtypes:
        if dtype not in ('float32', 'bfloat16'):
            raise ValueError(
                f"config.bench.forward_dtypes: expected 'float32' and/or 'bfloat16', got {dtype!r}"
            )
    for level in cfg.train_levels:
        if level not in model_lib.LEVELS:
            raise ValueError(
                f'config.bench.train_levels: {level!r} is not a level {model_lib.LEVELS}'
            )
    for batch in cfg.train_batches:
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f'config.bench.train_batches: {batch!r} is not a positive integer')
    patch = cfg.patch
    if not isinstance(patch, int) or patch <= 0 or patch % model_lib.SIZE_MULTIPLE:
        raise ValueError(
            f'config.bench.patch must be a positive multiple of {model_lib.SIZE_MULTIPLE}, '
            f'got {patch!r}'
        )
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError(
            f'config.bench.repeats must be >= 1 and warmup >= 0, got {cfg.repeats}, {cfg.warmup}'
        )
    for name in cfg.peers:
        if name not in peers.PEERS:
            raise ValueError(
                f'config.bench.peers: unknown peer {name!r}; expected some of {peers.PEERS}'
            )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every benchmark `config.bench` asks for; prints tables, writes WORKDIR/<output>."""
    cfg = config.bench
    validate(cfg)
    load_before = load_average()
    bench = suite.Bench(config)
    try:
        env = environment(bench.versions())
        where = 'worker processes' if cfg.peer_process else 'this process'
        print(f"[bench] {env['backend']} ({env['device']}, {env['cpu']}), load {load_before}, "
              f"conv_impl {bench.conv_impl}, peers in {where}", flush=True)
        bench.conv_peak()
        for dtype in cfg.forward_dtypes:
            bench.forward(dtype)
        for level in cfg.train_levels:
            for batch in cfg.train_batches:
                bench.train(level, batch)
        if cfg.render:
            bench.render()
        if cfg.per_level:
            bench.levels()
        if cfg.profile:
            bench.conv_profile()
        if cfg.breakdown:
            breakdown.run(bench)
        bench.conv_peak()  # again: the peak is the best call of both
    finally:
        bench.close()
    env['load_average'] = {'before': load_before, 'after': load_average()}
    rows = [row.to_json(bench.peak_gflops) for row in bench.rows]
    results = {
        'environment': env,
        'config': json.loads(cfg.to_json()),
        'channels': config.model.channels,
        'conv_impl': bench.conv_impl,
        'conv_peak_gflop_per_s': bench.peak_gflops,
        'rows': rows,
        'per_level': bench.per_level,
        'conv_profile': bench.profile,
        'breakdown': bench.breakdown,
    }
    print('\n' + report.format_table(rows, bench.peer_names), flush=True)
    print(f"[bench] conv_impl {bench.conv_impl}; load average (/proc/loadavg) before "
          f"{load_before}, after {env['load_average']['after']}")
    if workdir:
        print(f'[bench] wrote {report.write_json(results, workdir, cfg.output)}')
    return results
