"""Optimisers and the learning-rate schedule."""

from __future__ import annotations

import bisect
import math

import torch

from pipeline.errors import PipelineError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017) as the ACL, DynACL and RCS code has it:

        local_lr = eta ||w|| / (||g|| + wd ||w||)       (1 where ||w|| or ||g|| < 1e-15)
        buf      = momentum buf + lr local_lr (g + wd w);   w -= buf

    for every parameter. Groups flagged `lars=False` (see `build_optimizer(exclude_1d=True)`) take plain
    momentum SGD without weight decay, as SimCLR-style LARS variants treat biases and batch norm.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    local = group["eta"] * w_norm / (g_norm + wd * w_norm)
                    local = torch.where((w_norm < 1e-15) | (g_norm < 1e-15), torch.ones_like(local), local)
                    update = (g + wd * p) * (local * group["lr"])
                else:
                    update = g * group["lr"]
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(update)
                p.sub_(buf)
        return loss


def build_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    eta: float = 0.001, exclude_1d: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lars":
        if not exclude_1d:
            return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
        return LARS([{"params": [p for p in params if p.ndim > 1]},
                     {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}],
                    lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
    if name == "sgd":
        return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1]},
                                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                               lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise PipelineError(f"optim.optimizer {name!r}: choose lars or sgd")


def lr_at(progress: float, base_lr: float, epochs: int, warmup_epochs: int, schedule: str = "cosine",
          milestones=(), gamma: float = 0.1, final_fraction: float = 1e-6) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine decay to base_lr * final_fraction at `epochs`, or
    steps: base_lr * gamma^(milestones passed).

    `progress` is in epochs and fractional (epoch + step / steps_per_epoch), so the schedule does not depend on
    how many steps an epoch has: subsets of changing size keep the same curve.
    """
    if warmup_epochs > 0 and progress < warmup_epochs:
        return base_lr * (progress + 1e-3) / warmup_epochs
    if schedule == "step":
        return base_lr * gamma ** bisect.bisect_right(sorted(milestones), math.floor(progress))
    if schedule != "cosine":
        raise PipelineError(f"optim.schedule {schedule!r}: choose cosine or step")
    span = max(epochs - warmup_epochs, 1e-9)
    t = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
