"""Finished parameter sets on disk: `WORKDIR/params/level_K/`, one orbax checkpoint per level.

Each holds two items: `params` (the PyNET parameter tree, float32) and `meta` (JSON: `channels`,
`input_channels`, `level`, `source`, and whatever the writer adds). Training writes one at the end
of every level; `launch.py --mode=convert` writes `level_1` from the released TF checkpoint.
Render, eval and fine-tuning read them with `load_params`. Resumable training state lives
separately in `WORKDIR/checkpoints/` (see train.py).
"""

import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bokeh_jax import model as model_lib
from bokeh_jax.errors import MissingFileError, UserError

_LEVEL_DIR = re.compile(r'^level_([1-7])$')
# Written after orbax has finished: size and sha256 of every file of the params item. A damaged
# file is then named before orbax reads it (a failed orbax restore leaves event-loop threads that
# print tracebacks of their own). Folders without it (older saves) are restored unchecked.
MANIFEST = 'files.json'


def params_dir(workdir: str, level: int) -> str:
    return os.path.join(os.path.abspath(workdir), 'params', f'level_{level}')


def saved_levels(workdir: str) -> list[int]:
    """Levels with finished parameters in `workdir`, finest first."""
    root = os.path.join(workdir, 'params')
    if not os.path.isdir(root):
        return []
    found = (_LEVEL_DIR.match(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m)


def save_params(workdir: str, level: int, params: Any, meta: dict) -> str:
    """Writes params (+ meta, which must hold `channels` and `input_channels`) atomically.

    Must be called by every process of a multi-host run (orbax coordinates; process 0 writes).
    An existing `level_K` is replaced.
    """
    for key in ('channels', 'input_channels'):
        if key not in meta:
            raise ValueError(f'save_params: meta must contain {key!r}; got keys {sorted(meta)}')
    path = params_dir(workdir, level)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                meta=ocp.args.JsonSave({**meta, 'level': level}),
            ),
            force=True,
        )
    if jax.process_index() == 0:
        _write_manifest(path)
    return path


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            sha.update(block)
    return sha.hexdigest()


def _params_files(path: str) -> dict[str, str]:
    root = os.path.join(path, 'params')
    return {os.path.relpath(os.path.join(d, name), path): os.path.join(d, name)
            for d, _, names in os.walk(root) for name in names}


def _write_manifest(path: str) -> None:
    files = {rel: {'bytes': os.path.getsize(full), 'sha256': _digest(full)}
             for rel, full in sorted(_params_files(path).items())}
    temporary = os.path.join(path, MANIFEST + '.tmp')
    with open(temporary, 'w') as f:
        json.dump(files, f, indent=1)
    os.replace(temporary, os.path.join(path, MANIFEST))


def _check_manifest(path: str) -> None:
    """Names the first file of `path`/params that is missing, truncated or altered."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest):
        return
    try:
        with open(manifest) as f:
            files = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{manifest} cannot be read ({e})') from None
    for rel, expected in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise UserError(f'{path}/params is damaged: {rel} is missing')
        size = os.path.getsize(full)
        if size != expected['bytes']:
            raise UserError(f'{path}/params is damaged or truncated: {rel} has {size} bytes, '
                            f'{expected["bytes"]} were written')
        if _digest(full) != expected['sha256']:
            raise UserError(f'{path}/params is damaged: {rel} differs from what was written '
                            f'(sha256)')


def _check_complete(path: str) -> None:
    """A params folder holds both items; an empty or half-copied one is named, not restored."""
    missing = [item for item in ('meta', 'params') if not os.path.isdir(os.path.join(path, item))]
    if missing:
        raise UserError(f'{path} is incomplete: it has no {" or ".join(missing)}/ item (an '
                        f'interrupted copy or save?). Remove the folder, or train / convert again')


def read_meta(workdir: str, level: int) -> dict:
    """The JSON metadata of `level`'s parameters (no weights are read)."""
    path = params_dir(workdir, level)
    _check_complete(path)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged file
        raise UserError(f'{path}/meta cannot be read ({type(e).__name__}: {e})') from None
    return restored['meta']


def describe(workdir: str, level: int) -> str:
    """One line about the parameters of `level` in `workdir`, for messages."""
    try:
        meta = read_meta(workdir, level)
    except UserError as e:
        return f'level {level} (unreadable: {e})'
    return (f'level {level}, channels={meta.get("channels")}, '
            f'input_channels={meta.get("input_channels")}, source={meta.get("source")!r}')


def load_params(workdir: str, level: int | None = None) -> tuple[Any, dict]:
    """Reads finished parameters: those of `level`, or of the finest level saved when None.

    Returns (params as numpy float32 tree, meta). Raises FileNotFoundError naming the directory when
    nothing is there, ValueError when the stored tree does not fit the PyNET described by meta.
    """
    levels = saved_levels(workdir)
    if level is None:
        if not levels:
            raise MissingFileError(
                f'No trained parameters in {os.path.join(workdir, "params")!r}: train first '
                f'(--mode=train) or import the released model (--mode=convert --tf_checkpoint=...)'
            )
        level = levels[0]
    path = params_dir(workdir, level)
    if level not in levels:
        raise MissingFileError(
            f'No parameters for level {level} at {path!r} (saved levels: {levels})'
        )
    meta = read_meta(workdir, level)
    _check_manifest(path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        condition, method = model_lib.condition_of_meta(meta)
        expected = model_lib.param_shapes(meta['channels'], meta['input_channels'], condition,
                                          method)
        target = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), expected)
        try:
            restored = checkpointer.restore(
                path, ocp.args.Composite(params=ocp.args.StandardRestore(target))
            )
        except (ValueError, KeyError) as e:
            if 'shape' not in str(e).lower() and 'structure' not in str(e).lower():
                raise UserError(f'{path}/params is damaged or truncated '
                                f'({type(e).__name__}: {e})') from None
            raise UserError(
                f'{path}: stored parameters do not match PyNET(channels={meta["channels"]}, '
                f'input_channels={meta["input_channels"]}, condition={condition!r}, '
                f'condition_method={method!r}): {e}'
            ) from None
        except Exception as e:  # a truncated data file: orbax / tensorstore errors of many kinds
            raise UserError(f'{path}/params is damaged or truncated '
                            f'({type(e).__name__}: {str(e)[:300]})') from None
    return jax.tree.map(np.asarray, restored['params']), meta
