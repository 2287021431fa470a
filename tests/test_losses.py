"""Loss terms: MAE, SSIM loss, and the VGG-19 perceptual loss with both weight-file formats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from bokeh_jax import losses

WIDTHS = (2, 2, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6)  # a narrow VGG-19 of the real structure


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    weights, channels = {}, 3
    for name, width in zip(losses.VGG_LAYERS, WIDTHS):
        weights[f'{name}/kernel'] = rng.standard_normal((3, 3, channels, width)).astype(np.float32)
        weights[f'{name}/bias'] = rng.standard_normal(width).astype(np.float32)
        channels = width
    return weights


def _write_matconvnet(path, weights):
    """A MatConvNet simplenn file as imagenet-vgg-verydeep-19.mat: a cell array of layer structs,
    conv kernels stored [width, height, in, out] (MATLAB's view), biases as 1 x out rows."""
    names = []
    for stage, count in losses.VGG_STAGES:
        for i in range(1, count + 1):
            names += [f'conv{stage}_{i}', f'relu{stage}_{i}']
        names.append(f'pool{stage}')
    names += ['fc6', 'relu6', 'fc7', 'relu7', 'fc8', 'prob']
    layers = np.empty((1, len(names)), dtype=object)
    for index, name in enumerate(names):
        if name in losses.VGG_LAYERS:
            cell = np.empty((1, 2), dtype=object)
            cell[0, 0] = np.transpose(weights[f'{name}/kernel'], (1, 0, 2, 3))
            cell[0, 1] = weights[f'{name}/bias'].reshape(1, -1)
            record = np.array([(cell, name, 'conv')],
                              dtype=[('weights', object), ('name', object), ('type', object)])
        else:
            record = np.array([(name, name[:4])], dtype=[('name', object), ('type', object)])
        layers[0, index] = record.reshape(1, 1)
    scipy.io.savemat(path, {'layers': layers, 'meta': np.array([1.0])})


def test_matconvnet_and_npz_files_load_the_same_weights(tmp_path):
    weights = _weights()
    np.savez(tmp_path / 'vgg.npz', **weights)
    _write_matconvnet(str(tmp_path / 'vgg.mat'), weights)
    from_npz = losses.load_vgg19(str(tmp_path / 'vgg.npz'))
    from_mat = losses.load_vgg19(str(tmp_path / 'vgg.mat'))
    for name in losses.VGG_LAYERS:
        for part in ('kernel', 'bias'):
            np.testing.assert_array_equal(from_npz[name][part], weights[f'{name}/{part}'])
            np.testing.assert_array_equal(from_mat[name][part], weights[f'{name}/{part}'])


def test_vgg_loss_is_a_feature_distance(tmp_path):
    np.savez(tmp_path / 'vgg.npz', **_weights())
    params = losses.load_vgg19(str(tmp_path / 'vgg.npz'))
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.random((2, 32, 32, 3), np.float32))
    b = jnp.asarray(rng.random((2, 32, 32, 3), np.float32))
    loss = jax.jit(losses.vgg_loss)
    assert float(loss(params, a, a)) == 0.0
    assert float(loss(params, a, b)) > 0.0
    # relu5_4 of a 32x32 image is 2x2; the loss is the MSE of those features (checked in numpy).
    features = losses.VGG19(WIDTHS).apply({'params': params}, jnp.concatenate([a, b]))
    assert features.shape == (4, 2, 2, WIDTHS[-1])
    np.testing.assert_allclose(float(loss(params, a, b)),
                               np.mean((np.asarray(features[:2]) - np.asarray(features[2:])) ** 2),
                               rtol=1e-5)
    grad = jax.grad(lambda x: losses.vgg_loss(params, x, b))(a)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_bad_vgg_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match='needs ImageNet VGG-19 weights'):
        losses.load_vgg19('')
    with pytest.raises(FileNotFoundError, match='nowhere.mat'):
        losses.load_vgg19(str(tmp_path / 'nowhere.mat'))
    weights = _weights()
    del weights['conv4_2/bias']
    np.savez(tmp_path / 'partial.npz', **weights)
    with pytest.raises(ValueError, match='partial.npz: VGG-19 weights lack conv4_2/bias'):
        losses.load_vgg19(str(tmp_path / 'partial.npz'))
    weights = _weights()
    weights['conv2_1/kernel'] = weights['conv2_1/kernel'][:, :, :1]
    np.savez(tmp_path / 'shape.npz', **weights)
    with pytest.raises(ValueError, match=r'conv2_1/kernel has shape \(3, 3, 1, 3\)'):
        losses.load_vgg19(str(tmp_path / 'shape.npz'))
    (tmp_path / 'corrupt.mat').write_bytes(b'MATLAB 5.0 garbage')
    with pytest.raises(ValueError, match='corrupt.mat'):
        losses.load_vgg19(str(tmp_path / 'corrupt.mat'))


def test_mae_and_ssim_loss():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.random((2, 32, 32, 3), np.float32))
    b = jnp.asarray(rng.random((2, 32, 32, 3), np.float32))
    np.testing.assert_allclose(float(losses.mae(a, b)), np.mean(np.abs(np.asarray(a - b))),
                               rtol=1e-6)
    assert abs(float(losses.ssim_loss(a, a))) < 1e-6
    assert 0.5 < float(losses.ssim_loss(a, b)) <= 2.0
