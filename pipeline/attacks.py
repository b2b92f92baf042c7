"""Projected gradient descent (l_inf), the one attack implementation of training, selection and evaluation.

torchattacks-style: hyperparameters in the constructor, `attack(images, target)` returns adversarial images.
The loss is pluggable; `target` is whatever the loss compares against (labels, natural logits, natural
representations, or nothing for the contrastive loss). The model is attacked in eval mode through its
adversarial batch-norm branch; its mode and branch are restored afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import nt_xent, representational_divergence, trades_kl
from pipeline.models.multibn import multibn_layers, use_branch

def default_budget(channels: int) -> tuple[float, float]:
    """The usual l_inf budget and step: 8/255 and 2/255 for colour images, 0.3 and 0.075 for grey ones."""
    return (8 / 255, 2 / 255) if channels == 3 else (0.3, 0.075)


LOSSES: dict[str, Callable] = {
    "ce": lambda out, target: F.cross_entropy(out.float(), target),
    "trades": lambda out, target: trades_kl(out, target),
    "ntxent": lambda out, target: nt_xent(out),
    "rd": lambda out, target: representational_divergence(out, target),
}


class PGD:
    def __init__(self, model: nn.Module, loss: str | Callable = "ce", eps: float = 8 / 255, step: float = 2 / 255,
                 steps: int = 10, random_start: bool = True, branch: str | None = "adv",
                 generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None):
        if eps < 0 or step < 0 or steps < 0:
            raise ValueError("eps, step and steps must be non-negative")
        self.model, self.eps, self.step, self.steps = model, eps, step, steps
        self.loss = LOSSES[loss] if isinstance(loss, str) else loss
        self.random_start, self.branch, self.generator = random_start, branch, generator
        self.autocast_dtype = autocast_dtype

    def _forward(self, x):
        if self.autocast_dtype is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self.model(x)

    def __call__(self, images: torch.Tensor, target=None) -> torch.Tensor:
        return self.forward(images, target)

    def forward(self, images: torch.Tensor, target=None) -> torch.Tensor:
        images = images.detach()
        was_training = self.model.training
        has_branches = bool(multibn_layers(self.model)) and self.branch is not None
        self.model.eval()
        try:
            with use_branch(self.model, self.branch) if has_branches else _nullcontext():
                delta = torch.zeros_like(images)
                if self.random_start and self.eps > 0:
                    delta = (torch.rand(images.shape, generator=self.generator, device=images.device,
                                        dtype=images.dtype) * 2 - 1) * self.eps
                    delta = (images + delta).clamp(0, 1) - images
                for _ in range(self.steps):
                    delta.requires_grad_(True)
                    loss = self.loss(self._forward(images + delta), target)
                    (grad,) = torch.autograd.grad(loss, delta)
                    delta = (delta.detach() + self.step * grad.sign()).clamp(-self.eps, self.eps)
                    delta = (images + delta).clamp(0, 1) - images
        finally:
            self.model.train(was_training)
        return (images + delta).detach()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
