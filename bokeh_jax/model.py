"""PyNET for bokeh rendering (Ignatov, Patel, Timofte, CVPR-W 2020) as a Flax Linen module.

Levels are numbered as in the paper: level 1 is the finest (the original photo's size), level 7 the
coarsest (1/32 of the input). See ../shared/SPEC.md for the layer-by-layer definition this follows.

Parameter tree: top-level groups `encoder`, `level7`, ..., `level1`. Inside a level, blocks are
named
after the paper's feature maps (`d1`, `d3`, `f`, ...), the two transposed convolutions towards the
next finer level are `up_a` / `up_b`, and the side output of levels 7..3 is `head`. The path to
output k is therefore: `encoder`, every coarser level without its `head`, and all of level k.

It is longer than the project's other modules on purpose: the seven levels are written out as the
paper and SPEC list them, block by block, so that each can be checked against the original graph
line by line; splitting them over files would make that comparison harder. The layers that read
a conditioned model's control maps (model.condition) are here where they join the paper's; how the
maps are prepared and the FiLM MLP are in conditioning.py.
"""

from typing import Any, Sequence

import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import conditioning
from bokeh_jax import control as control_lib
from bokeh_jax import onednn
from bokeh_jax import residual as residual_lib
# The residual model's helpers (model.residual), re-exported for model users.
from bokeh_jax.residual import residual_base, residual_head, upscale2x  # noqa: F401
# What a parameter tree is conditioned on (model.condition), re-exported for model users.
from bokeh_jax.conditioning import condition_of, condition_of_meta, width_of  # noqa: F401
# The paper's levels (coarsest first) and the multiple that input sides must be (space-to-depth
# and four max-pools: 2 * 2**4), defined with the image geometry and re-exported for model users.
from bokeh_jax.image_ops import LEVELS, SIZE_MULTIPLE
# Levels whose side output `head` is not on the path to finer levels.
SIDE_HEAD_LEVELS = (7, 6, 5, 4, 3)
# Blocks of each group in the order the original TF graph creates their variables
# (the order of `generator/Variable_*` in the released checkpoint).
CREATION_ORDER = {
    'encoder': ('e1', 'e2', 'e3', 'e4'),
    'level7': ('d1', 'd2', 'd3', 'f', 'up_a', 'up_b', 'head'),
    'level6': ('d3', 'd4', 'd5', 'd6', 'f', 'up_a', 'up_b', 'head'),
    'level5': ('d3', 'd4', 'd5', 'd6', 'f', 'up_a', 'up_b', 'head'),
    'level4': ('d3', 'd4', 'd5', 'd6', 'd7', 'd8', 'f', 'up_a', 'up_b', 'head'),
    'level3': ('d3', 'd4', 'd5', 'd6', 'd7', 'd8', 'd9', 'd10', 'f', 'head'),
    'level2': ('up', 'logits'),
    'level1': ('up', 'head'),
}
# He et al.'s gain for leaky ReLU with slope 0.2: keeps activation variance through the layers.
LEAKY_RELU_GAIN = float(np.sqrt(2.0 / (1.0 + 0.2**2)))
# Width of level 2's transposed conv; a fixed number in the paper, not tied to the base width.
LEVEL2_WIDTH = 8


def level_output_scale(level: int) -> float:
    """Output side of `level` relative to the model input side: 2 for level 1, 1/32 for level 7."""
    return 2.0 ** (2 - level)


def leaky_relu(x: jax.Array) -> jax.Array:
    return jnp.maximum(0.2 * x, x)


def space_to_depth(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, H/2, W/2, 4C], channel index (dy*2 + dx)*C + c as TF's space_to_depth."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // 2, w // 2, 4 * c)


def max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


# Implementations of ConvLayer's convolution (`PyNET.conv_impl`, config.model.conv_impl).
CONV_IMPLS = {
    'xla': jax.lax.conv_general_dilated,
    # oneDNN custom calls, CPU only: 3-4x faster kernel gradients (bokeh_jax/onednn.py).
    'onednn': onednn.conv_general_dilated,
    # The same in bfloat16 with float32 sums and result (rendering; bokeh_jax/onednn.py).
    'onednn_bf16': onednn.conv_general_dilated_bf16,
}


def check_conv_impl(conv_impl: str) -> None:
    if conv_impl not in (*CONV_IMPLS, 'auto'):
        raise ValueError(f'config.model.conv_impl must be one of {sorted(CONV_IMPLS)} or '
                         f"'auto', got {conv_impl!r}")


@functools.cache
def resolve_conv_impl(conv_impl: str) -> str:
    """'auto' -> 'onednn' where it runs (CPU backend, oneDNN installed by `make onednn`), else
    'xla'; any other name is returned unchanged."""
    if conv_impl != 'auto':
        return conv_impl
    if jax.default_backend() != 'cpu':
        return 'xla'
    try:
        onednn.ensure_registered()
    except (onednn.OneDNNUnavailable, OSError) as e:
        logging.info("conv_impl='auto' runs on XLA: %s", e)
        return 'xla'
    return 'onednn'


