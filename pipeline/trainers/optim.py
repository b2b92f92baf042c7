"""Optimisers and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pipeline.errors import PipelineError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as SimCLR and ACL train with.

    Groups flagged `lars=False` (biases, batch-norm parameters) take plain momentum SGD without weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                p.sub_(buf)
        return loss


def build_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1]
    if name == "lars":
        return LARS([{"params": decay}, {"params": plain, "lars": False, "weight_decay": 0.0}], lr=lr,
                    momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD([{"params": decay}, {"params": plain, "weight_decay": 0.0}], lr=lr,
                               momentum=momentum, weight_decay=weight_decay)
    raise PipelineError(f"optim.optimizer {name!r}: choose lars or sgd")


def lr_at(progress: float, base_lr: float, epochs: int, warmup_epochs: int, final_fraction: float = 1e-6) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine decay to base_lr * final_fraction at `epochs`.

    `progress` is in epochs and fractional (epoch + step / steps_per_epoch), so the schedule does not depend on
    how many steps an epoch has: subsets of changing size keep the same curve.
    """
    if warmup_epochs > 0 and progress < warmup_epochs:
        return base_lr * (progress + 1e-3) / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-9)
    t = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
