"""Random-resized crops taken while decoding, so the CPU does not decode pixels the crop throws away.

`RandomResizedCrop` draws boxes as torchvision does (area fraction in `scale`, log-uniform aspect ratio in
`ratio`, 10 tries, else a centre crop with the ratio clamped). `decode_crop` reads a JPEG's header, draws the
box, and asks libjpeg-turbo for the smallest DCT scale (1, 1/2, 1/4, 1/8) at which the box still covers the
output size on both sides: a 96 px box of a 1024 px photo decoded for a 224 px output never needs the
full-resolution decode. The box is then resampled to the output (area averaging when reducing, bilinear when enlarging).
From 256 px shards at 224 px output the scale is 1 for almost every box (boxes are 72-256 px), so the saving
there is the smaller tensor, not the decode; from larger stored images it is the decode too.

Boxes are a pure function of (seed, epoch, sample id): the same on every rank, worker count and backend
order, and a resumed run sees the boxes it would have seen.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.kv import parse_kv
from pipeline.shards.images import CorruptImage, _is_jpeg, _plain, check_jpeg_pixels, check_size, convert, jpeg_pixels


@dataclass(frozen=True)
class RandomResizedCrop:
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.size < 1:
            raise PipelineError(f"crop size {self.size}: must be a positive number of pixels")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise PipelineError(f"crop scale {self.scale}: need 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise PipelineError(f"crop ratio {self.ratio}: need 0 < min <= max")

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, box height, box width) in pixels of a height x width image."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height  # fallback: the largest centre box within the ratio range
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def crop_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, sample_id, 0xC0])


def _cv2():
    try:
        import cv2  # comes with the ffcv extra (opencv-python); about 6x faster than PIL for this resize

        return cv2
    except ImportError:
        return None


def _resample(pixels: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Pixels[top:top+h, left:left+w] resampled to size x size: area averaging when reducing (no aliasing),
    bilinear when enlarging; OpenCV when it imports, else PIL (same filters)."""
    top, left, h, w = box
    part = pixels[top:top + h, left:left + w]
    cv2 = _cv2()
    if cv2 is not None:
        out = cv2.resize(part, (size, size), interpolation=cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR)
        return out.reshape(size, size, -1)
    img = Image.fromarray(part[:, :, 0] if part.shape[2] == 1 else part)
    out = np.asarray(img.resize((size, size), Image.BOX if min(h, w) > size else Image.BILINEAR))
    return out.reshape(size, size, -1)


def decode_crop(data: bytes, mode: str, crop: RandomResizedCrop, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(crop.size x crop.size x C uint8 array, {"box": (top, left, h, w) at full resolution, "scale": DCT scale})."""
    check_jpeg_pixels(data)
    if _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            height = None
        if height:
            top, left, h, w = crop.box(height, width, rng)
            need = crop.size / min(h, w)  # the decode scale at which the box still covers the output
            pixels = jpeg_pixels(data, mode, False, min(height, math.ceil(height * need)),
                                 min(width, math.ceil(width * need)))
            if pixels is not None:
                sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
                scaled = (round(top * sy), round(left * sx), max(1, round(h * sy)), max(1, round(w * sx)))
                return _resample(pixels, scaled, crop.size), {"box": (top, left, h, w), "scale": sy}
    try:
        img = Image.open(io.BytesIO(data))
        check_size(img.height, img.width)
        pixels = np.asarray(convert(img, mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(_plain(exc)) from exc
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    box = crop.box(pixels.shape[0], pixels.shape[1], rng)
    return _resample(pixels, box, crop.size), {"box": box, "scale": 1.0}


def parse_crop(text: str | None) -> RandomResizedCrop | None:
    """`random-resized:224[,scale=0.08-1][,ratio=0.75-1.333]` (the `data.crop` setting and `--crop`), or None."""
    if not text or text == "none":
        return None
    kind, _, rest = text.partition(":")
    if kind != "random-resized" or not rest:
        raise PipelineError(f"crop {text!r}: expected none or random-resized:SIZE[,scale=LO-HI][,ratio=LO-HI]")
    size, _, options = rest.partition(",")
    try:
        kw: dict = {"size": int(size)}
        for key, value in parse_kv(options, "crop", {"scale": str, "ratio": str}).items():
            lo, _, hi = value.partition("-")
            kw[key] = (float(lo), float(hi))
    except (ValueError, PipelineError):
        raise PipelineError(f"crop {text!r}: expected random-resized:SIZE[,scale=LO-HI][,ratio=LO-HI]") from None
    return RandomResizedCrop(**kw)
