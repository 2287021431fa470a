"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018), version 0.1, with an AlexNet or VGG16 backbone, in Flax.

The distance follows the reference `lpips.LPIPS(net=..., version='0.1')` at evaluation:
[0, 1] images -> [-1, 1] -> (x - shift) / scale with the fixed "ScalingLayer" constants ->
backbone features at five ReLU outputs -> each feature unit-normalized over channels ->
squared difference -> a 1x1 linear head with non-negative weights (one output channel) ->
mean over height and width -> sum over the five layers. Lower is more similar.

LPIPS is optional. Its weights are not shipped and nothing is downloaded: the user provides an
`.npz` file (see below) through `config.eval.lpips_weights`. When that field is '' LPIPS is
absent from evaluation: it is not reported at all, never reported as 0 or NaN.

Weights file (`.npz`, loaded without pickle):
  `net`: a string array, 'alex' or 'vgg16'.
  `features/<conv>/kernel`: float [kh, kw, in, out] (Flax layout) and `features/<conv>/bias`:
    float [out] for each backbone convolution:
      alex: conv1 [11,11,3,64], conv2 [5,5,64,192], conv3 [3,3,192,384], conv4 [3,3,384,256],
        conv5 [3,3,256,256].
      vgg16: conv1_1 [3,3,3,64], conv1_2 [3,3,64,64], conv2_1 .. conv2_2 (128),
        conv3_1 .. conv3_3 (256), conv4_1 .. conv4_3 (512), conv5_1 .. conv5_3 (512).
  `lin0` .. `lin4`: float [C_k], non-negative, the linear heads over the five feature layers
    (alex: 64, 192, 384, 256, 256 channels; vgg16: 64, 128, 256, 512, 512).
`expected_shapes(net)` lists all of them. Every key must be present with its exact shape, and
no other key may be present.

Making the file from the official PyTorch weights (needs torch, but this module does not):

    import lpips, numpy as np   # pip install lpips; it brings torch and torchvision
    from bokeh_jax import lpips as lpips_jax
    state = lpips.LPIPS(net='alex').state_dict()   # backbone + heads + scaling constants
    np.savez('lpips_alex.npz', **lpips_jax.convert_torch_state_dict(state, 'alex'))

Without the `lpips` package, merge torchvision's ImageNet backbone (`features.<i>.*` keys, e.g.
`torchvision.models.alexnet(weights='IMAGENET1K_V1').state_dict()`) with the official heads file
(`weights/v0.1/alex.pth`: `lin<k>.model.1.weight`) into one dict and convert that.
"""

import dataclasses
import functools
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETS = ('alex', 'vgg16')
# LPIPS "ScalingLayer": maps [-1, 1] inputs to roughly ImageNet-normalized values.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# Channels of the five feature layers LPIPS compares.
LAYER_CHANNELS = {'alex': (64, 192, 384, 256, 256), 'vgg16': (64, 128, 256, 512, 512)}
# Smallest image side for which the deepest feature layer is non-empty.
MIN_SIZE = {'alex': 31, 'vgg16': 16}
# Index in torchvision's `features` Sequential of each backbone convolution.
TORCH_CONV_INDEX = {
    'alex': {0: 'conv1', 3: 'conv2', 6: 'conv3', 8: 'conv4', 10: 'conv5'},
    'vgg16': {0: 'conv1_1', 2: 'conv1_2', 5: 'conv2_1', 7: 'conv2_2', 10: 'conv3_1',
              12: 'conv3_2', 14: 'conv3_3', 17: 'conv4_1', 19: 'conv4_2', 21: 'conv4_3',
              24: 'conv5_1', 26: 'conv5_2', 28: 'conv5_3'},
}
# VGG16 stages: conv widths; LPIPS taps the last ReLU of each stage.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_EPS = 1e-10  # LPIPS's normalize_tensor epsilon, added to the channel norm.
# Metric, not throughput: the reference runs in float32, so do not let convs drop to TF32/bf16.
_PRECISION = jax.lax.Precision.HIGHEST


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet `features` up to conv5; returns the five ReLU outputs LPIPS uses."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        conv = functools.partial(nn.Conv, precision=_PRECISION)
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                 padding='VALID')
        relu1 = nn.relu(conv(64, (11, 11), strides=(4, 4), padding=((2, 2), (2, 2)),
                             name='conv1')(x))
        relu2 = nn.relu(conv(192, (5, 5), padding=((2, 2), (2, 2)), name='conv2')(pool(relu1)))
        relu3 = nn.relu(conv(384, (3, 3), padding=((1, 1), (1, 1)), name='conv3')(pool(relu2)))
        relu4 = nn.relu(conv(256, (3, 3), padding=((1, 1), (1, 1)), name='conv4')(relu3))
        relu5 = nn.relu(conv(256, (3, 3), padding=((1, 1), (1, 1)), name='conv5')(relu4))
        return relu1, relu2, relu3, relu4, relu5


class VGG16Features(nn.Module):
    """torchvision VGG16 `features` up to conv5_3; returns relu1_2, relu2_2, ..., relu5_3."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        taps = []
        for stage, widths in enumerate(_VGG16_STAGES, start=1):
            if stage > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
            for index, width in enumerate(widths, start=1):
                x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), precision=_PRECISION,
                            name=f'conv{stage}_{index}')(x)
                x = nn.relu(x)
            taps.append(x)
        return tuple(taps)


