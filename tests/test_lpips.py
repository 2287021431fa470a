"""bokeh_jax.lpips on generated weight files of the official structure.

The expected distances come from a float64 numpy re-implementation below, written from the
LPIPS paper / reference code in the PyTorch layout (NCHW images, [out, in, kh, kw] kernels,
torch state_dict key names), with convolutions and pools as explicit loops over window offsets.
It shares no code with bokeh_jax.lpips, so it checks the conversion and the network together.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bokeh_jax import lpips

PHOTOS = pathlib.Path(__file__).parent / 'data' / 'photos'

# torchvision `features` layers: (index, out, in, kernel, stride, padding) for each conv;
# ('pool', kernel, stride) for each max pool; ('tap',) where LPIPS reads a ReLU output.
ALEX_LAYERS = [(0, 64, 3, 11, 4, 2), ('tap',), ('pool', 3, 2), (3, 192, 64, 5, 1, 2), ('tap',),
               ('pool', 3, 2), (6, 384, 192, 3, 1, 1), ('tap',), (8, 256, 384, 3, 1, 1), ('tap',),
               (10, 256, 256, 3, 1, 1), ('tap',)]
VGG16_LAYERS = [(0, 64, 3, 3, 1, 1), (2, 64, 64, 3, 1, 1), ('tap',), ('pool', 2, 2),
                (5, 128, 64, 3, 1, 1), (7, 128, 128, 3, 1, 1), ('tap',), ('pool', 2, 2),
                (10, 256, 128, 3, 1, 1), (12, 256, 256, 3, 1, 1), (14, 256, 256, 3, 1, 1),
                ('tap',), ('pool', 2, 2),
                (17, 512, 256, 3, 1, 1), (19, 512, 512, 3, 1, 1), (21, 512, 512, 3, 1, 1),
                ('tap',), ('pool', 2, 2),
                (24, 512, 512, 3, 1, 1), (26, 512, 512, 3, 1, 1), (28, 512, 512, 3, 1, 1),
                ('tap',)]
LAYERS = {'alex': ALEX_LAYERS, 'vgg16': VGG16_LAYERS}


def random_torch_state_dict(net: str, seed: int = 0) -> dict[str, np.ndarray]:
    """What `lpips.LPIPS(net=net).state_dict()` holds, with random (He-scaled) values."""
    rng = np.random.default_rng(seed)
    state = {'scaling_layer.shift': np.array([-.030, -.088, -.188]).reshape(1, 3, 1, 1),
             'scaling_layer.scale': np.array([.458, .448, .450]).reshape(1, 3, 1, 1)}
    slice_number = 1
    tapped_channels = []
    channels = 3
    for layer in LAYERS[net]:
        if layer[0] == 'tap':
            slice_number += 1
            tapped_channels.append(channels)
        elif layer[0] != 'pool':
            index, out, inp, kernel = layer[:4]
            prefix = f'net.slice{slice_number}.{index}'
            state[prefix + '.weight'] = (rng.standard_normal((out, inp, kernel, kernel))
                                         * np.sqrt(2 / (inp * kernel * kernel)))
            state[prefix + '.bias'] = 0.1 * rng.standard_normal(out)
            channels = out
    for k, c in enumerate(tapped_channels):
        state[f'lin{k}.model.1.weight'] = np.abs(rng.standard_normal((1, c, 1, 1)))
    return {key: value.astype(np.float32) for key, value in state.items()}


def reference_conv(x, weight, bias, stride, padding):
    n, _, height, width = x.shape
    out, _, kernel, _ = weight.shape
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    result = np.zeros((n, out, out_h, out_w)) + bias.reshape(1, out, 1, 1)
    for dy in range(kernel):
        for dx in range(kernel):
            window = x[:, :, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride]
            result += np.einsum('nchw,oc->nohw', window, weight[:, :, dy, dx])
    return result


def reference_max_pool(x, kernel, stride):
    out_h = (x.shape[2] - kernel) // stride + 1
    out_w = (x.shape[3] - kernel) // stride + 1
    result = np.full(x.shape[:2] + (out_h, out_w), -np.inf)
    for dy in range(kernel):
        for dx in range(kernel):
            result = np.maximum(
                result, x[:, :, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride])
    return result


def reference_lpips(state, net, image0, image1):
    """LPIPS v0.1 of [N, H, W, 3] images in [0, 1], float64, from torch-layout weights."""
    weights = {k: v.astype(np.float64) for k, v in state.items()}
    shift = weights['scaling_layer.shift']
    scale = weights['scaling_layer.scale']

    def features(image):
        x = (np.transpose(image, (0, 3, 1, 2)).astype(np.float64) * 2 - 1 - shift) / scale
        taps, slice_number = [], 1
        for layer in LAYERS[net]:
            if layer[0] == 'tap':
                taps.append(x)
                slice_number += 1
            elif layer[0] == 'pool':
                x = reference_max_pool(x, layer[1], layer[2])
            else:
                index, _, _, _, stride, padding = layer
                prefix = f'net.slice{slice_number}.{index}'
                x = reference_conv(x, weights[prefix + '.weight'], weights[prefix + '.bias'],
                                   stride, padding)
                x = np.maximum(x, 0)
        return taps

    total = np.zeros(image0.shape[0])
    for k, (f0, f1) in enumerate(zip(features(image0), features(image1))):
        f0 = f0 / (np.sqrt(np.sum(f0 ** 2, axis=1, keepdims=True)) + 1e-10)
        f1 = f1 / (np.sqrt(np.sum(f1 ** 2, axis=1, keepdims=True)) + 1e-10)
        head = weights[f'lin{k}.model.1.weight'][0, :, 0, 0]
        per_pixel = np.tensordot((f0 - f1) ** 2, head, axes=([1], [0]))  # [N, h, w]
        total += per_pixel.mean(axis=(1, 2))
    return total


def photo_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Two crops of a real photo and a blurred/shifted version: float32 [2, H, W, 3] each."""
    with Image.open(PHOTOS / 'coffee.jpg') as image:
        photo = np.asarray(image.convert('RGB').resize((width * 3, height * 2)), np.float32) / 255
    crops = np.stack([photo[:height, :width], photo[height:, width:2 * width]])
    other = (np.roll(crops, 1, axis=2) + crops) / 2
    return crops, np.clip(other + 0.05 * np.sin(np.arange(width))[:, None], 0, 1).astype(np.float32)


