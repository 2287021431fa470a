"""Reading and writing photos and depth maps: files (EXIF, modes, bit depths) and TFDS bytes.

Photos come out as displayed: uint8 [H, W, 3], EXIF orientation applied, grayscale repeated on
three channels, alpha composited over white. Depth maps come out in their own units: float32
[h, w] at any resolution (`image_ops.normalize_depth` brings them to the model's convention).
Outputs are written as 8-bit images, format from the file extension, atomically.

Every error about a file is an ImageFileError whose message starts with the path.
"""

import io
import os

import numpy as np
from PIL import Image, ImageOps


class ImageFileError(Exception):
    """A photo or depth map that cannot be read, or an output that cannot be written; the
    message names the file."""


class _DepthFormatError(ValueError):
    """A readable depth image that is not a single-channel map."""


def decode(data: bytes, what: str = 'image') -> np.ndarray:
    """Encoded JPEG/PNG bytes (e.g. a TFDS record's image) as stored: uint8 [H, W, 3] or [H, W].

    No EXIF rotation or mode conversion: the TFDS builders store RGB JPEGs and 8-bit grayscale
    PNGs. Raises ValueError naming `what` when the bytes do not decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image)
    except OSError as e:
        raise ValueError(f'cannot decode {what}: {e}') from e


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """8-bit or 16-bit grayscale image -> uint8 [H, W] (16-bit scaled by 255/65535)."""
    if image.mode in ('1', 'L'):
        return np.asarray(image.convert('L'))
    values = np.asarray(image)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(f'{image.mode} image with values outside 0..65535 (not a 16-bit image)')
    return np.round(values.astype(np.float32) * np.float32(255 / 65535)).astype(np.uint8)


def _decode_photo(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ('1', 'L', 'I') or mode.startswith('I;16'):
        return np.repeat(_gray_to_uint8(image)[..., None], 3, axis=-1)
    if mode == 'F':
        raise ValueError('32-bit floating-point images are not supported; use 8-bit JPEG or PNG')
    if mode in ('LA', 'La', 'PA', 'RGBA', 'RGBa') or (mode == 'P' and 'transparency' in image.info):
        rgba = np.asarray(image.convert('RGBA'), np.float32)
        alpha = rgba[..., 3:] / 255
        return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.asarray(image.convert('RGB'))  # RGB, palette, CMYK, YCbCr, ...


def read_photo(path: str) -> np.ndarray:
    """A photo as it is displayed: uint8 [H, W, 3].

    EXIF orientation is applied. Grayscale (1-, 8- or 16-bit) is repeated on the three channels
    (16-bit scaled to 8). Images with alpha (LA, RGBA, palette with transparency) are composited
    over white, as a viewer without transparency shows them; the output has no alpha. Other modes
    (CMYK, YCbCr, palette) are converted to RGB by Pillow. Raises ImageFileError naming `path`
    when it cannot be read.
    """
    try:
        with Image.open(path) as image:
            return _decode_photo(ImageOps.exif_transpose(image))
    except Exception as e:  # Pillow raises many types on corrupt files; all mean "unreadable"
        raise ImageFileError(f'{path}: cannot read the photo ({type(e).__name__}: {e})') from None


def read_depth(path: str) -> np.ndarray:
    """A depth map in its own units: float32 [h, w], any resolution.

    `.npy`: a real array [h, w] or [h, w, 1]. Images (PNG, ...): grayscale 8-bit, 16-bit or float,
    EXIF orientation applied; an RGB(A) image is accepted only when it is a gray map stored as RGB
    (equal channels) and opaque. Raises ImageFileError naming `path`.
    """
    try:
        if path.lower().endswith('.npy'):
            depth = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                depth = _decode_depth(ImageOps.exif_transpose(image))
    except _DepthFormatError as e:
        raise ImageFileError(f'{path}: {e}') from None
    except Exception as e:  # Pillow/numpy raise many types on corrupt files
        raise ImageFileError(
            f'{path}: cannot read the depth map ({type(e).__name__}: {e})') from None
    depth = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
    if depth.ndim != 2 or min(depth.shape) == 0:
        raise ImageFileError(f'{path}: a depth map must be [h, w] or [h, w, 1]; got {depth.shape}')
    if not np.issubdtype(depth.dtype, np.integer) and not np.issubdtype(depth.dtype, np.floating):
        raise ImageFileError(f'{path}: depth map must hold real numbers; got dtype {depth.dtype}')
    depth = depth.astype(np.float32)
    if not np.all(np.isfinite(depth)):
        raise ImageFileError(f'{path}: depth map has NaN or infinite values')
    return depth


def _decode_depth(image: Image.Image) -> np.ndarray:
    if image.mode in ('1', 'L', 'I', 'F') or image.mode.startswith('I;16'):
        return np.asarray(image.convert('L') if image.mode == '1' else image)
    rgba = np.asarray(image.convert('RGBA'))
    if np.any(rgba[..., 3] != 255):
        raise _DepthFormatError('depth map has transparent pixels')
    if np.any(rgba[..., 0] != rgba[..., 1]) or np.any(rgba[..., 0] != rgba[..., 2]):
        raise _DepthFormatError(
            f'depth map is a colour ({image.mode}) image; expected a single-channel map '
            f'(grayscale PNG, 8 or 16 bit, near = bright, or a .npy array)'
        )
    return rgba[..., 0]


def output_format(path: str) -> str:
    """Pillow format name for an output path, from its extension (e.g. 'PNG', 'JPEG')."""
    extension = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(extension)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageFileError(
            f'{path}: unknown output image format {extension or "(no extension)"!r}; '
            f'use .png (lossless) or .jpg'
        )
    return fmt


def save_image(path: str, image: np.ndarray, *, jpeg_quality: int = 95) -> None:
    """Writes float [H, W, 3] in [0, 1] as 8-bit (rounded), format from the extension.

    Written to a temporary file next to `path` and renamed, so an interrupted run leaves no
    truncated output behind. Raises ImageFileError for an unknown extension; OSError when the
    file cannot be written.
    """
    fmt = output_format(path)
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f'.{name}.partial')
    options = {'quality': int(jpeg_quality)} if fmt == 'JPEG' else {}
    try:
        Image.fromarray(pixels).save(partial, format=fmt, **options)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
