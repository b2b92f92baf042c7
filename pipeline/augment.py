"""Batched augmentation of images already on the device: one set of tensor ops per batch, no per-image loop.

Randomness comes from a `torch.Generator` the caller owns (its state goes into checkpoints), so a seed fixes
every crop, flip and colour change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW in [0, 255] -> float32 in [0, 1] (kept as is when already floating point)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _rand(n: int, gen: torch.Generator, device, lo=0.0, hi=1.0) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def random_resized_crop(x: torch.Tensor, size: int, gen: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a whole batch, as one affine resampling (bilinear).

    Boxes are drawn as torchvision draws them: area and log aspect ratio, up to 10 tries for a box that fits,
    else the whole image; here the 10 tries are drawn at once for every image.
    """
    n, dev = x.shape[0], x.device
    tries = 10
    area = _rand(n * tries, gen, dev, *scale).view(n, tries)
    logr = _rand(n * tries, gen, dev, math.log(ratio[0]), math.log(ratio[1])).view(n, tries)
    w_all, h_all = torch.sqrt(area * torch.exp(logr)), torch.sqrt(area / torch.exp(logr))  # fractions of a side
    fits = (w_all <= 1) & (h_all <= 1)
    first = fits.int().argmax(1, keepdim=True)
    found = fits.any(1)
    w = torch.where(found, w_all.gather(1, first)[:, 0], torch.ones(n, device=dev))
    h = torch.where(found, h_all.gather(1, first)[:, 0], torch.ones(n, device=dev))
    cx = (1 - w) * (2 * _rand(n, gen, dev) - 1)  # box centre in [-1, 1] coordinates, box kept inside
    cy = (1 - h) * (2 * _rand(n, gen, dev) - 1)
    flip = torch.where(_rand(n, gen, dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, (n, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4, flip_p: float = 0.5) -> torch.Tensor:
    """RandomCrop(size, padding) with zero padding + horizontal flip: the finetuning augmentation."""
    n, _, hgt, wid = x.shape
    dev = x.device
    padded = F.pad(x, (padding,) * 4)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
    rows = (dy[:, None] + torch.arange(hgt, device=dev)[None])  # (n, h)
    cols = (dx[:, None] + torch.arange(wid, device=dev)[None])  # (n, w)
    flip = _rand(n, gen, dev) < flip_p
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_r = rows[:, None, :, None].expand(n, x.shape[1], hgt, padded.shape[3])
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, x.shape[1], hgt, wid)
    return out.gather(3, idx_c)


def high_pass(x: torch.Tensor, radius: float) -> torch.Tensor:
    """AdvCL's high-frequency view: per image and channel, the 2-D FFT with the zero frequency shifted to the
    centre (h/2, w/2), every frequency closer than `radius` to it set to zero (an ideal high-pass filter), the
    inverse FFT, its real part. A constant image gives zeros; r = 8 at 32 px in the reference."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    i = torch.arange(h, device=x.device, dtype=torch.float32).view(-1, 1) - h / 2
    j = torch.arange(w, device=x.device, dtype=torch.float32).view(1, -1) - w / 2
    keep = (i.square() + j.square()).sqrt() >= radius
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))).real


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_jitter(x: torch.Tensor, gen: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                 p: float = 0.8) -> torch.Tensor:
    """ColorJitter applied with probability p per image, in the fixed order brightness, contrast, saturation,
    hue (torchvision shuffles the order per image; a fixed order keeps it one batched op each)."""
    n, c, dev = x.shape[0], x.shape[1], x.device
    apply = _per_sample(_rand(n, gen, dev) < p)
    y = x * _per_sample(_rand(n, gen, dev, 1 - brightness, 1 + brightness))
    y = y.clamp(0, 1)
    grey = _grey(y) if c == 3 else y
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * _per_sample(_rand(n, gen, dev, 1 - contrast, 1 + contrast)) + mean).clamp(0, 1)
    if c == 3:
        y = ((y - _grey(y)) * _per_sample(_rand(n, gen, dev, 1 - saturation, 1 + saturation)) + _grey(y)).clamp(0, 1)
        # Hue: rotate the chroma plane of YIQ by 2*pi*shift.
        angle = _rand(n, gen, dev, -hue, hue) * 2 * math.pi
        yiq = torch.einsum("ij,njhw->nihw", _YIQ.to(dev), y)
        cos, sin = _per_sample(torch.cos(angle)), _per_sample(torch.sin(angle))
        i, q = yiq[:, 1:2], yiq[:, 2:3]
        yiq = torch.cat([yiq[:, 0:1], cos * i - sin * q, sin * i + cos * q], 1)
        y = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_YIQ).to(dev), yiq).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    mask = _per_sample(_rand(x.shape[0], gen, x.device) < p)
    return torch.where(mask, _grey(x).expand_as(x), x)


@dataclass
class ContrastiveAugment:
    """The ACL/SimCLR view: resized crop, flip, colour jitter (p 0.8), grayscale (p 0.2).

    `strength` in [0, 1] scales it as DynACL does: the crop's minimum scale rises towards 1 and jitter and
    grayscale fade, so strength 0 leaves only flips.
    """

    size: int
    strength: float = 1.0
    min_scale: float = 0.08

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise PipelineError(f"ContrastiveAugment size = {self.size!r}: the views' side in pixels, at least 1")
        if not 0 <= self.strength <= 1:
            raise PipelineError(f"ContrastiveAugment strength = {self.strength!r}: must be in [0, 1]")
        if not 0 < self.min_scale <= 1:
            raise PipelineError(f"ContrastiveAugment min_scale = {self.min_scale!r}: a share of the image, in (0, 1]")

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.strength
        x = to_float(images)
        x = random_resized_crop(x, self.size, gen, scale=(1 - s * (1 - self.min_scale), 1.0))
        x = color_jitter(x, gen, 0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s, p=0.8 * s)
        return random_grayscale(x, gen, p=0.2 * s)