def compute_plan(dtype: Any, conv_impl: str) -> tuple[Any, str]:
    """(module dtype, conv_impl) that PyNET runs for its `dtype` and `conv_impl` attributes.

    bfloat16 with oneDNN convolutions (CPU): the multi-blocks' convolutions of levels 7..3 take
    bfloat16 operands with float32 sums ('onednn_bf16'); everything else stays float32 (XLA:CPU's
    own bfloat16 convolutions and norms are slower than float32), the encoder included: see
    `encoder_conv_impl`. Otherwise both are used as they are.
    """
    if jnp.dtype(dtype) == jnp.bfloat16 and resolve_conv_impl(conv_impl) == 'onednn':
        return jnp.float32, 'onednn_bf16'
    return dtype, conv_impl


def encoder_conv_impl(conv_impl: str) -> str:
    """The encoder's convolutions for the model's planned `conv_impl`: float32 ('onednn') in
    place of 'onednn_bf16', the same otherwise.

    Rounding the encoder's activations to bfloat16 costs most of the bfloat16 render's accuracy:
    its errors enter every level (e1..e4 are skipped into levels 3..7) and cross the most layers.
    Against the float32 render of real photos, bfloat16 in the encoder alone gives 43-47 dB, in all
    of levels 7..3 together 52-55 dB; the encoder is under 1% of the forward's FLOPs
    (docs/performance.md).
    """
    return 'onednn' if conv_impl == 'onednn_bf16' else conv_impl


class _ConvParams(nn.Module):
    """`kernel` [size, size, in, out] and `bias` [out] of a conv, as nn.Conv creates them."""

    features: int
    size: int = 3

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param('kernel', nn.initializers.lecun_normal(),
                            (self.size, self.size, in_features, self.features))
        return kernel, self.param('bias', nn.initializers.zeros, (self.features,))


class _ControlKernel(nn.Module):
    """`kernel` of the control maps' extra input channels (bokeh_jax/conditioning.py)."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param('kernel', nn.initializers.lecun_normal(), self.shape)


class ConvLayer(nn.Module):
    """conv(k, n): stride 1, zero 'SAME' padding, bias, optional instance norm, leaky ReLU 0.2.

    Called with `control` (maps [N, H, W, m]): they are m more input channels, with their own
    kernel `control/kernel` [k, k, m, n]. With `film` ((scale, shift), each [N, n]): the output
    before the activation is multiplied by 1 + scale and shifted (conditioning.py).
    """

    features: int
    kernel: int
    instance_norm: bool
    activation: bool = True
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'  # a key of CONV_IMPLS; the parameters are the same for all

    @nn.compact
    def __call__(self, x: jax.Array, control: jax.Array | None = None,
                 film: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        conv_general_dilated = CONV_IMPLS[resolve_conv_impl(self.conv_impl)]
        if control is None:
            x = nn.Conv(
                self.features,
                (self.kernel, self.kernel),
                padding='SAME',
                dtype=self.dtype,
                conv_general_dilated=conv_general_dilated,
                name='conv',
            )(x)
        else:
            x = self._conv_with_control(x, control, conv_general_dilated)
        if self.instance_norm:
            # Per sample and channel over H, W; biased variance; eps inside the sqrt (TF original).
            x = nn.InstanceNorm(epsilon=1e-3, dtype=self.dtype, name='norm')(x)
        if film is not None:
            x = conditioning.apply_film(x, film)
        return leaky_relu(x) if self.activation else x

    def _conv_with_control(self, x, control, conv_general_dilated):
        """nn.Conv's computation on [x, control] with kernel [conv/kernel, control/kernel]."""
        k = self.kernel
        kernel, bias = _ConvParams(self.features, k, name='conv')(x.shape[-1])
        extra = _ControlKernel((k, k, control.shape[-1], self.features), name='control')()
        x = jnp.concatenate([x, control.astype(x.dtype)], axis=-1).astype(self.dtype)
        kernel = jnp.concatenate([kernel, extra], axis=2).astype(self.dtype)
        dimensions = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                    ('NHWC', 'HWIO', 'NHWC'))
        y = conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=dimensions)
        return y + bias.astype(self.dtype)


class MultiBlock(nn.Module):
    """mb(kmax, n): parallel branches of two conv(k, n) for k = 3, 5, ..., kmax, concatenated."""

    kmax: int
    features: int
    instance_norm: bool
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array, control: jax.Array | None = None,
                 film: jax.Array | None = None) -> jax.Array:
        """control: maps read by the first convs as extra channels; film: the FiLM embedding
        [N, E], which scales and shifts the second convs (conditioning.py)."""
        outputs = []
        kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        ks = range(3, self.kmax + 1, 2)
        n = self.features
        if film is not None:
            scale, shift = conditioning.film_head(film, n * len(ks))
        for i, k in enumerate(ks):
            y = ConvLayer(n, k, self.instance_norm, **kw, name=f'k{k}a')(x, control)
            branch_film = None if film is None else (scale[:, i * n:(i + 1) * n],
                                                     shift[:, i * n:(i + 1) * n])
            y = ConvLayer(n, k, self.instance_norm, **kw, name=f'k{k}b')(y, film=branch_film)
            outputs.append(y)
        return jnp.concatenate(outputs, axis=-1)


