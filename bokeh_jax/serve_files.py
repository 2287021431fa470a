"""The files of the page (`launch.py --mode=serve`, serve.py): uploads decoded and checked,
images encoded for the browser and for download, and the focus read from a click.
"""

import io
import os
import re
import tempfile
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from bokeh_jax import control
from bokeh_jax import errors
from bokeh_jax import image_io
from bokeh_jax import render

# Formats of uploaded photos, as Pillow names them (MPO: the JPEG variant of some phone cameras).
PHOTO_FORMATS = ('JPEG', 'MPO', 'PNG')
# Radius of the focus window around a clicked point, as a fraction of the depth map's longer side:
# the median over a few pixels keeps a click on an edge from picking a stray value.
FOCUS_WINDOW = 0.01


class UserError(errors.UserError):
    """A problem with what the user sent; the message is shown on the page as it is, with an
    HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# Decoding uploads.
# ----------------------------------------------------------------------------------------------


def safe_name(name: str, default: str) -> str:
    """The base name of an uploaded file, reduced to characters safe in a path and a header."""
    name = re.sub(r'[^A-Za-z0-9._ -]', '_', os.path.basename(name or ''))[:100].strip(' .')
    return name or default


def _megapixels(pixels: int) -> str:
    return f'{pixels / 1e6:.3g} megapixels'


def _with_name(error: Exception, path: str, name: str) -> str:
    """image_io's messages name the temporary file the upload was read from: name the upload."""
    return str(error).replace(path, name)


def decode_photo(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, bytes | None]:
    """An uploaded photo -> (uint8 [H, W, 3] upright, EXIF bytes with orientation reset or None).

    Decoded by `image_io.read_photo`, like --mode=render (EXIF orientation applied, grayscale and
    alpha handled). Raises UserError naming `name` for anything but a readable JPEG or PNG of at
    least 2x2 and at most `max_pixels` pixels; the size is checked from the header, before decoding.
    """
    if not data:
        raise UserError(f'{name}: the file is empty')
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
            exif = image.getexif()
    except Image.DecompressionBombError:
        raise UserError(f'{name}: the image is far too large (over {_megapixels(max_pixels)})'
                        ) from None
    except Exception:  # Pillow raises many types on files it does not recognise
        raise UserError(f'{name}: not an image (expected a JPEG or PNG photo)') from None
    if fmt not in PHOTO_FORMATS:
        raise UserError(f'{name}: a {fmt} image; expected a JPEG or PNG photo')
    if width * height > max_pixels:
        raise UserError(
            f'{name}: {width}x{height} is {_megapixels(width * height)}; this server takes at most '
            f'{_megapixels(max_pixels)} (config.serve.max_pixels)')
    if min(width, height) < 2:
        raise UserError(f'{name}: {width}x{height}; a photo must be at least 2x2 pixels')
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, name)
        with open(path, 'wb') as f:
            f.write(data)
        try:
            photo = image_io.read_photo(path)  # e.g. a truncated file fails here
        except image_io.ImageFileError as e:
            raise UserError(_with_name(e, path, name)) from None
    if ExifTags.Base.Orientation in exif:
        exif[ExifTags.Base.Orientation] = 1  # the pixels are upright now
    return photo, (exif.tobytes() if len(exif) else None)


def decode_depth(data: bytes, name: str, photo_hw: tuple[int, int], max_pixels: int) -> np.ndarray:
    """An uploaded depth map (grayscale PNG 8/16-bit or .npy, near = bright) -> float32 [h, w].

    Raises UserError naming `name` when it cannot be read or its aspect ratio is not the photo's.
    """
    if not data:
        raise UserError(f'{name}: the depth file is empty')
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, name)
        with open(path, 'wb') as f:
            f.write(data)
        if not name.lower().endswith('.npy'):
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except Exception:  # unrecognised file: read_depth words it
                width = height = 0
            if width * height > max_pixels:
                raise UserError(f'{name}: the depth map is {width}x{height}, over '
                                f'{_megapixels(max_pixels)} (config.serve.max_pixels)')
        try:
            depth = image_io.read_depth(path)
        except image_io.ImageFileError as e:
            raise UserError(_with_name(e, path, name)) from None
    try:
        render.check_depth_aspect(depth.shape, photo_hw)
    except ValueError as e:
        raise UserError(f'{name}: {e}') from None
    return depth


def focus_at(depth: np.ndarray, x: float | None = None, y: float | None = None) -> float:
    """The focal disparity in [0, 1] of a uint8 near = bright depth map: around the point (x, y),
    fractions of width and height (the median over a small window), or auto focus without one."""
    h, w = depth.shape
    disparity = depth.astype(np.float32) / 255
    return control.focal_disparity(
        disparity, None if x is None else (int(y * h), int(x * w)), radius=FOCUS_WINDOW)


# ----------------------------------------------------------------------------------------------
# Encoding images.
# ----------------------------------------------------------------------------------------------


def fit_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) no larger than `side` on the longer side, keeping the aspect ratio; never upscaled."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def encode(image: np.ndarray, fmt: str, *, size: tuple[int, int] | None = None,
           exif: bytes | None = None, jpeg_quality: int = 95) -> bytes:
    """uint8 [H, W, 3] or [H, W] -> PNG or JPEG bytes, resized to `size` (h, w) when given."""
    picture = Image.fromarray(image)
    if size is not None and size != image.shape[:2]:
        picture = picture.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    options: dict[str, Any] = {'exif': exif} if exif else {}
    if fmt == 'JPEG':
        options['quality'] = int(jpeg_quality)
    out = io.BytesIO()
    picture.save(out, format=fmt, **options)
    return out.getvalue()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8, rounded as `image_io.save_image` writes it."""
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
