"""How a conditioned PyNET (config.model.condition) reads its control maps (bokeh_jax/control.py).

The model's input stays one array: x [N, H, W, C + k], C = 3 or 4 (RGB, RGB + depth), then the
k = control.condition_channels(condition) control maps: s = 2/N (constant), and for
'aperture_focus' the signed defocus map s * (disparity - focus). Methods (PyNET.condition_method):

- 'input': the maps are extra input channels of the first convolution (e1, after
  space-to-depth); every level sees them through the encoder.
- 'levels': as 'input', and the maps, average-pooled to each level's resolution, are extra input
  channels of every level's first convolution (levels 7..3: the first multi-block; levels 2 and 1:
  the transposed conv; Bokehlicious' way of feeding the aperture to every scale).
- 'film': s enters as a per-channel scale and shift (FiLM) of every multi-block's second
  convolutions, from a small MLP on Fourier features of s; the defocus map (if any) is an extra
  input channel of e1 as in 'input'.

The weights that read the maps are kept apart from the paper's: a layer with extra input channels
stores their kernel under `<layer>/control/kernel` (concatenated to `conv/kernel` on the input
axis when it runs: one convolution), and the FiLM weights under `<block>/film` and
`encoder/film_mlp`. So an unconditioned tree is a subtree of a conditioned one, and setting the
new kernels and FiLM heads to zero turns a conditioned model into the unconditioned one
(model.condition_params).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import control

METHODS = ('input', 'levels', 'film')
# Octaves of the Fourier features of s (in [1/16, 2] for f/32..f/1): sin and cos of pi * 2^j * s.
FOURIER_OCTAVES = 4
FILM_WIDTH = 64  # hidden and output width of the FiLM MLP


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f'model.condition_method must be one of {METHODS}; got {method!r}')
    return method


def split_input(x: jax.Array, condition: str) -> tuple[jax.Array, jax.Array]:
    """x [N, H, W, C + k] -> (photo (+ depth) [N, H, W, C], control maps [N, H, W, k])."""
    base = x.shape[-1] - control.condition_channels(condition)
    return x[..., :base], x[..., base:]


def avg_pool2(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, H/2, W/2, C], the mean of each 2x2 block."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def depth_to_space(x: jax.Array, channels: int) -> jax.Array:
    """The inverse of model.space_to_depth: [N, h, w, 4C] -> [N, 2h, 2w, C]."""
    n, h, w, _ = x.shape
    x = x.reshape(n, h, w, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, 2 * h, 2 * w, channels)


def mean_of_quads(x: jax.Array, channels: int) -> jax.Array:
    """Space-to-depth maps [N, h, w, 4C] -> their 2x2 means [N, h, w, C] (= avg_pool2 of the
    maps before space-to-depth)."""
    n, h, w, _ = x.shape
    return x.reshape(n, h, w, 4, channels).mean(axis=3)


def level_maps(maps_half: jax.Array) -> dict[int, jax.Array]:
    """{level: maps at its resolution} for levels 4..7 (H/4 .. H/32), from the maps at H/2."""
    out, m = {}, maps_half
    for level in (4, 5, 6, 7):
        m = avg_pool2(m)
        out[level] = m
    return out


def fourier_features(s: jax.Array) -> jax.Array:
    """s [N] -> [N, 1 + 2 * FOURIER_OCTAVES]: s, and sin / cos of pi * 2^j * s."""
    angles = jnp.pi * s[:, None] * (2.0 ** jnp.arange(FOURIER_OCTAVES, dtype=jnp.float32))
    return jnp.concatenate([s[:, None], jnp.sin(angles), jnp.cos(angles)], axis=-1)


class FilmEmbedding(nn.Module):
    """s [N] -> embedding [N, FILM_WIDTH]: two leaky-ReLU layers on its Fourier features."""

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        h = fourier_features(s.astype(jnp.float32))
        for i in range(2):
            h = nn.Dense(FILM_WIDTH, name=f'hidden{i}')(h)
            h = jnp.maximum(0.2 * h, h)
        return h


def film_head(embedding: jax.Array, features: int) -> tuple[jax.Array, jax.Array]:
    """Inside a module: (scale, shift), each float32 [N, features], from a Dense `film` that
    starts at zero (scale 0 -> the layer's output is multiplied by 1 + 0: FiLM is the identity)."""
    out = nn.Dense(2 * features, kernel_init=nn.initializers.zeros, name='film')(embedding)
    return out[:, :features], out[:, features:]


def apply_film(x: jax.Array, film: tuple[jax.Array, jax.Array]) -> jax.Array:
    """x [N, H, W, C] * (1 + scale) + shift, scale and shift [N, C]."""
    scale, shift = (v[:, None, None, :].astype(x.dtype) for v in film)
    return x * (1 + scale) + shift


def is_new_weight(names: tuple[str, ...]) -> bool:
    """Whether the parameter at `names` reads the control maps into a layer of the paper's model
    (a `control` kernel or a FiLM head): zero means it changes nothing."""
    return 'control' in names or names[-2] == 'film'


def width_of(params: Any) -> tuple[int, int]:
    """(channels, input_channels) of a parameter tree: the base width and 3 or 4 (RGB(+depth);
    control maps have their own kernels and are not counted)."""
    kernel = params['encoder']['e1']['k3a']['conv']['kernel']
    return int(kernel.shape[-1]), int(kernel.shape[2]) // 4


def condition_of(params: Any) -> tuple[str, str]:
    """(condition, condition_method) of a parameter tree, read from its structure: ('none',
    'input') for the paper's model. Build the model that runs it with
    PyNET(channels, condition=..., condition_method=...)."""
    e1 = params['encoder']['e1']['k3a']
    maps = int(e1['control']['kernel'].shape[2]) // 4 if 'control' in e1 else 0
    if 'film_mlp' in params['encoder']:
        return control.CONDITIONS[maps + 1], 'film'
    if maps == 0:
        return 'none', 'input'
    method = 'levels' if 'control' in params['level7']['d1']['k3a'] else 'input'
    return control.CONDITIONS[maps], method


def condition_of_meta(meta: dict) -> tuple[str, str]:
    """(condition, condition_method) of saved parameters' meta; absent (older saves) = 'none'."""
    return meta.get('condition', 'none'), meta.get('condition_method', 'input')


def grow(params: Any, fresh: Any) -> Any:
    """`fresh` (a conditioned tree) with every parameter `params` has taken from `params`, the
    kernels and FiLM heads that read the control maps zero, and the FiLM MLP as drawn in `fresh`
    (random, so that the zero heads receive gradients)."""
    def pick(path, leaf):
        names = tuple(k.key for k in path)
        node = params
        for name in names:
            node = node.get(name) if isinstance(node, Mapping) else None
            if node is None:
                break
        if node is not None:
            if np.shape(node) != np.shape(leaf):
                raise ValueError(f'{"/".join(names)}: shape {np.shape(node)} in the parameters, '
                                 f'{np.shape(leaf)} in the conditioned model')
            return np.asarray(node, np.float32)
        if is_new_weight(names):
            return np.zeros(np.shape(leaf), np.float32)
        return np.asarray(leaf, np.float32)

    return jax.tree_util.tree_map_with_path(pick, fresh)
