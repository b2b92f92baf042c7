"""Random-resized crops taken while decoding, so the CPU does not decode pixels the crop throws away.

`RandomResizedCrop` draws boxes as torchvision does (area fraction in `scale`, log-uniform aspect ratio in
`ratio`, 10 tries, else a centre crop with the ratio clamped). `decode_crop` reads a JPEG's header, draws the
box, and asks libjpeg-turbo for the smallest DCT scale (1, 1/2, 1/4, 1/8) at which the box still covers the
output size on both sides: a 96 px box of a 1024 px photo decoded for a 224 px output never needs the
full-resolution decode. The box is then resampled to the output (area averaging when reducing, bilinear when enlarging).
From 256 px shards at 224 px output the scale is 1 for almost every box (boxes are 72-256 px), so the saving
there is the smaller tensor, not the decode; from larger stored images it is the decode too.

Boxes are a pure function of (seed, epoch, sample id): the same on every rank, worker count and backend
order, and a resumed run sees the boxes it would have seen. They are drawn for a whole task at once from a
counter-based generator (splitmix64 of the sample's key), so no generator object is built per image: that had
cost about 30 us of GIL-held Python an image, a tenth of a 224 px crop's decode.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.kv import parse_kv
from pipeline.shards.images import CorruptImage, _is_jpeg, _plain, check_size, convert, jpeg_pixels


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

    def boxes(self, heights, widths, seed: int, epoch: int, ids) -> np.ndarray:
        """(n, 4) int64 boxes (top, left, box height, box width) of images of heights x widths pixels, drawn as
        torchvision draws them: up to TRIES (area fraction, log-aspect) pairs, the first box that fits, placed
        uniformly; else the largest centre box within the ratio range. Sample k's box depends on (seed, epoch,
        ids[k]) alone."""
        height = np.asarray(heights, dtype=np.float64).reshape(-1)
        width = np.asarray(widths, dtype=np.float64).reshape(-1)
        u = uniforms(seed, epoch, ids, 2 * TRIES + 2)
        target = (height * width)[:, None] * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, :TRIES])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, TRIES:2 * TRIES])
        w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))  # round half to even, as round()
        fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
        first = np.argmax(fits, axis=1)
        pick = np.arange(len(height))
        bw, bh = w[pick, first], h[pick, first]
        top = np.floor(u[:, -2] * (height - bh + 1))
        left = np.floor(u[:, -1] * (width - bw + 1))
        out = np.stack([top, left, bh, bw], axis=1).astype(np.int64)
        miss = ~fits.any(axis=1)
        if miss.any():  # the largest centre box within the ratio range
            hm, wm = height[miss], width[miss]
            in_ratio = wm / hm
            cw = np.where(in_ratio > self.ratio[1], np.rint(hm * self.ratio[1]), wm)
            ch = np.where(in_ratio < self.ratio[0], np.rint(wm / self.ratio[0]), hm)
            out[miss] = np.stack([(hm - ch) // 2, (wm - cw) // 2, ch, cw], axis=1).astype(np.int64)
        return out


TRIES = 10  # torchvision's
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (their products wrap silently, as the hash wants)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, ids, n: int) -> np.ndarray:
    """(len(ids), n) float64 in [0, 1): column j of row k is a hash of (seed, epoch, ids[k], j)."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.int64).astype(np.uint64) * _GOLDEN + _MIX1)
        key = _mix(key ^ (np.array([epoch], dtype=np.int64).astype(np.uint64) * _GOLDEN + _MIX2))
        base = _mix(key ^ _mix(np.asarray(ids, dtype=np.int64).reshape(-1).astype(np.uint64) * _GOLDEN))
        bits = _mix(base[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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


def image_dims(data) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header (about a microsecond), None for other formats or a bad header."""
    if _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return height, width
        except ValueError:
            return None
    return None


Box = tuple[int, int, int, int]


def decode_crop(data, mode: str, crop: RandomResizedCrop, draw: Callable[[int, int], Box]) -> tuple[np.ndarray, dict]:
    """(crop.size x crop.size x C uint8 array, {"box": (top, left, h, w) at full resolution, "scale": DCT scale});
    `draw(height, width)` gives the box of the image at its full size."""
    dims = image_dims(data)
    if dims is not None:
        height, width = dims
        check_size(height, width)
        top, left, h, w = draw(height, width)
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
    box = draw(pixels.shape[0], pixels.shape[1])
    return _resample(pixels, box, crop.size), {"box": box, "scale": 1.0}


def task_boxes(crop: RandomResizedCrop, blobs: list, seed: int, epoch: int, ids: np.ndarray) -> list:
    """A `draw` for each image of a task: its box from one vectorised draw over the task's JPEG headers (an
    image whose header does not say its size, PNG, gets its own draw once decoded)."""
    ids = np.asarray(ids, dtype=np.int64)
    dims = [image_dims(b) for b in blobs]
    known = [k for k, d in enumerate(dims) if d is not None]
    boxes = {}
    if known:
        hw = np.array([dims[k] for k in known])
        for k, box in zip(known, crop.boxes(hw[:, 0], hw[:, 1], seed, epoch, ids[known]).tolist()):
            boxes[k] = tuple(box)

    def draw_for(k: int):
        def draw(height: int, width: int) -> Box:
            if dims[k] == (height, width):
                return boxes[k]
            return tuple(crop.boxes([height], [width], seed, epoch, ids[k:k + 1])[0].tolist())
        return draw

    return [draw_for(k) for k in range(len(blobs))]


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
