"""MegaDepth (Li and Snavely, CVPR 2018): the single-image depth network EBB!'s depth maps came from.

The network is the hourglass of Chen et al., "Single-Image Depth Perception in the Wild" (NeurIPS
2016): a 7x7 conv + BN + ReLU, four nested hourglass levels of inception modules, a 3x3 conv to
one channel of log depth. This is a Flax port of the PyTorch original whose parameter tree keeps
the original's module nesting: the state-dict key `module.3.0.0.1.0.0.weight` is the tree path
('3', '0', '0', '1', '0', '0', 'kernel'), so released weights map one to one by index path.

  - `MegaDepth`: the network; float32 [N, H, W, 3] RGB in [0, 1] (H, W multiples of 16) ->
    log depth [N, H, W, 1]. BatchNorm is in inference form (running statistics).
  - `state_dict_layout`: every key, shape and dtype of the released `best_generalization_net_G.pth`.
  - `params_from_state_dict`: a state dict (numpy, e.g. from `torch_pickle.load_state_dict`) ->
    the parameter tree, with every missing / extra key, shape or dtype named.
  - `fold_batch_norm`: the same function with each BatchNorm folded into the conv before it (fewer
    passes over memory); `MegaDepth(folded=True)` runs such a tree.
  - `save_params` / `load_params`: the imported tree in WORKDIR/depth/megadepth/.
Depth maps for photos (EBB!'s convention) are made in `depth_maps.py`.
"""

from collections.abc import Sequence
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# BatchNorm2d's default epsilon.
BN_EPSILON = 1e-5
# Four 2x poolings: input sides must be multiples of 16.
SIZE_MULTIPLE = 16
# Key prefix of a model saved from torch.nn.DataParallel, as the released file is.
DATA_PARALLEL_PREFIX = 'module.'

# Inception modules: (input channels, 1x1 branch width, ((reduce, out, kernel) x 3)).
INCEPTIONS = {
    'A': (128, 32, ((32, 32, 3), (32, 32, 5), (32, 32, 7))),
    'B': (128, 64, ((32, 64, 3), (32, 64, 5), (32, 64, 7))),
    'C': (256, 64, ((32, 64, 3), (32, 64, 5), (32, 64, 7))),
    'D': (256, 64, ((64, 64, 3), (64, 64, 7), (64, 64, 11))),
    'E': (256, 32, ((32, 32, 3), (32, 32, 5), (32, 32, 7))),
    'F': (128, 32, ((64, 32, 3), (64, 32, 7), (64, 32, 11))),
    'G': (128, 32, ((64, 32, 3), (64, 32, 5), (64, 32, 7))),
    'H': (128, 16, ((32, 16, 3), (32, 16, 7), (32, 16, 11))),
    'I': (128, 16, ((64, 16, 3), (64, 16, 7), (64, 16, 11))),
}

# Hourglass levels, innermost first: each is the sum of two branches; an item is an inception
# letter, a pooling ('max', 'avg': 2x2 stride 2), 'up' (nearest x2) or a nested level.
H4 = (('C', 'C'), ('avg', 'C', 'C', 'C', 'up'))
H3 = (('C', 'D'), ('avg', 'C', 'C', H4, 'C', 'D', 'up'))
H2 = (('max', 'A', 'B', H3, 'C', 'E', 'up'), ('A', 'F'))
H1 = (('max', 'A', 'A', H2, 'G', 'H', 'up'), ('I',))
STEM_CHANNELS = 128  # conv7x7(3 -> 128)
HEAD_CHANNELS = 64  # conv3x3(64 -> 1)


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------


