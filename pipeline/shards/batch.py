"""`Batch`: what every loader yields, and the one place that says what a batch holds."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) uint8, memory laid out channels_last
    labels: torch.Tensor  # (B,) int64
    ids: torch.Tensor  # (B,) int64: global sample ids
    weights: torch.Tensor | None = None  # (B,) float32: the manifest's per-sample weights, when it has them

    def pin(self) -> "Batch":
        """In page-locked memory: the copy to a CUDA device can then overlap with compute."""
        return Batch(*(None if x is None else x.pin_memory() for x in self))

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(*(None if x is None else x.to(device, non_blocking=non_blocking) for x in self))
