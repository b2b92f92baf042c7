"""Image bytes in and out: the only place the project calls PIL.

Encoding happens once in `prepare`; decoding happens on every read. Both resize the same way (shorter side
to N, then a centre crop to N x N) so a shard set prepared with `--image-size N` batches without padding.
JPEG goes through simplejpeg (libjpeg-turbo without PIL's Python-level header parsing: about 4x faster on
32x32 images); PIL handles everything else and the JPEGs simplejpeg refuses (CMYK, odd markers).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# Stored members are JPEG or PNG; everything else a folder holds is transcoded to one of them.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png"}
SOURCE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class Encoding:
    """How prepare stores an image: `size` (shorter side to N, centre crop N x N; None keeps the source's
    pixels) and the quality of the JPEGs it has to re-encode (resized JPEG sources)."""

    size: int | None = None
    jpeg_quality: int = DEFAULT_JPEG_QUALITY


class CorruptImage(Exception):
    """An image that does not decode; prepare skips it and reports why."""


# Decompression bombs: an image is refused from its header, before any pixel is decoded, when it declares more
# pixels than PIL's own limit (about 89 million: 9,459 x 9,459); a 700-byte JPEG may claim 65000 x 65000.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header alone (libjpeg-turbo's header read for JPEG, PIL's lazy open for the
    rest), or None when the header does not say."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return height, width
        except ValueError:
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                return img.height, img.width
    except Image.DecompressionBombError as exc:
        raise CorruptImage(f"{_plain(exc)} (refused before decoding)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def check_size(height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise CorruptImage(f"declares {width} x {height} pixels, above the limit of {MAX_PIXELS:,} (a "
                           "decompression bomb?); refused before decoding")


def check_pixels(data: bytes) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS pixels (CorruptImage, before decoding)."""
    size = declared_size(data)
    if size is not None:
        check_size(*size)


def check_jpeg_pixels(data: bytes) -> None:
    """The cheap check of the loaders' hot path: a JPEG header read (about a microsecond); other formats are
    checked on the image PIL opens anyway, before it decodes."""
    if _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return
        check_size(height, width)


def open_fully(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes every byte: truncated files fail here, not later in a loader
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(_plain(exc)) from exc


def _plain(exc: Exception) -> str:
    """An error's text without object addresses (`<_io.BytesIO object at 0x7f...>`): reasons stay comparable."""
    import re

    text = re.sub(r"<([^<>]*?) at 0x[0-9a-fA-F]+>", r"<\1>", str(exc))
    return text or type(exc).__name__


def convert(img: Image.Image, mode: str) -> Image.Image:
    """`img.convert(mode)`, except that 16-bit greyscale (PNG's I;16, read by PIL as I;16 or I) is scaled to
    8 bits: PIL's own conversion clips it, which turns most pixels white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.uint32)
        arr = (arr * 255 + 32767) // 65535 if img.mode.startswith("I;16") or arr.max() > 255 else arr
        img = Image.fromarray(arr.astype(np.uint8), "L")
    return img.convert(mode)


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear, antialiased), then a centre crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _encode(img: Image.Image, fmt: str, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=1)  # level 1: PNG stays lossless, writing stays fast
    return buf.getvalue()


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_pixels(data: bytes, mode: str, strict: bool, min_height: int = 0, min_width: int = 0) -> np.ndarray | None:
    """HxWxC pixels decoded by libjpeg-turbo at the smallest DCT scale (1, 1/2, 1/4, 1/8) that leaves at least
    min_height x min_width; None when it refuses the file (`strict`: also when it only warns)."""
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", strict=strict,
                                     min_height=min_height, min_width=min_width)
    except ValueError:
        return None
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _square(pixels: np.ndarray, size: int) -> np.ndarray:
    """HxWxC pixels through `resize_square`."""
    if pixels.shape[:2] == (size, size):
        return pixels
    arr = np.asarray(resize_square(Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels), size))
    return arr.reshape(size, size, -1)


def _resize_jpeg(data: bytes, mode: str, enc: Encoding) -> tuple[bytes, str, tuple[int, int]] | None:
    """A JPEG resized the fast way: libjpeg-turbo decodes at the smallest DCT scale that still leaves both sides
    >= the target (a 500 x 375 photo to 256 px decodes at full scale, a 2000 px one at 1/4), PIL resizes with
    antialiasing, libjpeg-turbo encodes. None when libjpeg-turbo refuses the file."""
    pixels = jpeg_pixels(data, mode, True, enc.size, enc.size)
    if pixels is None:
        return None
    arr = _square(pixels, enc.size)
    out = simplejpeg.encode_jpeg(arr, quality=enc.jpeg_quality, colorspace="GRAY" if mode == "L" else "RGB")
    return out, "jpg", arr.shape[:2]


def transcode_file(data: bytes, mode: str, enc: Encoding = Encoding()) -> tuple[bytes, str, tuple[int, int]]:
    """Check that a source file decodes; return (stored bytes, extension, (height, width)).

    JPEG and PNG files are stored byte for byte when no resize is asked for: no re-encoding loss.
    """
    check_pixels(data)
    if _is_jpeg(data):
        if enc.size is not None:
            done = _resize_jpeg(data, mode, enc)
            if done is not None:
                return done
        else:
            pixels = jpeg_pixels(data, mode, strict=True)
            if pixels is not None:
                return data, "jpg", pixels.shape[:2]
            # else PIL decides: it reads some JPEGs libjpeg-turbo warns about, and refuses the truly broken
    img = open_fully(data)
    fmt = STORED_FORMATS.get(img.format or "")
    if enc.size is None and fmt is not None:
        return data, fmt, (img.height, img.width)
    img = convert(img, mode)
    if enc.size is not None:
        img = resize_square(img, enc.size)
    fmt = fmt or "png"
    return _encode(img, fmt, enc.jpeg_quality), fmt, (img.height, img.width)


def encode_array(pixels: np.ndarray, image_size: int | None) -> tuple[bytes, str, tuple[int, int]]:
    """Encode an HxW (grey) or HxWx3 uint8 array as PNG, lossless."""
    img = Image.fromarray(pixels)
    if image_size is not None:
        img = resize_square(img, image_size)
    return _encode(img, "png"), "png", (img.height, img.width)


def decode(data: bytes, mode: str, size: int | None = None) -> np.ndarray:
    """Decode stored bytes to an HxWxC uint8 array (C = 1 for mode L, 3 for RGB)."""
    check_jpeg_pixels(data)
    if _is_jpeg(data):
        arr = jpeg_pixels(data, mode, False, size or 0, size or 0)
        if arr is not None:
            return arr if size is None else _square(arr, size)
    try:
        img = Image.open(io.BytesIO(data))
        check_size(img.height, img.width)
        if size is not None and img.format == "JPEG":
            img.draft(mode, (size, size))  # lets libjpeg decode large images at a reduced scale
        img = convert(img, mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(_plain(exc)) from exc
    if size is not None:
        img = resize_square(img, size)
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr
