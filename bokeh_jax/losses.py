"""Training losses of the paper (SPEC "Training recipe"), all on the unclipped model output.

Levels 7..2: 100 x MAE. Level 1: 10 x MAE + 0.1 x VGG-19 relu5_4 feature MSE + 10 x (1 - SSIM).
The weights are config fields (`config.train.levelK.loss`); this module only defines the terms.

VGG-19 weights are never downloaded: the user provides the MatConvNet file the original used
(`imagenet-vgg-verydeep-19.mat`) or a plain `.npz` with `conv1_1/kernel` [3, 3, in, out] and
`conv1_1/bias` [out] ... `conv5_4/...` (Flax/TF layout).
"""

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import metrics

# VGG-19 up to relu5_4: convolutions per stage, a 2x2 max-pool after each of the first four.
VGG_STAGES = ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
VGG_LAYERS = tuple(f'conv{s}_{i}' for s, n in VGG_STAGES for i in range(1, n + 1))
# ImageNet mean (RGB) the MatConvNet VGG-19 expects on 0..255 inputs.
VGG_MEAN_RGB = (123.68, 116.779, 103.939)
VGG_HELP = (
    'The level-1 loss has a VGG-19 term (config.train.level1.loss.vgg > 0) and needs ImageNet '
    'VGG-19 weights: download imagenet-vgg-verydeep-19.mat (MatConvNet, the file the original '
    'PyNET used) or convert any VGG-19 to an .npz with keys conv1_1/kernel [3,3,in,out], '
    'conv1_1/bias, ... conv5_4/bias, and pass --config.train.vgg_weights=PATH; or drop the term '
    'with --config.train.level1.loss.vgg=0.'
)


def mae(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error over everything (a scalar)."""
    return jnp.mean(jnp.abs(prediction - target))


def ssim_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """1 - SSIM (tf.image.ssim, max_val 1) averaged over the batch; images [N, H, W, 3]."""
    return 1.0 - jnp.mean(metrics.ssim(prediction, target, max_val=1.0))


class VGG19(nn.Module):
    """VGG-19 features up to relu5_4 (conv 3x3 'SAME' + ReLU, max-pool after stages 1-4).

    `widths` are the 16 conv widths (64, 64, 128, ... 512 for the ImageNet network); tests use a
    narrow network of the same structure.
    """

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float [N, H, W, 3] in [0, 1] -> relu5_4 features [N, H/16, W/16, C]."""
        x = images * 255.0 - jnp.asarray(VGG_MEAN_RGB, images.dtype)
        layers = iter(zip(VGG_LAYERS, self.widths))
        for stage, count in VGG_STAGES:
            for _ in range(count):
                name, width = next(layers)
                x = jax.nn.relu(nn.Conv(width, (3, 3), padding='SAME', name=name)(x))
            if stage < 5:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
        return x


def vgg_loss(vgg_params: Mapping[str, Any], prediction: jax.Array, target: jax.Array) -> jax.Array:
    """MSE between VGG-19 relu5_4 features of prediction and target (the paper's content loss)."""
    widths = tuple(vgg_params[name]['bias'].shape[0] for name in VGG_LAYERS)
    features = VGG19(widths).apply({'params': vgg_params}, jnp.concatenate([prediction, target]))
    fake, real = jnp.split(features, 2)
    return jnp.mean(jnp.square(fake - jax.lax.stop_gradient(real)))


def _check_vgg(weights: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    channels = 3
    for name in VGG_LAYERS:
        for part in ('kernel', 'bias'):
            if f'{name}/{part}' not in weights:
                raise ValueError(f'{path}: VGG-19 weights lack {name}/{part}')
        kernel, bias = weights[f'{name}/kernel'], weights[f'{name}/bias']
        if kernel.ndim != 4 or kernel.shape[:3] != (3, 3, channels):
            raise ValueError(f'{path}: {name}/kernel has shape {kernel.shape}, expected '
                             f'(3, 3, {channels}, out) in [height, width, in, out] layout')
        if bias.shape != (kernel.shape[3],):
            raise ValueError(f'{path}: {name}/bias has shape {bias.shape}, expected '
                             f'({kernel.shape[3]},)')
        channels = kernel.shape[3]
    return {n: {p: np.asarray(weights[f'{n}/{p}'], np.float32) for p in ('kernel', 'bias')}
            for n in VGG_LAYERS}


def _unwrap(value: Any) -> Any:
    """Strips the 1x1 object/struct wrappers scipy.io.loadmat puts around MATLAB cells."""
    while (isinstance(value, np.ndarray) and value.size == 1
           and (value.dtype == object or value.dtype.names or value.dtype.kind in 'US')):
        value = value.reshape(-1)[0]
    return value


def _read_matconvnet(path: str) -> dict[str, np.ndarray]:
    """Conv weights of a MatConvNet `simplenn` VGG file (imagenet-vgg-verydeep-19.mat)."""
    import scipy.io

    try:
        data = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt files
        raise ValueError(f'{path}: not a readable MATLAB file ({e})') from None
    if 'layers' not in data:
        raise ValueError(f'{path}: no `layers` variable; expected a MatConvNet VGG-19 file')
    weights = {}
    for layer in np.ravel(data['layers']):
        layer = _unwrap(layer)
        names = layer.dtype.names or ()
        if 'name' not in names or 'weights' not in names:
            continue
        name = str(_unwrap(layer['name']))
        if name not in VGG_LAYERS:
            continue
        kernel, bias = (np.asarray(_unwrap(w)) for w in np.ravel(_unwrap(layer['weights'])))
        # MatConvNet kernels are [width, height, in, out] seen from numpy (MATLAB stores
        # column-major): swap the spatial axes to get [height, width, in, out].
        weights[f'{name}/kernel'] = np.transpose(kernel, (1, 0, 2, 3))
        weights[f'{name}/bias'] = bias.reshape(-1)
    return weights


def load_vgg19(path: str) -> dict[str, np.ndarray]:
    """VGG-19 conv weights (conv1_1 ... conv5_4) from a MatConvNet `.mat` or an `.npz`.

    Returns the params tree of `VGG19` ({'conv1_1': {'kernel': [3,3,3,64], 'bias': [64]}, ...}).
    Raises FileNotFoundError / ValueError naming the file and the missing or misshaped layer.
    """
    if not path:
        raise ValueError(VGG_HELP)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'VGG-19 weights file {path!r} does not exist. {VGG_HELP}')
    if path.endswith('.npz'):
        try:
            with np.load(path) as f:
                weights = dict(f)
        except Exception as e:
            raise ValueError(f'{path}: not a readable .npz file ({e})') from None
    elif path.endswith('.mat'):
        weights = _read_matconvnet(path)
    else:
        raise ValueError(f'{path}: VGG-19 weights must be a MatConvNet .mat or an .npz file')
    return _check_vgg(weights, path)
