"""Shared by the tests: running launch.py as a real subprocess, comparing parameter trees."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_command(*args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, 'launch.py'), *args]


# Subprocesses share compiled programs through JAX's persistent cache (e.g. a resumed run
# reuses the interrupted run's train step), which keeps the suite's compile time down. Every
# program is cached, not only those that took over a second (JAX's default): a launch.py run
# compiles dozens of small ones (evaluation, metrics, replication) that the next run reuses.
COMPILATION_CACHE = os.path.join(ROOT, '.jax_cache')


def launch_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2',
           'JAX_COMPILATION_CACHE_DIR': COMPILATION_CACHE,
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', **extra}
    if devices is not None:
        env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    return env


def launch(*args: str, check: bool = True, devices: int | None = None, timeout: int = 600,
           **env: str) -> subprocess.CompletedProcess:
    """Runs `python launch.py ARGS` in the repository root and returns the finished process."""
    result = subprocess.run(launch_command(*args), cwd=ROOT, env=launch_env(devices, **env),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'launch.py {args} exited {result.returncode}:\n'
                             f'{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result


def assert_trees_equal(a, b, what: str = '') -> None:
    """Bit-identical parameter trees (same structure, same values); names every differing leaf."""
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    differ = [jax.tree_util.keystr(path)
              for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
              if not np.array_equal(np.asarray(x), np.asarray(y))]
    total = len(jax.tree.leaves(a))
    assert not differ, f'{what}: {len(differ)} of {total} leaves differ: {differ[:5]}'


def random_photo(rng, height, width):
    """Smooth colour gradients plus noise: uint8 [height, width, 3]."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([yy, xx, 1 - (xx + yy) / 2], axis=-1) * 200
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def save_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def tiny_config(data_dir: str, **overrides):
    """configs/default.py:tiny reading data_dir, with dotted overrides ('train.level7.steps': 3)."""
    from configs import default

    config = default.get_config('tiny')
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split('.')
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


def tensorboard_tags(workdir: str) -> set[str]:
    import tensorflow as tf  # only to read the event files
    tags = set()
    for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags
