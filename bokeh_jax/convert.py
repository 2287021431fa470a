"""Import of the original TensorFlow 1 PyNET-Bokeh checkpoint (`pynet_bokeh_level_0`).

The release stores 440 unnamed variables `generator/Variable`, `generator/Variable_1`, ... in the
order the graph creates them (SPEC "TF checkpoint layout"). `tf_variable_paths` lists our parameter
paths in that same order, so variable i of the checkpoint is the i-th path. TensorFlow is imported
only inside `load_tf_checkpoint`: nothing else in the library needs it.
"""

import re
from typing import Any, Iterator

import jax
import numpy as np

from bokeh_jax import model as model_lib
from bokeh_jax.errors import MissingFileError, UserError

_TF_NAME = re.compile(r'^generator/Variable(?:_(\d+))?$')


def tf_variable_name(index: int) -> str:
    """Name of the index-th variable TF1 creates in scope `generator`."""
    return 'generator/Variable' if index == 0 else f'generator/Variable_{index}'


def _block_paths(tree: dict, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Leaf paths of one block in TF creation order."""
    if 'conv' in tree:  # a single layer: kernel, bias, then instance-norm shift and scale
        yield prefix + ('conv', 'kernel')
        if 'bias' in tree['conv']:
            yield prefix + ('conv', 'bias')
        if 'norm' in tree:
            yield prefix + ('norm', 'bias')
            yield prefix + ('norm', 'scale')
        return
    # A multi-block: branch 3 (conv a, conv b), then 5, 7, 9.
    for name in sorted(tree, key=lambda n: (int(n[1:-1]), n[-1])):
        yield from _block_paths(tree[name], prefix + (name,))


def tf_variable_paths(params: Any) -> list[tuple[str, ...]]:
    """All parameter paths of a full PyNET tree, in the original graph's variable creation order."""
    paths = []
    for group, blocks in model_lib.CREATION_ORDER.items():
        for block in blocks:
            paths.extend(_block_paths(params[group][block], (group, block)))
    return paths


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_tf_checkpoint(prefix: str) -> tuple[dict, dict]:
    """Reads a TF1 checkpoint laid out like the released `pynet_bokeh_level_0`.

    Args:
      prefix: checkpoint prefix (the path without `.index` / `.data-*`), or its directory.

    Returns:
      (params, info): the `params` tree for `PyNET(channels=info['channels'])` as float32 numpy
      arrays, and info {'channels', 'input_channels', 'source'}. The released model has channels 32,
      4 input channels; other widths are detected from the first kernel.

    Raises:
      FileNotFoundError: nothing readable at `prefix`.
      ValueError: a variable is missing, has the wrong shape, or is unexpected.
    """
    import tensorflow as tf  # only here: TF is not needed anywhere else

    try:
        reader = tf.train.load_checkpoint(prefix)
    except (ValueError, tf.errors.OpError) as e:
        raise MissingFileError(f'No readable TF checkpoint at {prefix!r}: {e}') from None
    shapes = reader.get_variable_to_shape_map()
    first = shapes.get(tf_variable_name(0))
    if first is None or len(first) != 4 or first[2] % 4:
        raise UserError(
            f'{prefix}: expected variable {tf_variable_name(0)!r} with shape '
            f'[3, 3, 4*C_in, channels] (the first conv of PyNET), found {first}'
        )
    input_channels, channels = first[2] // 4, first[3]
    if input_channels not in (3, 4):
        raise UserError(
            f'{prefix}: {tf_variable_name(0)} has {first[2]} input channels; expected 16 '
            f'(RGB + depth after space-to-depth) or 12 (RGB only)'
        )
    expected = model_lib.param_shapes(channels, input_channels)
    paths = tf_variable_paths(expected)

    indices = sorted(int(m.group(1) or 0) for m in map(_TF_NAME.match, shapes) if m)
    extra = [tf_variable_name(i) for i in indices if i >= len(paths)]
    if extra:
        raise UserError(
            f'{prefix}: {len(extra)} unexpected variables beyond the {len(paths)} of '
            f'PyNET (e.g. {extra[0]}); is this a PyNET-Bokeh checkpoint?'
        )
    params: dict = {}
    for index, path in enumerate(paths):
        name = tf_variable_name(index)
        want = tuple(_get(expected, path).shape)
        if name not in shapes:
            raise UserError(
                f'{prefix}: variable {name!r} (for {"/".join(path)}, shape {list(want)}) is missing'
            )
        if tuple(shapes[name]) != want:
            raise UserError(
                f'{prefix}: variable {name!r} has shape {shapes[name]}, expected '
                f'{list(want)} for {"/".join(path)}'
            )
        try:
            value = reader.get_tensor(name)
        except Exception as e:  # a truncated or damaged .data file
            raise UserError(f'{prefix}: variable {name!r} cannot be read from the checkpoint\'s '
                            f'.data file, which is truncated or damaged ({type(e).__name__}: '
                            f'{e})') from None
        _set(params, path, np.asarray(value, dtype=np.float32))
    info = {'channels': int(channels), 'input_channels': int(input_channels), 'source': str(prefix)}
    return params, info


def param_count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