# Kernel index (per spatial axis) of TF's 'SAME' stride-2 3x3 transposed conv that links output
# phase p to tap d of the input padded by one in front (tap 0 = x[m-1], tap 1 = x[m]): an even
# output 2m reads x[m-1] through kernel index 2 and x[m] through index 0, an odd output 2m+1 reads
# only x[m], through index 1 (SPEC "up": implicit padding (2, 1) of the dilated input).
_PHASE_TAPS = {(0, 0): 2, (0, 1): 0, (1, 1): 1}


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
    """TF transposed-conv kernel [3, 3, out, in] -> 2x2 conv kernel [2, 2, in, 4*out].

    Output channel (2a + b)*out + o of the 2x2 conv is output pixel (2m + a, 2n + b), channel o.
    """
    _, _, out, cin = kernel.shape
    zeros = jnp.zeros((cin, out), kernel.dtype)
    taps = []
    for dy in (0, 1):
        row = []
        for dx in (0, 1):
            phases = []
            for a in (0, 1):
                for b in (0, 1):
                    iy, ix = _PHASE_TAPS.get((a, dy)), _PHASE_TAPS.get((b, dx))
                    phases.append(zeros if iy is None or ix is None else kernel[iy, ix].T)
            row.append(jnp.concatenate(phases, axis=-1))
        taps.append(jnp.stack(row))
    return jnp.stack(taps)