@pytest.fixture(scope='module')
def alex_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp('lpips') / 'lpips_alex.npz'
    np.savez(path, **lpips.convert_torch_state_dict(random_torch_state_dict('alex'), 'alex'))
    return str(path)


@pytest.mark.parametrize('net,size', [('alex', (48, 56)), ('vgg16', (32, 40))])
def test_matches_numpy_reference(net, size, tmp_path):
    state = random_torch_state_dict(net)
    path = tmp_path / 'weights.npz'
    np.savez(path, **lpips.convert_torch_state_dict(state, net))
    metric = lpips.load_lpips(str(path))
    assert metric.net == net
    image0, image1 = photo_pair(*size)
    got = np.asarray(metric(image0, image1))
    expected = reference_lpips(state, net, image0, image1)
    assert got.shape == (2,) and got.dtype == np.float32
    assert (expected > 1e-3).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_identity_symmetry_and_positivity(alex_path):
    metric = lpips.load_lpips(alex_path)
    image0, image1 = photo_pair(40, 48)
    np.testing.assert_allclose(metric(image0, image0), 0.0, atol=1e-7)
    forward = np.asarray(metric(image0, image1))
    np.testing.assert_allclose(metric(image1, image0), forward, rtol=1e-5)
    assert (forward > 0).all()
    # Farther images are farther apart.
    assert (np.asarray(metric(image0, 1 - image0)) > forward).all()


def test_pmap_matches_single_call(alex_path):
    metric = lpips.load_lpips(alex_path)
    devices = jax.local_device_count()
    image0, image1 = photo_pair(40, 48)
    image0, image1 = image0[:1].repeat(devices, 0), image1[:1].repeat(devices, 0)
    mapped = jax.pmap(functools.partial(lpips.lpips_distance, net='alex'),
                      in_axes=(None, 0, 0))(metric.params, image0[:, None], image1[:, None])
    np.testing.assert_allclose(np.asarray(mapped).reshape(-1), metric(image0, image1), rtol=1e-5)


