"""The attack budget rule and the one l_inf PGD of training, selection and evaluation.

PGD is torchattacks-shaped (hyperparameters in the constructor, `attack(inputs, target)` returns adversarial
inputs) but knows nothing of methods: it takes a `forward` (inputs -> model outputs, whatever they are), a
`loss(outputs, target)`, the module whose mode it sets while attacking (eval, as ACL and evaluation do, or
train, as AdvCL and ASCL do), a random start (uniform in the ball, or a small Gaussian as TRADES), several
inputs perturbed jointly (one loss over all of them), and `eot` samples of the loss per step for randomized
models (expectation over transformation).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.errors import PipelineError

# Default number of PGD steps by use: the paper settings (acl-and-eval.md, rcs.md).
DEFAULT_STEPS = {"train": 5, "eval": 20, "finetune": 10, "select": 1, "validation": 3}


@dataclass(frozen=True)
class Budget:
    """An l_inf attack budget: eps and step in pixel units ([0, 1] images), and the number of steps."""

    eps: float
    step: float
    steps: int

    def as_dict(self) -> dict:
        return {"eps": self.eps, "step": self.step, "steps": self.steps}


def budget(channels: int, eps: float | None = None, step: float | None = None, steps: int | None = None,
           use: str = "train") -> Budget:
    """The one rule: eps defaults to 8/255 for colour and 0.3 for grey images; step to eps / 4 (2/255 at
    8/255); steps to the paper's count for the use (train 5, eval 20, finetune 10, select 1). Zero or None
    means "default"."""
    for name, value in (("eps", eps), ("step", step), ("steps", steps)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value >= 0):
            raise PipelineError(f"attack {name} = {value!r}: must be a number >= 0 (0 or None: the default)")
    if steps is not None and int(steps) != steps:
        raise PipelineError(f"attack steps = {steps!r}: must be a whole number")
    if channels not in (1, 3):
        raise PipelineError(f"channels = {channels!r}: images have 1 (grey) or 3 (colour) channels")
    eps = eps or (8 / 255 if channels == 3 else 0.3)
    return Budget(float(eps), float(step or eps / 4), int(steps if steps is not None else DEFAULT_STEPS[use]))


@contextmanager
def _mode(module: nn.Module | None, train: bool):
    if module is None:
        yield
        return
    was = module.training
    module.train(train)
    try:
        yield
    finally:
        module.train(was)


class PGD:
    """l_inf projected gradient ascent on `loss(forward(*inputs), target)`.

    start: "uniform" (U(-eps, eps), torchattacks' and ACL's), "normal" (start_std * N(0, 1), TRADES'), "none".
    """

    def __init__(self, forward: Callable, loss: Callable, eps: float, step: float, steps: int,
                 start: str = "uniform", start_std: float = 0.001, module: nn.Module | None = None,
                 train_mode: bool = False, eot: int = 1, generator: torch.Generator | None = None,
                 autocast_dtype: torch.dtype | None = None):
        if eps < 0 or step < 0 or steps < 0 or eot < 1:
            raise ValueError("eps, step and steps must be non-negative and eot at least 1")
        if start not in ("uniform", "normal", "none"):
            raise ValueError(f"start {start!r}: uniform, normal or none")
        self.forward_fn, self.loss = forward, loss
        self.eps, self.step, self.steps, self.start, self.start_std = eps, step, steps, start, start_std
        self.module, self.train_mode, self.eot = module, train_mode, eot
        self.generator, self.autocast_dtype = generator, autocast_dtype

    def settings(self) -> dict:
        return {"eps": self.eps, "step": self.step, "steps": self.steps, "start": self.start,
                "mode": "train" if self.train_mode else "eval", "eot": self.eot}

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == "uniform" and self.eps > 0:
            d = (torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        elif self.start == "normal":
            d = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) * self.start_std
            d = d.clamp(-self.eps, self.eps)
        else:
            d = torch.zeros_like(x)
        return (x + d).clamp(0, 1) - x

    def _loss(self, inputs: Sequence[torch.Tensor], target) -> torch.Tensor:
        with torch.autocast(inputs[0].device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.loss(self.forward_fn(*inputs), target)

    def __call__(self, inputs, target=None):
        return self.perturb(inputs, target)

    def perturb(self, inputs: torch.Tensor | Sequence[torch.Tensor], target=None):
        """Adversarial versions of `inputs` (one tensor, or a list perturbed jointly: a list comes back)."""
        single = isinstance(inputs, torch.Tensor)
        xs = [inputs.detach()] if single else [x.detach() for x in inputs]
        with _mode(self.module, self.train_mode), torch.enable_grad():
            deltas = [self._start(x) for x in xs]
            for _ in range(self.steps):
                for d in deltas:
                    d.requires_grad_(True)
                grads = [torch.zeros_like(d) for d in deltas]
                for _ in range(self.eot):
                    loss = self._loss([x + d for x, d in zip(xs, deltas)], target)
                    grads = [g + gi for g, gi in zip(grads, torch.autograd.grad(loss, deltas))]
                deltas = [((d.detach() + self.step * g.sign()).clamp(-self.eps, self.eps) + x).clamp(0, 1) - x
                          for x, d, g in zip(xs, deltas, grads)]
        out = [(x + d).detach() for x, d in zip(xs, deltas)]
        return out[0] if single else out