def upsample2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """TF conv2d_transpose(x, kernel, stride 2, 'SAME'): [N, H, W, in] -> [N, 2H, 2W, out].

    Computed as its sub-pixel equivalent, a stride-1 2x2 conv to the four output phases followed
    by depth-to-space. nn.ConvTranspose lowers to a convolution over the zero-dilated input (four
    times the positions, three quarters of them zeros), which XLA:CPU runs slower; on levels 2 and
    1 the sub-pixel form measured ~20% faster forward and ~2x faster backward.
    """
    n, h, w, _ = x.shape
    out = kernel.shape[2]
    y = jax.lax.conv_general_dilated(
        x,
        subpixel_kernel(kernel),
        (1, 1),
        ((1, 0), (1, 0)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    y = y.reshape(n, h, w, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * h, 2 * w, out)


class _TransposedKernel(nn.Module):
    """The `kernel` [3, 3, out, in] of an up(n) layer, in TF's conv2d_transpose layout."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        # As nn.ConvTranspose(transpose_kernel=True) creates it: same shape and initializer.
        shape = (3, 3, self.features, in_features)
        return self.param('kernel', nn.initializers.lecun_normal(), shape)


class Upsample(nn.Module):
    """up(n): 3x3 stride-2 transposed conv (TF 'SAME': exactly 2H x 2W), no bias, leaky ReLU.

    The kernel keeps TF's conv2d_transpose layout [3, 3, out, in] under `conv/kernel`; `control`
    maps [N, H, W, m] are m more input channels, kernel `control/kernel` [3, 3, out, m].
    """

    features: int
    activation: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, control: jax.Array | None = None) -> jax.Array:
        kernel = _TransposedKernel(self.features, name='conv')(x.shape[-1])
        if control is not None:
            extra = _ControlKernel((3, 3, self.features, control.shape[-1]), name='control')()
            x = jnp.concatenate([x, control.astype(x.dtype)], axis=-1)
            kernel = jnp.concatenate([kernel, extra], axis=3)
        x = upsample2x(x.astype(self.dtype), kernel.astype(self.dtype))
        return leaky_relu(x) if self.activation else x


# Input channels up to which a 3x3 head runs as a sum of shifted products instead of a conv: level
# 1's head, on the RGB output of its transposed conv.
_FEW_CHANNELS = 3


def _conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )


@jax.custom_vjp
def conv3x3_few_channels(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' 3x3 conv of an NHWC input with a handful of channels (level 1's RGB head).

    XLA:CPU's convolution runs such a layer at ~2 GFLOP/s (~0.1 s for a 1024 x 1536 image); nine
    shifted multiply-adds per input channel fuse into one pass over memory instead (~10x faster).
    The gradient is the convolution's: the same products written out are far slower to reverse.
    """
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy : dy + h, dx : dx + w, :]
            for ci in range(c):
                term = window[..., ci : ci + 1] * kernel[dy, dx, ci]
                out = term if out is None else out + term
    return out


def _few_channels_fwd(x, kernel):
    return conv3x3_few_channels(x, kernel), (x, kernel)


def _few_channels_bwd(residuals, g):
    return jax.vjp(_conv3x3, *residuals)[1](g)


conv3x3_few_channels.defvjp(_few_channels_fwd, _few_channels_bwd)


class Head(nn.Module):
    """3x3 conv to RGB logits with bias, no norm, no activation."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _ConvParams(3, name='conv')(x.shape[-1])
        x, kernel, bias = (v.astype(self.dtype) for v in (x, kernel, bias))
        if x.shape[-1] <= _FEW_CHANNELS:
            return conv3x3_few_channels(x, kernel) + bias
        return _conv3x3(x, kernel) + bias


def _cat(*xs: jax.Array) -> jax.Array:
    return jnp.concatenate(xs, axis=-1)


class _Level(nn.Module):
    """Shared plumbing of a level: `head` (side output), `up_a`/`up_b` (to the next finer level).

    A level's `__call__` takes, besides its features, `control` (the control maps at its
    resolution, read by its first block: condition_method 'levels') and `film` (the FiLM
    embedding, read by every block: 'film'); both None in the unconditioned model.
    """

    channels: int = 32
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'

    def mb(self, kmax: int, width: int, instance_norm: bool = True) -> MultiBlock:
        return MultiBlock(kmax, width, instance_norm, dtype=self.dtype, conv_impl=self.conv_impl)

    def image(self, f: jax.Array, base: jax.Array | None = None,
              gain: jax.Array | None = None) -> jax.Array:
        """Side output: float32 image from the level's features (`residual_head`)."""
        return residual_head(self.head(f), base, gain)

    def ups(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The two separate transposed convs that feed the next finer level."""
        return self.up_a(f), self.up_b(f)


class Encoder(_Level):
    """e1..e4 at H/2 ... H/16 (after space-to-depth); no instance norm in e1.

    With `film`, it also holds the FiLM MLP (`film_mlp`, conditioning.FilmEmbedding).
    """

    film: bool = False

    def setup(self):
        c = self.channels
        self.e1 = self.mb(3, c, instance_norm=False)
        self.e2 = self.mb(3, 2 * c)
        self.e3 = self.mb(3, 4 * c)
        self.e4 = self.mb(3, 8 * c)
        if self.film:
            self.film_mlp = conditioning.FilmEmbedding()

    def __call__(self, x: jax.Array, control: jax.Array | None = None,
                 film: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """control: the maps e1 reads, already space-to-depth'ed like x."""
        e1 = self.e1(space_to_depth(x), control, film)
        e2 = self.e2(max_pool(e1), film=film)
        e3 = self.e3(max_pool(e2), film=film)
        e4 = self.e4(max_pool(e3), film=film)
        return e1, e2, e3, e4

    def embed(self, s: jax.Array) -> jax.Array:
        """The FiLM embedding [N, E] of s [N]."""
        return self.film_mlp(s)


class Level7(_Level):
    """H/32: a residual trunk of 512-wide blocks (at width 32)."""

    def setup(self):
        w = 16 * self.channels
        self.d1, self.d2, self.d3, self.f = (self.mb(3, w) for _ in range(4))
        self.up_a = Upsample(8 * self.channels, dtype=self.dtype)
        self.up_b = Upsample(8 * self.channels, dtype=self.dtype)
        self.head = Head(dtype=self.dtype)

    def __call__(self, e4: jax.Array, control=None, film=None) -> jax.Array:
        d1 = self.d1(max_pool(e4), control, film)
        d2 = self.d2(d1, film=film) + d1
        d3 = self.d3(d2, film=film) + d2
        return self.f(d3, film=film)


class Level6(_Level):
    """H/16."""

    def setup(self):
        w = 8 * self.channels
        self.d3, self.d4, self.d5, self.d6, self.f = (self.mb(3, w) for _ in range(5))
        self.up_a = Upsample(4 * self.channels, dtype=self.dtype)
        self.up_b = Upsample(4 * self.channels, dtype=self.dtype)
        self.head = Head(dtype=self.dtype)

    def __call__(self, e4: jax.Array, u7a: jax.Array, u7b: jax.Array, control=None,
                 film=None) -> jax.Array:
        d3 = self.d3(_cat(e4, u7a), control, film)
        d4 = self.d4(d3, film=film) + d3
        d5 = self.d5(d4, film=film) + d4
        d6 = _cat(self.d6(d5, film=film), u7b)
        return self.f(d6, film=film)


class Level5(_Level):
    """H/8: kernels up to 5."""

    def setup(self):
        w = 4 * self.channels
        self.d3, self.d4, self.d5, self.d6 = (self.mb(5, w) for _ in range(4))
        self.f = self.mb(3, w)
        self.up_a = Upsample(2 * self.channels, dtype=self.dtype)
        self.up_b = Upsample(2 * self.channels, dtype=self.dtype)
        self.head = Head(dtype=self.dtype)

    def __call__(self, e3: jax.Array, u6a: jax.Array, u6b: jax.Array, control=None,
                 film=None) -> jax.Array:
        a = _cat(e3, u6a)
        d3 = self.d3(a, control, film) + a
        d4 = self.d4(d3, film=film) + d3
        d5 = self.d5(d4, film=film) + d4
        d7 = _cat(self.d6(d5, film=film), e3, u6b)
        return self.f(d7, film=film)


class Level4(_Level):
    """H/4: kernels up to 7, e2 skipped in three times."""

    def setup(self):
        w = 2 * self.channels
        self.d3 = self.mb(5, w)
        self.d4, self.d5, self.d6, self.d7 = (self.mb(7, w) for _ in range(4))
        self.d8 = self.mb(5, w)
        self.f = self.mb(3, w)
        self.up_a = Upsample(self.channels, dtype=self.dtype)
        self.up_b = Upsample(self.channels, dtype=self.dtype)
        self.head = Head(dtype=self.dtype)

    def __call__(self, e2: jax.Array, u5a: jax.Array, u5b: jax.Array, control=None,
                 film=None) -> jax.Array:
        d3 = _cat(self.d3(_cat(e2, u5a), control, film), e2)
        d4 = self.d4(d3, film=film) + d3
        d5 = self.d5(d4, film=film) + d4
        d6 = self.d6(d5, film=film) + d5
        d7 = _cat(self.d7(d6, film=film), e2)
        d8 = _cat(self.d8(d7, film=film), u5b)
        return self.f(d8, film=film)


class Level3(_Level):
    """H/2: no instance norm anywhere, kernels up to 9, e1 skipped in four times."""

    def setup(self):
        w = self.channels
        mb = lambda k: self.mb(k, w, instance_norm=False)
        self.d3, self.d4 = mb(5), mb(7)
        self.d5, self.d6, self.d7, self.d8 = mb(9), mb(9), mb(9), mb(9)
        self.d9, self.d10, self.f = mb(7), mb(5), mb(3)
        self.head = Head(dtype=self.dtype)

    def __call__(self, e1: jax.Array, u4a: jax.Array, u4b: jax.Array, control=None,
                 film=None) -> jax.Array:
        d3 = _cat(self.d3(_cat(e1, u4a), control, film), e1)
        d4 = self.d4(d3, film=film)
        d5 = self.d5(d4, film=film)
        d6 = self.d6(d5, film=film) + d5
        d7 = self.d7(d6, film=film) + d6
        d8 = self.d8(d7, film=film) + d7
        d9 = _cat(self.d9(d8, film=film), e1)
        d11 = _cat(self.d10(d9, film=film), u4b, e1)
        return self.f(d11, film=film)


class Level2(nn.Module):
    """H: up(8) then a 3x3 conv to RGB logits z2 (no activation); output 2 = tanh(z2)*0.58+0.5."""

    dtype: Any = jnp.float32

    def setup(self):
        self.up = Upsample(LEVEL2_WIDTH, dtype=self.dtype)
        self.logits = Head(dtype=self.dtype)

    def __call__(self, f3: jax.Array, control: jax.Array | None = None) -> jax.Array:
        return self.logits(self.up(f3, control))


class Level1(nn.Module):
    """2H: up(3) of level 2's pre-tanh logits, then the image head."""

    dtype: Any = jnp.float32

    def setup(self):
        self.up = Upsample(3, dtype=self.dtype)
        self.head = Head(dtype=self.dtype)

    def __call__(self, z2: jax.Array, control: jax.Array | None = None,
                 base: jax.Array | None = None, gain: jax.Array | None = None) -> jax.Array:
        """base, gain: PyNET.residual's level-1 base image and gain (`residual_head`), or None."""
        return residual_head(self.head(self.up(z2, control)), base, gain)


class PyNET(nn.Module):
    """The multi-scale PyNET bokeh model.

    Attributes:
      channels: base width (32 in the paper); level widths are multiples of it.
      dtype: computation dtype (parameters stay float32).
      conv_impl: what runs the multi-blocks' convolutions, a key of CONV_IMPLS: 'xla' or
        'onednn' (CPU, float32; needs `make onednn`), or 'auto' (oneDNN where it runs, else XLA).
        dtype bfloat16 with oneDNN: see `compute_plan`.
        Same parameters and function for all.
      condition: control.CONDITIONS: 'none' (the paper's model, one fixed look), 'aperture' or
        'aperture_focus': the input carries that many control maps after its photo channels.
      condition_method: how the maps are read, conditioning.METHODS ('input', 'levels', 'film';
        see bokeh_jax/conditioning.py); ignored when condition is 'none'.
      residual: False (the paper): every level's image is image_head(z) of its logits z. True (a
        deviation, config.model.residual): it is the model input's RGB resized to the level's
        size plus tanh(z)*0.58, so zero logits reproduce the input and the network learns only
        the change (`residual_base`). 'aperture' (config.model.residual_gain, conditioned models
        only): True with the change scaled by s = 2/N (bokeh_jax/residual.py). The same
        parameters in all three.

    Call with x float32 [N, H, W, C + k] in [0, 1], C = 4 (RGB + depth, the paper) or 3 (RGB
    only), k = control.condition_channels(condition) control maps (control.append_condition), H
    and W multiples of 32, and `level` k in 1..7. Returns {level: image} for every level from 7
    down to k; image j is float32 [N, H*s, W*s, 3] with s = level_output_scale(j), range about
    -0.08..1.08. Nothing finer than level k is computed. `init` always creates all parameters
    (every level and side head), whatever `level` it is called with.
    """

    channels: int = 32
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'
    condition: str = 'none'
    condition_method: str = 'input'
    residual: bool | str = False

    def setup(self):
        check_conv_impl(self.conv_impl)
        control_lib.check_condition(self.condition)
        residual_lib.check_residual(self.residual, self.condition)
        conditioning.check_method(self.condition_method)
        dtype, conv_impl = compute_plan(self.dtype, self.conv_impl)
        kw = dict(channels=self.channels, dtype=dtype, conv_impl=conv_impl)
        self.encoder = Encoder(**{**kw, 'conv_impl': encoder_conv_impl(conv_impl)},
                               film=self._method == 'film')
        self.level7, self.level6, self.level5 = Level7(**kw), Level6(**kw), Level5(**kw)
        self.level4, self.level3 = Level4(**kw), Level3(**kw)
        self.level2, self.level1 = Level2(dtype=dtype), Level1(dtype=dtype)

    @property
    def _method(self) -> str | None:
        """condition_method, or None for the unconditioned model."""
        return None if self.condition == 'none' else self.condition_method

    def __call__(self, x: jax.Array, level: int = 1) -> dict[int, jax.Array]:
        if level not in LEVELS:
            raise ValueError(f'level must be one of {LEVELS}, got {level!r}')
        if self.is_initializing():
            level = 1  # the full tree, side heads included, whatever level was asked for
        outputs, skips = self.coarse(x, stop_at=level)
        if level <= 3:
            outputs.update(self.fine(*skips, stop_at=level))
        return outputs

    def coarse(
        self, x: jax.Array, stop_at: int = 4
    ) -> tuple[dict[int, jax.Array], tuple[jax.Array, ...]]:
        """Encoder and the instance-norm levels 7..max(stop_at, 4), which need the whole image.

        Returns ({level: image}, (e1, u4a, u4b)); the second item, the input of the fine levels, is
        only computed when stop_at <= 3 (else empty). A conditioned model adds a skip, its control
        maps space-to-depth'ed to level 3's grid ([N, H/2, W/2, 4k]), which tiles like e1; a
        residual model then one more, the input's RGB space-to-depth'ed likewise ([N, H/2, W/2,
        12]): the base images of levels 3..1.
        """
        check_input(x, self.condition)
        dtype = compute_plan(self.dtype, self.conv_impl)[0]
        film, control, extra, gain = None, {}, (), None
        rgb = x[..., :3].astype(jnp.float32)
        base = functools.partial(residual_base, rgb) if self.residual else lambda level: None
        if self._method is None:
            e1, e2, e3, e4 = self.encoder(x.astype(dtype))
        else:
            x, maps = conditioning.split_input(x, self.condition)
            maps_half = space_to_depth(maps)  # float32: s is read from it (fine)
            extra = (maps_half,)
            gain = residual_lib.aperture_gain(self.residual, maps)
            if self._method == 'film':
                film = self.encoder.embed(maps[:, 0, 0, 0])  # s, read before any cast
                defocus = maps[..., 1:]  # empty for 'aperture'
                e1_maps = space_to_depth(defocus.astype(dtype)) if defocus.shape[-1] else None
            else:
                e1_maps = maps_half
            if self._method == 'levels':
                half = conditioning.mean_of_quads(maps_half, maps.shape[-1])
                control = conditioning.level_maps(half)
            e1, e2, e3, e4 = self.encoder(x.astype(dtype), e1_maps, film)
        outputs = {}
        f = self.level7(e4, control.get(7), film)
        outputs[7] = self.level7.image(f, base(7), gain)
        for lvl, module, skip in ((6, self.level6, e4), (5, self.level5, e3), (4, self.level4, e2)):
            if stop_at > lvl:
                return outputs, ()
            f = module(skip, *getattr(self, f'level{lvl + 1}').ups(f), control.get(lvl), film)
            outputs[lvl] = module.image(f, base(lvl), gain)
        if stop_at > 3:
            return outputs, ()
        if self.residual:
            extra = (*extra, space_to_depth(rgb))
        return outputs, (e1, *self.level4.ups(f), *extra)

    def fine(
        self, e1: jax.Array, u4a: jax.Array, u4b: jax.Array, *extra: jax.Array, stop_at: int = 1
    ) -> dict[int, jax.Array]:
        """Levels 3..stop_at from level 3's inputs; no instance norm, so it can run on tiles.

        extra: `coarse`'s further skips, cropped like the others: a conditioned model's control
        maps, then a residual model's RGB base.
        """
        maps = extra[0] if self._method is not None else None
        gain = residual_lib.aperture_gain(self.residual, maps)
        bases = {3: None, 2: None, 1: None}
        if self.residual:
            bases[2] = conditioning.depth_to_space(extra[-1], 3)
            bases[3] = conditioning.mean_of_quads(extra[-1], 3)
            bases[1] = upscale2x(bases[2]) if stop_at == 1 else None
        film, control, control1 = None, None, None
        if self._method == 'film':
            film = self.encoder.embed(maps[:, 0, 0, 0].astype(jnp.float32))  # s: channel 0
        elif self._method == 'levels':
            k = control_lib.condition_channels(self.condition)
            control = conditioning.mean_of_quads(maps, k)
            control1 = conditioning.depth_to_space(maps, k)
        f3 = self.level3(e1, u4a, u4b, control, film)
        outputs = {3: self.level3.image(f3, bases[3], gain)}
        if stop_at <= 2:
            z2 = self.level2(f3, control)
            outputs[2] = residual_head(z2, bases[2], gain)
            if stop_at == 1:
                outputs[1] = self.level1(z2, control1, bases[1], gain)
        return outputs


def check_input(x: Any, condition: str = 'none') -> None:
    """Raises ValueError unless x is [N, H, W, C + k] with H, W multiples of 32: C = 3 or 4 (for
    'aperture_focus' 4), k = control.condition_channels(condition)."""
    shape = tuple(getattr(x, 'shape', ()))
    if len(shape) != 4:
        raise ValueError(f'PyNET input must be [N, H, W, C]; got shape {shape}')
    _, h, w, ch = shape
    k = control_lib.condition_channels(condition)
    if k == 0 and ch not in (3, 4):
        raise ValueError(
            f'PyNET input must have 4 channels (RGB + depth) or 3 (RGB only); '
            f'got {ch} channels in shape {shape}'
        )
    bases = (4,) if condition == 'aperture_focus' else (3, 4)
    if k and ch - k not in bases:
        photo = 'RGB + depth' if bases == (4,) else 'RGB(+depth)'
        raise ValueError(
            f'PyNET conditioned on {condition!r} takes {photo} followed by {k} control map(s) '
            f'(control.append_condition): {" or ".join(str(b + k) for b in bases)} channels; '
            f'got {ch} channels in shape {shape}'
        )
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == 0 or w == 0:
        raise ValueError(
            f'PyNET input height and width must be positive multiples of {SIZE_MULTIPLE}; '
            f'got {h} x {w} (pad or crop the input, e.g. with the render mode)'
        )


def on_output_path(path: Sequence[str], level: int) -> bool:
    """Whether the parameter at `path` (e.g. ('level6', 'd3', 'k3a', 'conv', 'kernel')) feeds
    output `level`.

    That is the encoder, every coarser level except its side `head`, and `level` itself except the
    transposed convs towards finer levels: the subset the paper trains at each level (and the
    "path to output k" counts of SPEC).
    """
    group = path[0]
    if group == 'encoder':
        return True
    group_level = int(group.removeprefix('level'))
    if group_level > level:
        return path[1] != 'head'
    return group_level == level and path[1] not in ('up_a', 'up_b')


# Added to level 2's logits at `upsampling_start`: enough to make them positive for any level-2
# image in [0, 1] (logits within +-1.31), so that level 1's leaky ReLU passes them unchanged.
UPSAMPLING_SHIFT = 2.0


def upsampling_start(params: Any, shift: float = UPSAMPLING_SHIFT) -> Any:
    """Level 1 set up to reproduce level 2's image, upsampled: a starting point for training it.

    Level 1 is head(up(z2)) on level 2's pre-tanh logits z2 (3 channels, any sign), and up's leaky
    ReLU scales negative logits by 0.2, which no linear head undoes; from random weights level 1
    starts far below a plain resize of level 2's image. Here: level 2's logits bias += shift (all
    positive), up = per-channel interpolation (kernel [.5, 1, .5] x [.5, 1, .5]: with TF 'SAME',
    output pixel 2i+1 copies input i and 2i averages inputs i-1 and i), head = identity at its
    centre tap with bias -shift. Then level 1 = tanh(interpolated z2) * 0.58 + 0.5, except in the
    first row and column, where the interpolation meets the zero padding. Level 2's own image
    changes (its logits moved); level 1 is what reads them. A deviation from the paper, which
    starts level 1 from its random init (config `train.level1_start`).
    """
    # A new tree that shares every array except the five replaced below.
    params = {**params, 'level1': jax.tree.map(np.array, params['level1']),
              'level2': {**params['level2'], 'logits': jax.tree.map(
                  np.array, params['level2']['logits'])}}
    taps = np.array([0.5, 1.0, 0.5], np.float32)
    eye = np.eye(3, dtype=np.float32)
    params['level1']['up']['conv']['kernel'] = np.einsum('i,j,oc->ijoc', taps, taps, eye)
    head = np.zeros((3, 3, 3, 3), np.float32)
    head[1, 1] = eye
    params['level1']['head']['conv']['kernel'] = head
    params['level1']['head']['conv']['bias'] = np.full(3, -shift, np.float32)
    params['level2']['logits']['conv']['bias'] = (
        params['level2']['logits']['conv']['bias'] + np.float32(shift))
    return params


@functools.lru_cache(maxsize=64)
def _init_shapes(model: 'PyNET', channels: int, size: tuple[int, ...]) -> Any:
    """The parameter shapes of `model` (traced abstractly, ~0.5 s; cached per model and input)."""
    x = jax.ShapeDtypeStruct((1, *size, channels), jnp.float32)
    return jax.eval_shape(lambda r, x: model.init(r, x, level=1)['params'], jax.random.key(0), x)


INIT_SCHEMES = ('pynet', 'he')
# The original's initializer (its model.py): every kernel, transposed ones included, from a normal
# of std 0.01 truncated at two standard deviations; every conv bias 0.01.
PYNET_INIT_STD = 0.01
PYNET_INIT_BIAS = 0.01


def init_params(
    model: PyNET, rng: jax.Array, input_channels: int = 4, size: Sequence[int] = (32, 32),
    scheme: str = 'pynet',
) -> Any:
    """All parameters of `model` (every level and side head): float32 numpy arrays.

    scheme 'pynet' is the original release's: kernels ~ N(0, 0.01^2) truncated at +-0.02 (as
    `tf.truncated_normal(stddev=0.01)`), conv biases 0.01. 'he' (a deviation, not the paper's):
    kernels ~ N(0, gain^2/fan_in), He's init for leaky ReLU 0.2 (gain sqrt(2/1.04); fan_in = k*k*
    input channels of the layer), biases 0; it keeps the signal's scale through level 3's ~20
    norm-free layers, which a fixed std of 0.01 shrinks at every layer with fewer than ~10^4
    inputs (all of them at small widths). Both: instance-norm scale 1 and shift 0.
    A conditioned model (model.condition): its control kernels are drawn like the layer's own,
    its FiLM heads are zero (FiLM starts as the identity) and its FiLM MLP gets He's init under
    either scheme (std 0.01 would make the embedding vanish). A residual model (model.residual)
    gets zero image heads (kernels and biases of every level's `head` and level 2's `logits`),
    so that it starts as the identity: every level's image is the resized input (with He's init
    the heads' logits are O(1), tanh(z)*0.58 of them a random image); all its other parameters
    are those of the same model without `residual`. input_channels counts the photo (+ depth)
    channels only, 3 or 4; the control maps are added.
    The shapes come from `model.init` traced abstractly; the values are drawn with numpy from
    `rng`, because compiling Flax's per-parameter threefry init for 440 tensors takes tens of
    seconds on CPU, far longer than the forward pass itself.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f'Unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}')
    shapes = _init_shapes(
        model, input_channels + control_lib.condition_channels(model.condition), tuple(size))
    seed = np.asarray(jax.random.key_data(rng)).ravel().tolist()
    generator = np.random.default_rng(seed)

    def truncated_normal(shape):
        z = generator.standard_normal(shape)
        while (bad := np.abs(z) > 2).any():  # redraw outside two standard deviations
            z[bad] = generator.standard_normal(int(bad.sum()))
        return z

    def draw(path, leaf):
        value = draw_paper(path, leaf)  # drawn anyway: the other parameters stay the same
        if model.residual and path[-3].key in ('head', 'logits'):  # image heads: the identity
            return np.zeros_like(value)
        return value

    def draw_paper(path, leaf):
        names = [k.key for k in path]
        if names[-2] == 'film':  # FiLM heads: zero, the identity
            return np.zeros(leaf.shape, np.float32)
        if names[-3] == 'film_mlp':  # the FiLM MLP: dense [in, out] layers
            if names[-1] == 'bias':
                return np.zeros(leaf.shape, np.float32)
            std = LEAKY_RELU_GAIN / np.sqrt(leaf.shape[0])
            return (generator.standard_normal(leaf.shape) * std).astype(np.float32)
        if names[-1] == 'kernel':
            if scheme == 'pynet':
                return (truncated_normal(leaf.shape) * PYNET_INIT_STD).astype(np.float32)
            # Conv [k, k, in, out]; transposed conv [3, 3, out, in] (TF layout): fan_in is k*k*in.
            fan_in = np.prod(leaf.shape[:2]) * leaf.shape[3 if names[-3].startswith('up') else 2]
            std = LEAKY_RELU_GAIN / np.sqrt(fan_in)
            return (generator.standard_normal(leaf.shape) * std).astype(np.float32)
        if names[-1] == 'scale':
            return np.ones(leaf.shape, np.float32)
        if names[-1] == 'bias' and names[-2] != 'norm' and scheme == 'pynet':  # not IN's shift
            return np.full(leaf.shape, PYNET_INIT_BIAS, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def param_shapes(channels: int = 32, input_channels: int = 4, condition: str = 'none',
                 condition_method: str = 'input') -> Any:
    """Parameter shapes (jax.ShapeDtypeStruct tree) without materializing any weights.

    input_channels: 3 or 4 (RGB(+depth)); the control maps of `condition` are added.
    """
    # A fresh tree of cached leaves: tracing the model's init takes ~0.5 s, and every parameter
    # load checks its tree against these shapes.
    model = PyNET(channels, condition=condition, condition_method=condition_method)
    channels_in = input_channels + control_lib.condition_channels(condition)
    cached = _init_shapes(model, channels_in, (32, 32))
    return jax.tree.map(lambda leaf: leaf, cached)


# ----------------------------------------------------------------------------------------------
# Conditioned parameters (bokeh_jax/conditioning.py): what a tree is, and growing one.
# ----------------------------------------------------------------------------------------------


def condition_params(params: Any, condition: str, condition_method: str,
                     rng: jax.Array | None = None) -> Any:
    """Unconditioned parameters (e.g. the released PyNET from --mode=convert) grown into those of
    PyNET(condition=..., condition_method=...) that compute the same images at any f-number and
    focus: every kernel and FiLM head reading the control maps is zero; the FiLM MLP is drawn
    from `rng` (He's init), so that training moves the heads off zero."""
    if condition_of(params)[0] != 'none':
        raise ValueError(f'condition_params grows unconditioned parameters; these are already '
                         f'conditioned ({condition_of(params)})')
    channels, input_channels = width_of(params)
    model = PyNET(channels, condition=condition, condition_method=condition_method)
    rng = jax.random.key(0) if rng is None else rng
    fresh = init_params(model, rng, input_channels, scheme='he')
    return conditioning.grow(params, fresh)
