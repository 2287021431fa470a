"""What a workdir remembers about its run, and who is using it.

The config: training writes the resolved config to `WORKDIR/config.json`.
Eval, render and the other modes read it back when no `--config` is given,
so that a workdir is always used with the config that trained it. A `--config` that disagrees
with the saved one on a field that changes the parameters (`MODEL_FIELDS`) is an error naming
the field.

The lock: one training (or conversion) at a time per workdir. `exclusive` holds an flock on
`WORKDIR/.lock`, which names its holder (pid, host, mode). The kernel releases it when the holder
dies, however it dies, so a lock left by a dead process is taken over, with a log line.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any, Iterator

from absl import logging

import ml_collections

from bokeh_jax.errors import UserError

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Fields that change the parameter tree: a model trained with one value cannot be used with another.
MODEL_FIELDS = ('model.channels', 'data.builder_config', 'model.condition',
                'model.condition_method', 'model.residual',
                'model.residual_gain')


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def save_config(workdir: str, config: ml_collections.ConfigDict, source: str) -> str:
    """Writes the resolved config (atomically) with where it came from; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    record = {'source': source, 'config': config.to_dict()}
    temporary = f'{path}.tmp-{os.getpid()}'
    with open(temporary, 'w') as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    os.replace(temporary, path)
    return path


def read_config(workdir: str) -> tuple[dict, str] | None:
    """(config values, source) saved in the workdir, or None if it has none."""
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        return record['config'], record.get('source', '')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'{path} is not a config written by training ({e}); remove it or pass '
                        f'--config') from None


def merge(skeleton: ml_collections.ConfigDict, values: dict,
          prefix: str = 'config') -> ml_collections.ConfigDict:
    """A copy of `skeleton` with `values` (from JSON) filled in, keeping the skeleton's types
    (JSON turns tuples into lists). Fields unknown to the skeleton are added as they are."""
    out = skeleton.copy_and_resolve_references()
    with out.unlocked():
        _fill(out, values, prefix)
    return out


def _fill(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        current = target.get(key) if key in target else None
        if isinstance(value, dict):
            if not isinstance(current, ml_collections.ConfigDict):
                target[key] = ml_collections.ConfigDict()
                current = target[key]
            _fill(current, value, f'{prefix}.{key}')
        elif key in target and isinstance(current, tuple) and isinstance(value, list):
            target[key] = tuple(value)
        elif key in target and current is not None and value is not None:
            try:
                target[key] = type(current)(value) if isinstance(current, float) else value
            except TypeError as e:
                raise UserError(f'{prefix}.{key}: the saved value {value!r} does not fit the '
                                f'config ({e})') from None
        else:
            target[key] = value


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for key in dotted.split('.'):
        value = value[key]
    return value


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split('.')
    target = config
    for key in parents:
        target = target[key]
    with config.unlocked():
        target[leaf] = value


def check_same_model(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict,
                     workdir: str) -> None:
    """Raises if `given` would make other parameters than the workdir's saved config."""
    for field in MODEL_FIELDS:
        before, after = get_field(saved, field), get_field(given, field)
        if before != after:
            raise UserError(
                f'config.{field}={after!r} disagrees with {config_path(workdir)}, which has '
                f'{before!r}: the parameters in this workdir were made with that value. Drop '
                f'--config to use the saved config, or use another --workdir')


@contextlib.contextmanager
def exclusive(workdir: str, mode: str) -> Iterator[None]:
    """Holds the workdir's lock for the duration; a second holder gets a UserError at once."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    handle = open(path, 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or 'unknown holder'
        handle.close()
        raise UserError(f'{workdir} is in use by another run ({holder}): wait for it to end or '
                        f'stop it, or use another --workdir') from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        logging.warning('Taking over the lock of %s from a run that ended without releasing it '
                        '(%s)', workdir, previous)
    handle.seek(0)
    handle.truncate()
    handle.write(f'pid {os.getpid()} on host {socket.gethostname()}, --mode={mode}, since '
                 f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()  # released cleanly: an empty lock file
        handle.close()
