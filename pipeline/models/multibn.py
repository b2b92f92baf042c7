"""Batch norm with one set of statistics and affine parameters per named branch (names come from the model spec).

Adversarial contrastive learning normalises natural and adversarial inputs separately. The active branch is
module state rather than a forward argument, so that ordinary backbones (nn.Sequential, residual blocks) need
no plumbing: `model(x, branch)` or `with use_branch(model, branch):` selects it for every layer.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn

SHARED = "shared"  # the one branch of a layer every branch shares (AdvCL's projection head)


class MultiBatchNorm(nn.Module):
    def __init__(self, num_features: int, branches, dims: int = 2, template: nn.Module | None = None):
        """`template`: a batch-norm layer of a model built elsewhere; each branch starts as a copy of it (its
        eps, momentum, affine parameters and running statistics)."""
        super().__init__()
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.bns = nn.ModuleDict({b: copy.deepcopy(template) if template is not None else bn(num_features)
                                  for b in branches})
        self.branch = branches[0]
        self.shared = list(branches) == [SHARED]  # follows no branch switch

    def forward(self, x):
        return self.bns[self.branch](x)

    def extra_repr(self) -> str:
        return f"branches={list(self.bns)}, active={self.branch!r}"


def convert_batchnorm(module: nn.Module, branches) -> nn.Module:
    """`module` with every batch-norm layer (1d, 2d, 3d, SyncBatchNorm), however deeply nested, replaced by a
    MultiBatchNorm of `branches` that starts from it: module replacement, as SyncBatchNorm.convert_sync_batchnorm
    does it. Returns the module (a new one when `module` is itself a batch-norm layer)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return MultiBatchNorm(module.num_features, list(branches), template=module)
    for name, child in module.named_children():
        if not isinstance(child, MultiBatchNorm):
            new = convert_batchnorm(child, branches)
            if new is not child:
                module.add_module(name, new)
    return module


def multibn_layers(model: nn.Module) -> list[MultiBatchNorm]:
    return [m for m in model.modules() if isinstance(m, MultiBatchNorm)]


def set_branch(model: nn.Module, branch: str) -> None:
    for m in multibn_layers(model):
        if m.shared:
            continue
        if branch not in m.bns:
            raise KeyError(f"batch-norm branch {branch!r} not in {list(m.bns)}")
        m.branch = branch


@contextmanager
def use_branch(model: nn.Module, branch: str | None):
    if branch is None:
        yield model
        return
    layers = multibn_layers(model)
    before = [m.branch for m in layers]
    set_branch(model, branch)
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.branch = b
