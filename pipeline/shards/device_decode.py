"""JPEG decoding on the training device: loader workers only read bytes (and draw crop boxes from the JPEG
headers); the main process decodes the whole batch on the GPU and crops and resizes there.

The decoder is torchvision's `decode_jpeg(..., device="cuda")` (nvJPEG), chosen automatically by
`create_loader(decode="auto")` when the device is CUDA and torchvision imports with CUDA support; everything
else keeps the CPU path. The decode function is a parameter, so the same batching, cropping and resizing run in
the tests on a CPU with libjpeg-turbo standing in for nvJPEG. Boxes come from `RandomResizedCrop.boxes`, as on
the CPU path: a run sees the same boxes whichever path decodes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.shards.batch import Batch
from pipeline.shards.crops import RandomResizedCrop


class EncodedBatch(NamedTuple):
    """A batch before decoding: every image's bytes back to back, where each starts, its crop box."""

    data: torch.Tensor  # uint8, all images' bytes
    offsets: torch.Tensor  # (B + 1,) int64
    boxes: torch.Tensor  # (B, 4) int64: top, left, height, width at full resolution (the whole image: no crop)
    labels: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor | None = None


def encode_batch(blobs: list, labels, ids, weights, crop: RandomResizedCrop | None, seed: int, epoch: int,
                 paths: Callable[[int], str]) -> EncodedBatch:
    """Worker side: bytes and boxes only (a JPEG header read is microseconds; the decode is the GPU's)."""
    sizes = np.array([len(b) for b in blobs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    data = np.frombuffer(b"".join(bytes(b) for b in blobs), dtype=np.uint8).copy()
    dims = np.empty((len(blobs), 2), dtype=np.int64)
    for k, blob in enumerate(blobs):
        try:
            dims[k] = simplejpeg.decode_jpeg_header(bytes(blob[:65536]))[:2]
        except ValueError as exc:
            raise PipelineError(f"{paths(k)}: sample {int(ids[k])} is not a JPEG the GPU decoder reads ({exc}); "
                                "use data decode=cpu") from exc
    if crop is not None:
        boxes = crop.boxes(dims[:, 0], dims[:, 1], seed, epoch, np.asarray(ids))
    else:
        boxes = np.concatenate([np.zeros_like(dims), dims], axis=1)
    return EncodedBatch(torch.from_numpy(data), torch.from_numpy(offsets), torch.from_numpy(boxes), labels, ids,
                        weights)


class DeviceDecoder:
    """Main-process side: `decode(list of uint8 CPU tensors) -> list of (C, H, W) uint8 tensors on the device`."""

    def __init__(self, decode: Callable, device, size: int, channels: int):
        self.decode, self.device, self.size, self.channels = decode, torch.device(device), size, channels

    def __call__(self, enc: EncodedBatch) -> Batch:
        offsets = enc.offsets.tolist()
        images = self.decode([enc.data[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)])
        out = torch.empty((len(images), self.channels, self.size, self.size), dtype=torch.uint8, device=self.device)
        for k, (img, (top, left, h, w)) in enumerate(zip(images, enc.boxes.tolist())):
            part = img[:self.channels, top:top + h, left:left + w]
            if part.shape[-2:] != (self.size, self.size):  # area-like when reducing (antialias), bilinear when enlarging
                part = F.interpolate(part[None].float(), (self.size, self.size), mode="bilinear",
                                     antialias=min(h, w) > self.size, align_corners=False)[0]
                part = part.round_().clamp_(0, 255).to(torch.uint8)
            out[k] = part
        out = out.contiguous(memory_format=torch.channels_last)
        move = (lambda t: None if t is None else t.to(self.device, non_blocking=True))
        return Batch(out, move(enc.labels), move(enc.ids), move(enc.weights))


def torchvision_decoder(device) -> Callable | None:
    """nvJPEG through torchvision, or None where it does not import or cannot decode on `device`."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # ImportError, or torchvision built for another torch (an OSError/RuntimeError at import)
        return None

    def decode(blobs):
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)

    try:  # one tiny image: a torchvision without nvJPEG fails here, not in the first epoch
        probe = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
        decode([torch.frombuffer(bytearray(probe), dtype=torch.uint8)])
    except Exception:
        return None
    return decode