class Conv(nn.Module):
    """PyTorch Conv2d, stride 1, zero padding k // 2: kernel [k, k, in, out] (HWIO) and bias."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', nn.initializers.lecun_normal(),
                            (k, k, x.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return y + bias


class BatchNorm(nn.Module):
    """BatchNorm2d in inference form; `affine` adds the learnt scale and bias (only the stem's)."""

    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        mean = self.param('mean', nn.initializers.zeros, (c,))
        var = self.param('var', nn.initializers.ones, (c,))
        y = (x - mean) * jax.lax.rsqrt(var + BN_EPSILON)
        if self.affine:
            y = y * self.param('scale', nn.initializers.ones, (c,))
            y = y + self.param('bias', nn.initializers.zeros, (c,))
        return y


class ConvBNReLU(nn.Module):
    """conv -> BN -> ReLU as one PyTorch Sequential slice: conv at `index`, BN at `index + 1`.

    `folded`: the BN lives in the conv's kernel and bias (`fold_batch_norm`), so it is skipped.
    """

    features: int
    kernel_size: int
    index: int
    folded: bool = False
    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv(self.features, self.kernel_size, name=str(self.index))(x)
        if not self.folded:
            x = BatchNorm(self.affine, name=str(self.index + 1))(x)
        return nn.relu(x)


class Inception(nn.Module):
    """Four parallel branches on one input, concatenated on channels (module docstring)."""

    letter: str
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, width, branches = INCEPTIONS[self.letter]
        outputs = [_InceptionBranch(width, None, None, self.folded, name='0')(x)]
        for j, (reduce, out, k) in enumerate(branches, 1):
            outputs.append(_InceptionBranch(reduce, out, k, self.folded, name=str(j))(x))
        return jnp.concatenate(outputs, axis=-1)


class _InceptionBranch(nn.Module):
    """conv1x1 + BN + ReLU (items 0-2), then for k: convkxk + BN + ReLU (items 3-5)."""

    reduce: int
    out: int | None
    kernel_size: int | None
    folded: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvBNReLU(self.reduce, 1, 0, self.folded, name='a')(x)
        if self.kernel_size is not None:
            x = ConvBNReLU(self.out, self.kernel_size, 3, self.folded, name='b')(x)
        return x


class Hourglass(nn.Module):
    """One level: the sum of its two branches (PyTorch: `<level>.0.<branch>.<item>`)."""

    level: tuple
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _Branches(self.level, self.folded, name='0')(x)


class _Branches(nn.Module):
    level: tuple
    folded: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        total = None
        for b, items in enumerate(self.level):
            y = _Sequence(items, self.folded, name=str(b))(x)
            total = y if total is None else total + y
        return total


class _Sequence(nn.Module):
    items: tuple
    folded: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, item in enumerate(self.items):
            if item == 'max':
                x = nn.max_pool(x, (2, 2), (2, 2))
            elif item == 'avg':
                x = nn.avg_pool(x, (2, 2), (2, 2))
            elif item == 'up':
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            elif isinstance(item, tuple):
                x = Hourglass(item, self.folded, name=str(i))(x)
            else:
                x = Inception(item, self.folded, name=str(i))(x)
        return x


class MegaDepth(nn.Module):
    """The MegaDepth hourglass: float32 [N, H, W, 3] RGB in [0, 1] -> log depth [N, H, W, 1].

    H and W must be multiples of 16. `folded=True` takes parameters from `fold_batch_norm`.
    """

    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[1] % SIZE_MULTIPLE or x.shape[2] % SIZE_MULTIPLE:
            raise ValueError(f'MegaDepth input sides must be multiples of {SIZE_MULTIPLE}; got '
                             f'{x.shape[1]}x{x.shape[2]}')
        x = ConvBNReLU(STEM_CHANNELS, 7, 0, self.folded, affine=True, name='stem')(x)
        x = Hourglass(H1, self.folded, name='3')(x)
        return Conv(1, 3, name='4')(x)


# ----------------------------------------------------------------------------------------------
# Parameter layout: PyTorch keys <-> the Flax tree.
# ----------------------------------------------------------------------------------------------
# Flax needs a module per nesting level with parameters; PyTorch's Sequential slices (conv, BN,
# ReLU) have none, so the Flax tree has two wrapper levels PyTorch lacks: 'stem' around the
# stem's conv '0' and BN '1', and 'a' / 'b' around an inception branch's items 0-1 / 3-4. The
# maps below drop and restore them.


def state_dict_layout(num_batches_tracked: bool = False) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every entry of the released state dict, in PyTorch's order.

    Keys have no `module.` prefix. `num_batches_tracked`: include the int64 BN counters that
    PyTorch >= 0.4 adds (the released file, from 0.2-0.3, has none).
    """
    layout = []

    def conv(path, cin, cout, k):
        layout.extend([(f'{path}.weight', (cout, cin, k, k), 'float32'),
                       (f'{path}.bias', (cout,), 'float32')])

    def bn(path, c, affine=False):
        if affine:
            layout.extend([(f'{path}.weight', (c,), 'float32'), (f'{path}.bias', (c,), 'float32')])
        layout.extend([(f'{path}.running_mean', (c,), 'float32'),
                       (f'{path}.running_var', (c,), 'float32')])
        if num_batches_tracked:
            layout.append((f'{path}.num_batches_tracked', (), 'int64'))

    def inception(path, letter):
        cin, width, branches = INCEPTIONS[letter]
        conv(f'{path}.0.0', cin, width, 1)
        bn(f'{path}.0.1', width)
        for j, (reduce, out, k) in enumerate(branches, 1):
            conv(f'{path}.{j}.0', cin, reduce, 1)
            bn(f'{path}.{j}.1', reduce)
            conv(f'{path}.{j}.3', reduce, out, k)
            bn(f'{path}.{j}.4', out)

    def hourglass(path, level):
        for b, items in enumerate(level):
            for i, item in enumerate(items):
                if isinstance(item, tuple):
                    hourglass(f'{path}.0.{b}.{i}', item)
                elif item in INCEPTIONS:
                    inception(f'{path}.0.{b}.{i}', item)

    conv('0', 3, STEM_CHANNELS, 7)
    bn('1', STEM_CHANNELS, affine=True)
    hourglass('3', H1)
    conv('4', HEAD_CHANNELS, 1, 3)
    return layout


_LEAF_NAMES = {'running_mean': 'mean', 'running_var': 'var', 'bias': 'bias'}


def tree_path(key: str, ndim: int) -> tuple[str, ...]:
    """Flax tree path of a (prefix-free) state-dict key, e.g. '3.0.0.1.2.3.weight' ->
    ('3', '0', '0', '1', '2', 'b', '3', 'kernel')."""
    *modules, leaf = key.split('.')
    if leaf == 'weight':
        leaf = 'kernel' if ndim == 4 else 'scale'
    else:
        leaf = _LEAF_NAMES[leaf]
    if modules[0] in ('0', '1'):  # the stem's conv and BN
        return ('stem', *modules, leaf)
    if modules[0] == '3':  # inside an inception branch: items 0-1 go under 'a', 3-4 under 'b'
        *outer, item = modules
        return (*outer, 'a' if item in ('0', '1') else 'b', item, leaf)
    return (*modules, leaf)


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: dict, path: Sequence[str]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


class WeightsError(ValueError):
    """A state dict that does not fit MegaDepth; the message names the key."""


def params_from_state_dict(state_dict: dict[str, np.ndarray], source: str = 'state dict') -> dict:
    """Checks a MegaDepth state dict against `state_dict_layout` and returns the Flax tree.

    Accepts keys with or without the `module.` prefix (all or none) and with or without
    `num_batches_tracked`. Conv weights [O, I, k, k] become kernels [k, k, I, O]. Raises
    WeightsError naming `source` and the first missing, extra, mis-shaped or mis-typed key.
    """
    keys = list(state_dict)
    prefixed = [k.startswith(DATA_PARALLEL_PREFIX) for k in keys]
    if any(prefixed) and not all(prefixed):
        odd = keys[prefixed.index(not prefixed[0])]
        raise WeightsError(f'{source}: some keys have the {DATA_PARALLEL_PREFIX!r} prefix and '
                           f'some not (e.g. {odd!r})')
    strip = len(DATA_PARALLEL_PREFIX) if keys and all(prefixed) else 0
    found = {k[strip:]: v for k, v in state_dict.items() if not k.endswith('.num_batches_tracked')}
    layout = state_dict_layout()
    expected = {key: (shape, dtype) for key, shape, dtype in layout}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        raise WeightsError(
            f'{source}: not a MegaDepth state dict: '
            + (f'{len(missing)} missing key(s), e.g. {missing[:3]}' if missing else '')
            + ('; ' if missing and extra else '')
            + (f'{len(extra)} unexpected key(s), e.g. {extra[:3]}' if extra else ''))
    params: dict = {}
    for key, (shape, dtype) in expected.items():
        value = np.asarray(found[key])
        if value.shape != shape:
            raise WeightsError(f'{source}: {key} has shape {list(value.shape)}, expected '
                               f'{list(shape)}')
        if value.dtype != np.dtype(dtype):
            raise WeightsError(f'{source}: {key} has dtype {value.dtype}, expected {dtype}')
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        _set(params, tree_path(key, len(shape)), np.ascontiguousarray(value))
    return params


def state_dict_from_params(params: dict, prefix: str = DATA_PARALLEL_PREFIX) -> dict:
    """The inverse of `params_from_state_dict` (keys in PyTorch's order, no counters)."""
    out = {}
    for key, shape, _ in state_dict_layout():
        value = np.asarray(_get(params, tree_path(key, len(shape))))
        out[prefix + key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    return out


def seeded_state_dict(seed: int, num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
    """Random weights by the rule of tests/data/megadepth_reference/README.md (for tests and
    benchmarks): keys in the released order with the `module.` prefix."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape, dtype in state_dict_layout(num_batches_tracked):
        leaf = key.rsplit('.', 1)[1]
        if leaf == 'num_batches_tracked':
            value = np.zeros((), np.int64)
        elif len(shape) == 4:
            value = rng.standard_normal(shape) / math.sqrt(shape[1] * shape[2] * shape[3])
        elif leaf == 'weight':
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif leaf in ('bias', 'running_mean'):
            value = 0.1 * rng.standard_normal(shape)
        else:  # running_var
            value = 0.5 + rng.random(shape)
        out[DATA_PARALLEL_PREFIX + key] = value.astype(dtype)
    return out


def fold_batch_norm(params: dict) -> dict:
    """The tree for `MegaDepth(folded=True)`: each BN merged into the conv before it.

    conv(x) * s + t with s = scale / sqrt(var + eps), t = bias_bn - mean * s is the conv with
    kernel * s and bias (bias_conv - mean) * s + bias_bn. Pure numpy, float64 then float32.
    """

    def fold(tree: dict) -> dict:
        out = {}
        for name, child in tree.items():
            if not isinstance(child, dict):
                out[name] = child
                continue
            bn_name = str(int(name) + 1) if name.isdigit() else None
            conv = child
            if 'kernel' in conv and bn_name in tree and 'mean' in tree[bn_name]:
                bn = tree[bn_name]
                s = 1 / np.sqrt(np.float64(bn['var']) + BN_EPSILON) * bn.get('scale', 1.0)
                t = bn.get('bias', 0.0) - bn['mean'] * s
                out[name] = {'kernel': (conv['kernel'] * s).astype(np.float32),
                             'bias': (conv['bias'] * s + t).astype(np.float32)}
            elif 'mean' in child:
                continue  # folded into the conv before it
            else:
                out[name] = fold(child)
        return out

    return fold(params)


# ----------------------------------------------------------------------------------------------
# Imported parameters on disk: WORKDIR/depth/megadepth/{params.npz, meta.json}.
# ----------------------------------------------------------------------------------------------

MODEL_NAME = 'megadepth'


def params_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'depth', MODEL_NAME)


def save_params(workdir: str, params: dict, meta: dict) -> str:
    """Writes the (unfolded) tree as params.npz (keys: '/'-joined tree paths) + meta.json,
    each through a temporary file and a rename. Returns the directory."""
    directory = params_dir(workdir)
    os.makedirs(directory, exist_ok=True)
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    partial = os.path.join(directory, '.params.npz.partial')
    with open(partial, 'wb') as f:
        np.savez(f, **flat)
    os.replace(partial, os.path.join(directory, 'params.npz'))
    partial = os.path.join(directory, '.meta.json.partial')
    with open(partial, 'w') as f:
        json.dump({'model': MODEL_NAME, **meta}, f, indent=1)
    os.replace(partial, os.path.join(directory, 'meta.json'))
    return directory


def load_params(workdir: str) -> tuple[dict, dict]:
    """(params tree, meta) imported by `launch.py --mode=import_depth`.

    Raises FileNotFoundError saying how to import when there are none, WeightsError when the
    stored tree does not fit the network.
    """
    directory = params_dir(workdir)
    path = os.path.join(directory, 'params.npz')
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'No MegaDepth weights in {directory}: download best_generalization_net_G.pth (see '
            f'docs/depth.md) and run `python launch.py --mode=import_depth '
            f'--megadepth_weights=PATH/best_generalization_net_G.pth --workdir={workdir}`')
    with np.load(path, allow_pickle=False) as stored:
        flat = {name: stored[name] for name in stored.files}
    with open(os.path.join(directory, 'meta.json')) as f:
        meta = json.load(f)
    params: dict = {}
    for name, value in flat.items():
        _set(params, name.split('/'), value)
    expected = {tree_path(k, len(s)): s for k, s, _ in state_dict_layout()}
    for tree_key, shape in expected.items():
        try:
            value = _get(params, tree_key)
        except KeyError:
            raise WeightsError(f'{path}: missing {"/".join(tree_key)}') from None
        want = shape if len(shape) != 4 else (shape[2], shape[3], shape[1], shape[0])
        if value.shape != want or value.dtype != np.float32:
            raise WeightsError(f'{path}: {"/".join(tree_key)} is {value.dtype} {value.shape}, '
                               f'expected float32 {want}')
    if len(flat) != len(expected):
        raise WeightsError(f'{path}: {len(flat)} arrays, expected {len(expected)}')
    return params, meta