def edited_file(path: str, tmp_path: pathlib.Path, **changes) -> str:
    """A copy of an .npz with keys replaced (value) or removed (None)."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    for key, value in changes.items():
        key = key.replace('__', '/')
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    out = tmp_path / 'edited.npz'
    np.savez(out, **arrays)
    return str(out)


@pytest.mark.parametrize('changes,message', [
    ({'features__conv3__bias': None}, r"missing key 'features/conv3/bias' \(shape \(384,\)\)"),
    ({'lin2': np.ones(383, np.float32)}, r"key 'lin2' has shape \(383,\); expected \(384,\)"),
    ({'features__conv1__kernel': np.ones((64, 3, 11, 11), np.float32)},
     r"key 'features/conv1/kernel' has shape \(64, 3, 11, 11\); expected \(11, 11, 3, 64\)"),
    ({'lin5': np.ones(8, np.float32)}, r"unexpected key 'lin5'"),
    ({'net': None}, r"missing key 'net'"),
    ({'net': np.array('squeeze')}, r"'net' is 'squeeze'"),
    ({'lin1': -np.ones(192, np.float32)}, r"'lin1' has negative weights"),
    ({'lin0': np.full(64, np.nan, np.float32)}, r"'lin0' holds non-finite values"),
])
def test_bad_weight_files_name_the_key(alex_path, tmp_path, changes, message):
    path = edited_file(alex_path, tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as error:
        lpips.load_lpips(path)
    assert path in str(error.value)


def test_absent_or_unreadable_weights(tmp_path):
    with pytest.raises(ValueError, match='config.eval.lpips_weights is empty'):
        lpips.load_lpips('')
    missing = str(tmp_path / 'nowhere.npz')
    with pytest.raises(FileNotFoundError, match=missing):
        lpips.load_lpips(missing)
    garbage = tmp_path / 'garbage.npz'
    garbage.write_bytes(b'not a zip file')
    with pytest.raises(ValueError, match=str(garbage)):
        lpips.load_lpips(str(garbage))


def test_converter_accepts_torchvision_keys_and_rejects_unknown_ones():
    lpips_state = random_torch_state_dict('alex')
    # torchvision's own names for the backbone, plus its classifier, plus the heads file.
    torchvision_state = {re.sub(r'^net\.slice\d\.', 'features.', key): value
                         for key, value in lpips_state.items() if not key.startswith('scaling')}
    torchvision_state['classifier.1.weight'] = np.zeros((4096, 9216), np.float32)
    converted = lpips.convert_torch_state_dict(torchvision_state, 'alex')
    reference = lpips.convert_torch_state_dict(lpips_state, 'alex')
    assert sorted(converted) == sorted(reference)
    for key in reference:
        np.testing.assert_array_equal(converted[key], reference[key])
    np.testing.assert_array_equal(converted['features/conv2/kernel'],
                                  lpips_state['net.slice2.3.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(converted['lin3'], lpips_state['lin3.model.1.weight'].ravel())

    with pytest.raises(ValueError, match="unexpected key 'net.slice9.xyz'"):
        lpips.convert_torch_state_dict({**lpips_state, 'net.slice9.xyz': np.zeros(1)}, 'alex')
    with pytest.raises(ValueError, match="'net.slice1.1.weight' is not a convolution of alex"):
        lpips.convert_torch_state_dict({**lpips_state, 'net.slice1.1.weight': np.zeros(1)},
                                       'alex')
    with pytest.raises(ValueError, match="'features.0.weight' and 'net.slice1.0.weight' both"):
        lpips.convert_torch_state_dict(
            {**lpips_state, 'features.0.weight': lpips_state['net.slice1.0.weight']}, 'alex')
    with pytest.raises(ValueError, match="'scaling_layer.scale' is"):
        lpips.convert_torch_state_dict({**lpips_state, 'scaling_layer.scale': np.ones(3)}, 'alex')
    incomplete = {k: v for k, v in lpips_state.items() if k != 'lin4.model.1.weight'}
    with pytest.raises(ValueError, match="missing key 'lin4'"):
        lpips.convert_torch_state_dict(incomplete, 'alex')
    with pytest.raises(ValueError, match="Unknown LPIPS net 'vgg'"):
        lpips.convert_torch_state_dict(lpips_state, 'vgg')


@pytest.mark.parametrize('net', lpips.NETS)
def test_min_size_is_where_the_deepest_features_vanish(net):
    def feature_shapes(side):
        images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
        module = lpips._BACKBONES[net]()
        variables = jax.eval_shape(module.init, jax.random.key(0), images)
        return [f.shape for f in jax.eval_shape(module.apply, variables, images)]

    side = lpips.MIN_SIZE[net]
    assert all(min(shape[1:3]) > 0 for shape in feature_shapes(side))
    assert any(min(shape[1:3]) == 0 for shape in feature_shapes(side - 1))
    params = {'features': {}}  # never reached: the size check comes first
    images = np.zeros((1, side - 1, side + 5, 3), np.float32)
    with pytest.raises(ValueError, match=f'at least {side} pixels'):
        lpips.lpips_distance(params, images, images, net)
    with pytest.raises(ValueError, match=r'\[N, H, W, 3\]'):
        lpips.lpips_distance(params, images, images[..., :2], net)