_BACKBONES = {'alex': AlexNetFeatures, 'vgg16': VGG16Features}


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f'Unknown LPIPS net {net!r}; expected one of {NETS}')


def expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """Every array key of a weights file for `net` (except `net` itself) and its shape."""
    _check_net(net)
    return dict(_expected_shapes(net))


@functools.cache
def _expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    variables = jax.eval_shape(_BACKBONES[net]().init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    shapes = {'features/' + '/'.join(k.key for k in path): tuple(leaf.shape)
              for path, leaf in flat}
    for layer, channels in enumerate(LAYER_CHANNELS[net]):
        shapes[f'lin{layer}'] = (channels,)
    return shapes


def params_from_arrays(arrays: Mapping[str, Any], source: str = 'LPIPS weights'
                       ) -> tuple[str, dict]:
    """Validates flat weight arrays (the `.npz` layout) and nests them into a parameter tree.

    Args:
      arrays: {key: array} with the keys documented at the top of this module.
      source: what to call the arrays in error messages, e.g. the file name.

    Returns:
      (net, params) with params = {'features': {conv: {'kernel', 'bias'}}, 'lin0': .., 'lin4': ..}
      as float32 jax arrays.
    """
    if 'net' not in arrays:
        raise ValueError(f"{source}: missing key 'net' (the backbone name, one of {NETS})")
    net = str(np.asarray(arrays['net']))
    if net not in NETS:
        raise ValueError(f"{source}: key 'net' is {net!r}; expected one of {NETS}")
    expected = expected_shapes(net)
    for key in arrays:
        if key != 'net' and key not in expected:
            raise ValueError(f'{source}: unexpected key {key!r} for net {net!r}; expected '
                             f'the keys of bokeh_jax.lpips.expected_shapes({net!r})')
    params: dict[str, Any] = {'features': {}}
    for key, shape in expected.items():
        if key not in arrays:
            raise ValueError(f'{source}: missing key {key!r} (shape {shape}) for net {net!r}')
        value = np.asarray(arrays[key])
        if value.shape != shape:
            raise ValueError(f'{source}: key {key!r} has shape {value.shape}; expected {shape}')
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f'{source}: key {key!r} has dtype {value.dtype}; expected floats')
        if not np.isfinite(value).all():
            raise ValueError(f'{source}: key {key!r} holds non-finite values')
        if key.startswith('lin') and (value < 0).any():
            raise ValueError(f'{source}: key {key!r} has negative weights; LPIPS linear heads '
                             'are non-negative')
        node = params
        *parents, leaf = key.split('/')
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return net, params


def lpips_distance(params: Mapping[str, Any], prediction: jax.Array, target: jax.Array,
                   net: str) -> jax.Array:
    """LPIPS v0.1 distance per image, float32 [N] (>= 0; 0 for identical images).

    Pure; jit/pmap it with `net` static, or use the `LPIPS` wrapper.

    Args:
      params: the tree from `params_from_arrays`.
      prediction: float [N, H, W, 3] in [0, 1]; H, W >= MIN_SIZE[net] (31 alex, 16 vgg16).
      target: same shape as prediction.
      net: 'alex' or 'vgg16', matching params.
    """
    _check_net(net)
    prediction, target = jnp.asarray(prediction), jnp.asarray(target)
    if prediction.ndim != 4 or prediction.shape != target.shape or prediction.shape[-1] != 3:
        raise ValueError(f'lpips: prediction and target must both be [N, H, W, 3] of one shape; '
                         f'got prediction {prediction.shape} and target {target.shape}')
    height, width = prediction.shape[1:3]
    if min(height, width) < MIN_SIZE[net]:
        raise ValueError(f'lpips ({net}): images of size {height}x{width} are too small; each '
                         f'side must be at least {MIN_SIZE[net]} pixels')
    images = jnp.concatenate([prediction, target]).astype(jnp.float32)
    images = (2 * images - 1 - SHIFT) / SCALE
    features = _BACKBONES[net]().apply({'params': params['features']}, images)
    batch = prediction.shape[0]
    distance = jnp.zeros((batch,), jnp.float32)
    for layer, feature in enumerate(features):
        norm = jnp.sqrt(jnp.sum(jnp.square(feature), axis=-1, keepdims=True))
        feature = feature / (norm + _EPS)
        squared = jnp.square(feature[:batch] - feature[batch:])
        weighted = jnp.einsum('nhwc,c->nhw', squared, params[f'lin{layer}'],
                              precision=_PRECISION)
        distance = distance + jnp.mean(weighted, axis=(1, 2))
    return distance


