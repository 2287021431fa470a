"""bokeh_jax.image_io: photos and depth maps in every mode and bit depth, outputs by extension."""

import os

import numpy as np
from PIL import Image
import pytest

from bokeh_jax import image_io
from helpers import random_photo, save_png


def test_read_photo_modes(tmp_path):
    rng = np.random.default_rng(6)
    rgb = random_photo(rng, 30, 41)
    # Grayscale, 8 and 16 bit: repeated on three channels.
    gray = rgb[..., 0]
    np.testing.assert_array_equal(
        image_io.read_photo(save_png(tmp_path / 'g.png', gray)), np.stack([gray] * 3, -1)
    )
    gray16 = rng.integers(0, 65536, (30, 41)).astype(np.uint16)
    got = image_io.read_photo(save_png(tmp_path / 'g16.png', gray16))
    np.testing.assert_array_equal(got[..., 1], np.round(gray16 / 65535 * 255).astype(np.uint8))
    # RGBA: composited over white.
    alpha = rng.integers(0, 256, (30, 41, 1)).astype(np.uint8)
    got = image_io.read_photo(save_png(tmp_path / 'a.png', np.concatenate([rgb, alpha], -1)))
    expected = rgb * (alpha / 255) + 255 * (1 - alpha / 255)
    assert got.dtype == np.uint8 and np.abs(got - expected).max() <= 0.5 + 1e-9
    # EXIF orientation 6: the stored pixels are shown rotated 90 degrees clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / 'r.jpg', quality=95, exif=exif)
    stored = np.asarray(Image.open(tmp_path / 'r.jpg').convert('RGB'))
    got = image_io.read_photo(str(tmp_path / 'r.jpg'))
    assert got.shape == (41, 30, 3)
    np.testing.assert_array_equal(got, np.rot90(stored, k=-1))
    # Unreadable: garbage and a truncated JPEG name themselves.
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    with pytest.raises(image_io.ImageFileError, match='bad.jpg: cannot read'):
        image_io.read_photo(str(tmp_path / 'bad.jpg'))
    data = (tmp_path / 'r.jpg').read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(data[: len(data) // 2])
    with pytest.raises(image_io.ImageFileError, match='cut.jpg: cannot read'):
        image_io.read_photo(str(tmp_path / 'cut.jpg'))


def test_read_depth_formats(tmp_path):
    rng = np.random.default_rng(7)
    d16 = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    np.testing.assert_array_equal(image_io.read_depth(save_png(tmp_path / 'd16.png', d16)), d16)
    d8 = d16.astype(np.uint8)
    as_rgb = save_png(tmp_path / 'rgb.png', np.stack([d8] * 3, -1))
    np.testing.assert_array_equal(image_io.read_depth(as_rgb), d8)
    colour = np.stack([d8, d8, 255 - d8], -1)
    with pytest.raises(image_io.ImageFileError, match='colour.png: .*colour'):
        image_io.read_depth(save_png(tmp_path / 'colour.png', colour))
    np.save(tmp_path / 'd.npy', d16.astype(np.float64) / 7)
    np.testing.assert_allclose(image_io.read_depth(str(tmp_path / 'd.npy')), d16 / 7, rtol=1e-6)
    np.save(tmp_path / 'nan.npy', np.full((4, 4), np.nan))
    with pytest.raises(image_io.ImageFileError, match='nan.npy: .*NaN'):
        image_io.read_depth(str(tmp_path / 'nan.npy'))
    np.save(tmp_path / 'cube.npy', np.zeros((4, 4, 3)))
    with pytest.raises(image_io.ImageFileError, match=r'cube.npy: .*\[h, w\]'):
        image_io.read_depth(str(tmp_path / 'cube.npy'))


def test_save_image_format_from_extension(tmp_path):
    image = random_photo(np.random.default_rng(8), 20, 30) / np.float32(255)
    image_io.save_image(str(tmp_path / 'x.png'), image)
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / 'x.png')), np.round(image * 255).astype(np.uint8)
    )
    image_io.save_image(str(tmp_path / 'x.JPG'), image)
    assert Image.open(tmp_path / 'x.JPG').format == 'JPEG'
    with pytest.raises(image_io.ImageFileError, match=r"x.xyz: unknown output image format '.xyz'"):
        image_io.save_image(str(tmp_path / 'x.xyz'), image)
    assert sorted(os.listdir(tmp_path)) == ['x.JPG', 'x.png']  # no partial files left
