"""Image-quality metrics with the definitions of `tf.image.psnr`, `tf.image.ssim` and
`tf.image.ssim_multiscale`, in jax.numpy.

All metrics take a prediction and a target of the same shape, float [N, H, W, C] (C = 3 for
RGB) with values nominally in [0, max_val], and return float32 [N]: one value per image. They
are pure, jitted (their keyword options are static Python numbers), usable inside jit, pmap and
grad (the level-1 training loss uses `10 * (1 - ssim)`). Inputs are cast to float32 first, as
TF's functions do.

SSIM (Wang et al. 2004) as TF computes it: an 11x11 Gaussian window (sigma 1.5) slid over the
image with 'VALID' extent, K1 0.01, K2 0.03, the biased (uncompensated) covariance, the mean
of the SSIM map over height and width, then the mean over channels.

MS-SSIM (Wang et al. 2003) as TF computes it: five scales with the power factors
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333); between scales a 2x2 average pool, after repeating
the last row / column ('SYMMETRIC' padding) when a side is odd. Contrast-structure terms of
scales 1..4 and the SSIM of scale 5 are clipped at 0 (ReLU), raised to the power factors and
multiplied, per channel; then averaged over channels. The coarsest scale still has to fit the
window, so each side must be at least `ms_ssim_min_size()` = 161 pixels (11 px window, 5 scales).

The evaluation of the original PyNET cuts a 32-pixel border before scoring: use `crop_border`
or `image_metrics(..., border=32)`.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Wang et al.'s MS-SSIM weights, finest scale first (the default of tf.image.ssim_multiscale).
MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
FILTER_SIZE = 11
FILTER_SIGMA = 1.5
K1 = 0.01
K2 = 0.03
# Keyword options that shape the computation; jit treats them as static (Python numbers).
_SSIM_OPTIONS = ('max_val', 'filter_size', 'filter_sigma', 'k1', 'k2')


def ms_ssim_min_size(filter_size: int = FILTER_SIZE,
                     num_scales: int = len(MS_SSIM_POWER_FACTORS)) -> int:
    """Smallest image side MS-SSIM accepts: 161 for an 11 px window and 5 scales.

    Each scale halves the side rounding up (odd sides are padded), so the coarsest scale has
    ceil(side / 2**(num_scales - 1)) pixels, and that must be at least `filter_size`.
    """
    return (filter_size - 1) * 2 ** (num_scales - 1) + 1


def crop_border(images: jax.Array, border: int) -> jax.Array:
    """Cuts `border` pixels from each side: [N, H, W, C] -> [N, H - 2b, W - 2b, C]."""
    if border < 0:
        raise ValueError(f'border must be >= 0, got {border}')
    if images.ndim != 4:
        raise ValueError(f'crop_border expects images [N, H, W, C], got shape {images.shape}')
    height, width = images.shape[1:3]
    if 2 * border >= min(height, width):
        raise ValueError(
            f'border {border} leaves nothing of images of size {height}x{width}')
    if border == 0:
        return images
    return images[:, border:height - border, border:width - border, :]


def _check_pair(prediction: jax.Array, target: jax.Array, metric: str,
                min_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """Validates shapes and casts both to float32, as TF's metrics do."""
    prediction, target = jnp.asarray(prediction), jnp.asarray(target)
    if prediction.ndim != 4 or prediction.shape != target.shape:
        raise ValueError(
            f'{metric}: prediction and target must both be [N, H, W, C] of one shape; got '
            f'prediction {prediction.shape} and target {target.shape}')
    height, width = prediction.shape[1:3]
    if min(height, width) < min_size:
        raise ValueError(
            f'{metric}: images of size {height}x{width} are too small; each side must be at '
            f'least {min_size} pixels')
    return prediction.astype(jnp.float32), target.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('max_val',))