_lpips_distance_jit = jax.jit(lpips_distance, static_argnames='net')


@dataclasses.dataclass(frozen=True, eq=False)
class LPIPS:
    """Loaded LPIPS weights; call as `lpips(prediction, target) -> float32 [N]`.

    Images are float [N, H, W, 3] in [0, 1]. `params` and `net` are there for `lpips_distance`
    under pmap.
    """
    net: str
    params: Mapping[str, Any]
    path: str = ''

    def __call__(self, prediction: jax.Array, target: jax.Array) -> jax.Array:
        return _lpips_distance_jit(self.params, prediction, target, net=self.net)


def load_lpips(path: str) -> LPIPS:
    """Loads a weights `.npz` (layout at the top of this module) into an `LPIPS` callable.

    There is no default: with `config.eval.lpips_weights == ''` LPIPS is simply not evaluated,
    and calling this with '' raises, so that absence is never mistaken for a score.
    """
    if not path:
        raise ValueError('No LPIPS weights file given (config.eval.lpips_weights is empty): '
                         'LPIPS is only available with user-provided weights; see '
                         'bokeh_jax/lpips.py for the .npz layout and how to convert them')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'LPIPS weights file not found: {path}')
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f'{path}: not a readable .npz of LPIPS weights ({error})') from error
    net, params = params_from_arrays(arrays, source=path)
    return LPIPS(net=net, params=params, path=path)


_TORCH_FEATURE_KEY = re.compile(r'(?:features|net\.slice\d)\.(\d+)\.(weight|bias)')
_TORCH_HEAD_KEY = re.compile(r'lin(\d)\.model\.[01]\.weight')
# Keys that a full torchvision / lpips state_dict carries but the distance does not use:
# the ImageNet classifier; the scaling constants are checked against SHIFT / SCALE instead.
_TORCH_UNUSED_KEY = re.compile(r'classifier\..*')


def convert_torch_state_dict(state_dict: Mapping[str, Any], net: str) -> dict[str, np.ndarray]:
    """Converts PyTorch LPIPS weights to this module's `.npz` layout (torch is not needed).

    Args:
      state_dict: {torch key: array} (numpy arrays, or CPU torch tensors) with the keys of
        `lpips.LPIPS(net=net).state_dict()` (`net.slice<s>.<i>.weight|bias`,
        `lin<k>.model.1.weight`, `scaling_layer.shift|scale`), or of torchvision's backbone
        (`features.<i>.weight|bias`; `classifier.*` is not used) merged with the official heads
        file (`lin<k>.model.1.weight`).
      net: 'alex' or 'vgg16'.

    Returns:
      {key: array} for `np.savez(path, **arrays)`, validated like `load_lpips` validates files.
    """
    _check_net(net)
    conv_names = TORCH_CONV_INDEX[net]
    arrays: dict[str, np.ndarray] = {'net': np.array(net)}
    sources: dict[str, str] = {}

    def put(key: str, value: np.ndarray, torch_key: str) -> None:
        if key in arrays:
            raise ValueError(f'torch state_dict: {torch_key!r} and {sources[key]!r} both give '
                             f'{key!r}')
        arrays[key], sources[key] = value, torch_key

    for torch_key, value in state_dict.items():
        value = np.asarray(value, np.float32)
        if match := _TORCH_FEATURE_KEY.fullmatch(torch_key):
            index, kind = int(match.group(1)), match.group(2)
            if index not in conv_names:
                raise ValueError(f'torch state_dict: {torch_key!r} is not a convolution of '
                                 f'{net} (conv indices {sorted(conv_names)})')
            if kind == 'weight':  # torch [out, in, kh, kw] -> Flax [kh, kw, in, out]
                if value.ndim != 4:
                    raise ValueError(f'torch state_dict: {torch_key!r} has shape {value.shape}; '
                                     'expected [out, in, kh, kw]')
                put(f'features/{conv_names[index]}/kernel', value.transpose(2, 3, 1, 0),
                    torch_key)
            else:
                put(f'features/{conv_names[index]}/bias', value, torch_key)
        elif match := _TORCH_HEAD_KEY.fullmatch(torch_key):
            if value.ndim != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
                raise ValueError(f'torch state_dict: {torch_key!r} has shape {value.shape}; '
                                 'expected [1, channels, 1, 1]')
            put(f'lin{match.group(1)}', value.reshape(-1), torch_key)
        elif torch_key in ('scaling_layer.shift', 'scaling_layer.scale'):
            constant = SHIFT if torch_key.endswith('shift') else SCALE
            if not np.allclose(value.reshape(-1), constant):
                raise ValueError(f'torch state_dict: {torch_key!r} is {value.reshape(-1)}; '
                                 f'LPIPS v0.1 uses {constant}')
        elif not _TORCH_UNUSED_KEY.fullmatch(torch_key):
            raise ValueError(f'torch state_dict: unexpected key {torch_key!r} for LPIPS {net}')
    params_from_arrays(arrays, source='converted torch state_dict')
    return arrays
