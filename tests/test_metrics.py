"""bokeh_jax.metrics against TensorFlow's tf.image.psnr / ssim / ssim_multiscale."""

import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFilter

from bokeh_jax import metrics

PHOTOS = pathlib.Path(__file__).parent / 'data' / 'photos'
TOLERANCE = 1e-4
TF_METRICS = {
    'psnr': lambda a, b: tf.image.psnr(a, b, max_val=1.0),
    'ssim': lambda a, b: tf.image.ssim(a, b, max_val=1.0),
    'ms_ssim': lambda a, b: tf.image.ssim_multiscale(a, b, max_val=1.0),
}


def load_photo(name: str) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]."""
    with Image.open(PHOTOS / name) as image:
        return np.asarray(image.convert('RGB'), np.float32) / 255


def degraded_copies(photo: np.ndarray) -> np.ndarray:
    """Blur, noise, JPEG and shift of a photo: float32 [4, H, W, 3] in [0, 1]."""
    image = Image.fromarray(np.round(photo * 255).astype(np.uint8))
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), np.float32) / 255
    noise = np.random.default_rng(0).normal(0, 0.05, photo.shape).astype(np.float32)
    noisy = np.clip(photo + noise, 0, 1)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=10)
    with Image.open(buffer) as decoded:
        compressed = np.asarray(decoded.convert('RGB'), np.float32) / 255
    shifted = np.roll(photo, (2, -3), axis=(0, 1))
    return np.stack([blurred, noisy, compressed, shifted])


def tf_metric(name: str, prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    return TF_METRICS[name](tf.constant(prediction), tf.constant(target)).numpy()


@pytest.mark.parametrize('photo_name', ['chelsea.jpg', 'coffee.jpg'])
def test_matches_tensorflow_on_real_photos(photo_name):
    photo = load_photo(photo_name)
    predictions = degraded_copies(photo)
    targets = np.broadcast_to(photo, predictions.shape).copy()
    for name, metric in metrics.METRICS.items():
        expected = tf_metric(name, predictions, targets)
        got = np.asarray(jax.jit(metric)(predictions, targets))
        assert got.shape == (4,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE, err_msg=name)
        # The four degradations must score differently, or the comparison proves little.
        assert len(np.unique(np.round(got, 3))) == 4, (name, got)


@pytest.mark.parametrize('shape', [(2, 161, 161, 3), (1, 200, 333, 3)])
def test_matches_tensorflow_on_noise_and_unclipped_values(shape):
    # 161 stays odd at every MS-SSIM scale (161, 81, 41, 21, 11), so every downscaling pads.
    rng = np.random.default_rng(1)
    target = rng.random(shape, dtype=np.float32)
    # Model outputs are unclipped in the loss: tanh * 0.58 + 0.5 spans about -0.08..1.08.
    prediction = np.clip(target + rng.normal(0, 0.2, shape), -0.08, 1.08).astype(np.float32)
    for name, metric in metrics.METRICS.items():
        np.testing.assert_allclose(metric(prediction, target), tf_metric(name, prediction, target),
                                   rtol=0, atol=TOLERANCE, err_msg=name)


def test_max_val_matches_tensorflow():
    photo = load_photo('chelsea.jpg')[None, :200, :200] * 255
    shifted = np.roll(photo, 1, axis=1)
    for name, tf_function in [('psnr', tf.image.psnr), ('ssim', tf.image.ssim),
                              ('ms_ssim', tf.image.ssim_multiscale)]:
        expected = tf_function(shifted, photo, max_val=255.0).numpy()
        got = metrics.METRICS[name](shifted, photo, max_val=255.0)
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, err_msg=name)
        # ... and differs from treating the same numbers as [0, 1] images.
        assert not np.allclose(metrics.METRICS[name](shifted, photo), expected, atol=TOLERANCE)


def test_identical_images():
    photo = load_photo('chelsea.jpg')[None]
    assert np.isinf(metrics.psnr(photo, photo)).all()
    np.testing.assert_allclose(metrics.ssim(photo, photo), 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics.ms_ssim(photo, photo), 1.0, atol=1e-6)


def test_ms_ssim_minimum_size_is_tensorflows():
    rng = np.random.default_rng(2)
    side = metrics.ms_ssim_min_size()
    for shape in [(1, side - 1, side + 40, 3), (1, side + 40, side - 1, 3)]:
        images = rng.random(shape, dtype=np.float32)
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf_metric('ms_ssim', images, images)
        with pytest.raises(ValueError, match=f'at least {side} pixels'):
            metrics.ms_ssim(images, images)
    smallest = rng.random((1, side, side, 3), dtype=np.float32)
    blurred = (smallest + np.roll(smallest, 1, axis=2)) / 2
    np.testing.assert_allclose(metrics.ms_ssim(blurred, smallest),
                               tf_metric('ms_ssim', blurred, smallest), atol=TOLERANCE)


def test_bad_shapes_raise():
    images = np.zeros((1, 32, 32, 3), np.float32)
    mismatch = r'prediction \(1, 32, 32, 3\) and target \(1, 32, 31, 3\)'
    with pytest.raises(ValueError, match=mismatch):
        metrics.ssim(images, images[:, :, :31])
    with pytest.raises(ValueError, match=r'\[N, H, W, C\]'):
        metrics.psnr(images[0], images[0])
    with pytest.raises(ValueError, match='10x32 are too small.*at least 11'):
        metrics.ssim(images[:, :10], images[:, :10])


def test_ssim_gradient_matches_tensorflow():
    # The level-1 loss is 10 * (1 - ssim); its gradient must be TF's too.
    rng = np.random.default_rng(3)
    target = rng.random((2, 24, 20, 3), dtype=np.float32)
    prediction = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)

    loss = lambda p: jnp.sum(10 * (1 - metrics.ssim(p, target)))
    got = np.asarray(jax.jit(jax.grad(loss))(prediction))

    variable = tf.Variable(prediction)
    with tf.GradientTape() as tape:
        tf_loss = tf.reduce_sum(10 * (1 - tf.image.ssim(variable, target, max_val=1.0)))
    expected = tape.gradient(tf_loss, variable).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_pmap_matches_single_device():
    devices = jax.local_device_count()
    rng = np.random.default_rng(4)
    target = rng.random((devices, 1, 32, 40, 3), dtype=np.float32)
    prediction = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)
    for name in ('psnr', 'ssim'):
        metric = metrics.METRICS[name]
        mapped = jax.pmap(metric)(prediction, target)
        single = metric(prediction.reshape(-1, 32, 40, 3), target.reshape(-1, 32, 40, 3))
        np.testing.assert_allclose(np.asarray(mapped).reshape(-1), single, rtol=1e-6, err_msg=name)


def test_bfloat16_inputs_are_scored_in_float32():
    rng = np.random.default_rng(5)
    target = rng.random((1, 16, 16, 3), dtype=np.float32)
    prediction = jnp.asarray(target[:, ::-1], jnp.bfloat16)
    got = metrics.ssim(prediction, target)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, tf_metric('ssim', np.asarray(prediction, np.float32), target), atol=TOLERANCE)


def test_crop_border():
    images = np.arange(2 * 8 * 10 * 3, dtype=np.float32).reshape(2, 8, 10, 3)
    np.testing.assert_array_equal(metrics.crop_border(images, 2), images[:, 2:6, 2:8])
    np.testing.assert_array_equal(metrics.crop_border(images, 0), images)
    with pytest.raises(ValueError, match='border 4 leaves nothing of images of size 8x10'):
        metrics.crop_border(images, 4)
    with pytest.raises(ValueError, match='border must be >= 0'):
        metrics.crop_border(images, -1)


def test_image_metrics_with_pynet_border_matches_tensorflow():
    photo = load_photo('coffee.jpg')
    predictions = degraded_copies(photo)[:2]
    targets = np.broadcast_to(photo, predictions.shape).copy()
    scores = metrics.image_metrics(predictions, targets, border=32)
    assert sorted(scores) == ['ms_ssim', 'psnr', 'ssim']
    cut = np.s_[:, 32:-32, 32:-32, :]
    for name, values in scores.items():
        np.testing.assert_allclose(values, tf_metric(name, predictions[cut], targets[cut]),
                                   atol=TOLERANCE, err_msg=name)
    whole = metrics.image_metrics(predictions, targets, names=('psnr',))
    assert list(whole) == ['psnr'] and not np.allclose(whole['psnr'], scores['psnr'])
    with pytest.raises(ValueError, match="Unknown metric.*'lpips'"):
        metrics.image_metrics(predictions, targets, names=('lpips',))