def psnr(prediction: jax.Array, target: jax.Array, max_val: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB, float32 [N] (inf for identical images).

    Args:
      prediction: float [N, H, W, C] in [0, max_val].
      target: float [N, H, W, C] in [0, max_val].
      max_val: the dynamic range of the images.
    """
    prediction, target = _check_pair(prediction, target, 'psnr')
    mse = jnp.mean(jnp.square(prediction - target), axis=(1, 2, 3))
    # Written as TF writes it, so that values agree to the last few ulps.
    max_val = jnp.asarray(max_val, jnp.float32)
    return 20 * jnp.log(max_val) / jnp.log(10.0) - np.float32(10 / np.log(10)) * jnp.log(mse)


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """1-D normalized Gaussian; its outer product is TF's `_fspecial_gauss` window."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-0.5 * np.square(coords / sigma))
    return (taps / taps.sum()).astype(np.float32)


def _gaussian_filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable Gaussian over H and W with 'VALID' extent: [N, H, W, C] -> [N, H-k+1, W-k+1, C].

    Channels go to the batch axis so that each pass is a plain one-channel convolution (fast to
    compile and run everywhere, unlike grouped convolutions on CPU). Precision is HIGHEST
    because float32 convolutions otherwise run as TF32 on GPU and bf16 on TPU, and SSIM's
    covariances are differences of nearly equal local means that such rounding would wreck.
    """
    n, height, width, channels = x.shape
    x = jnp.moveaxis(x, -1, 1).reshape(n * channels, height, width, 1)
    taps = jnp.asarray(taps)
    for kernel in (taps.reshape(-1, 1, 1, 1), taps.reshape(1, -1, 1, 1)):
        x = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding='VALID',
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    x = x.reshape(n, channels, x.shape[1], x.shape[2])
    return jnp.moveaxis(x, 1, -1)


def _ssim_per_channel(x: jax.Array, y: jax.Array, max_val: float, filter_size: int,
                      filter_sigma: float, k1: float, k2: float
                      ) -> tuple[jax.Array, jax.Array]:
    """SSIM and contrast-structure, each averaged over H and W: float32 [N, C] each."""
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    # One filtering pass for all four local means.
    moments = jnp.concatenate([x, y, x * y, jnp.square(x) + jnp.square(y)], axis=-1)
    moments = _gaussian_filter_valid(moments, _gaussian_taps(filter_size, filter_sigma))
    mean_x, mean_y, mean_xy, mean_squares = jnp.split(moments, 4, axis=-1)
    # Same algebra as TF's _ssim_helper: covariances as E[xy] - E[x]E[y] with weights summing
    # to 1 (biased, no compensation), so results agree to float32 rounding.
    num0 = mean_x * mean_y * 2.0
    den0 = jnp.square(mean_x) + jnp.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    num1 = mean_xy * 2.0
    den1 = mean_squares
    contrast_structure = (num1 - num0 + c2) / (den1 - den0 + c2)
    ssim_map = luminance * contrast_structure
    return jnp.mean(ssim_map, axis=(1, 2)), jnp.mean(contrast_structure, axis=(1, 2))


@functools.partial(jax.jit, static_argnames=_SSIM_OPTIONS)
def ssim(prediction: jax.Array, target: jax.Array, max_val: float = 1.0,
         filter_size: int = FILTER_SIZE, filter_sigma: float = FILTER_SIGMA,
         k1: float = K1, k2: float = K2) -> jax.Array:
    """Structural similarity as `tf.image.ssim`, float32 [N] in (-1, 1].

    Args:
      prediction: float [N, H, W, C], H and W >= filter_size; values in [0, max_val].
      target: same shape as prediction.
      max_val: the dynamic range of the images.
      filter_size, filter_sigma: the Gaussian window.
      k1, k2: SSIM stabilizers; c1 = (k1 * max_val)**2, c2 = (k2 * max_val)**2.
    """
    prediction, target = _check_pair(prediction, target, 'ssim', min_size=filter_size)
    per_channel, _ = _ssim_per_channel(prediction, target, max_val, filter_size, filter_sigma,
                                       k1, k2)
    return jnp.mean(per_channel, axis=-1)


def _halve(images: jax.Array) -> jax.Array:
    """TF's MS-SSIM downscaling: [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C].

    An odd side first gets its last row / column repeated ('SYMMETRIC' pad of 1 at the end),
    then 2x2 blocks are averaged.
    """
    n, height, width, channels = images.shape
    images = jnp.pad(images, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)),
                     mode='symmetric')
    height, width = images.shape[1:3]
    blocks = images.reshape(n, height // 2, 2, width // 2, 2, channels)
    return jnp.mean(blocks, axis=(2, 4))


@functools.partial(jax.jit, static_argnames=_SSIM_OPTIONS + ('power_factors',))
def ms_ssim(prediction: jax.Array, target: jax.Array, max_val: float = 1.0,
            power_factors: tuple[float, ...] = MS_SSIM_POWER_FACTORS,
            filter_size: int = FILTER_SIZE, filter_sigma: float = FILTER_SIGMA,
            k1: float = K1, k2: float = K2) -> jax.Array:
    """Multi-scale SSIM as `tf.image.ssim_multiscale`, float32 [N] in [0, 1].

    Args:
      prediction: float [N, H, W, C]; H and W >= `ms_ssim_min_size(filter_size,
        len(power_factors))` (161 with the defaults); values in [0, max_val].
      target: same shape as prediction.
      max_val: the dynamic range of the images.
      power_factors: one exponent per scale, finest first; their number is the number of scales
        (a tuple: options are static under jit).
      filter_size, filter_sigma, k1, k2: as in `ssim`.

    Raises:
      ValueError: when a side is shorter than the minimum; the message names the size.

    A metric, not a loss: like TF's, its gradient is not finite where a clipped term is 0.
    """
    power_factors = tuple(float(p) for p in power_factors)
    min_size = ms_ssim_min_size(filter_size, len(power_factors))
    x, y = _check_pair(prediction, target, 'ms_ssim', min_size=min_size)
    factors = []
    for scale in range(len(power_factors)):
        if scale > 0:
            x, y = _halve(x), _halve(y)
        ssim_value, contrast_structure = _ssim_per_channel(x, y, max_val, filter_size,
                                                           filter_sigma, k1, k2)
        factors.append(contrast_structure)
    # The coarsest scale contributes its full SSIM (luminance included), the others only cs.
    factors[-1] = ssim_value
    factors = jnp.maximum(jnp.stack(factors, axis=-1), 0.0)  # [N, C, scales]
    per_channel = jnp.prod(factors ** jnp.asarray(power_factors, jnp.float32), axis=-1)
    return jnp.mean(per_channel, axis=-1)


METRICS = {'psnr': psnr, 'ssim': ssim, 'ms_ssim': ms_ssim}


def image_metrics(prediction: jax.Array, target: jax.Array, border: int = 0,
                  names: Sequence[str] = ('psnr', 'ssim', 'ms_ssim')
                  ) -> dict[str, jax.Array]:
    """Per-image scores after cutting `border` pixels from each side, as the original evaluates.

    Args:
      prediction: float [N, H, W, 3] in [0, 1] (clip model outputs first, as the original does).
      target: float [N, H, W, 3] in [0, 1].
      border: pixels removed from every side before scoring (32 in the PyNET evaluation).
      names: which of `METRICS` to compute.

    Returns:
      {name: float32 [N]} with max_val 1 and TF's default parameters.
    """
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f'Unknown metric(s) {unknown}; expected some of {sorted(METRICS)}')
    prediction = crop_border(jnp.asarray(prediction), border)
    target = crop_border(jnp.asarray(target), border)
    return {name: METRICS[name](prediction, target) for name in names}
