"""Heads on encoder features, with multi-branch batch norm where they normalise."""

from __future__ import annotations

from torch import nn

from pipeline.models.multibn import MultiBatchNorm
from pipeline.registry import Registry


class MLP3Head(nn.Module):
    """The ACL head: (Linear, BN, ReLU) twice, then Linear, BN; every BN multi-branch."""

    def __init__(self, in_dim: int, width: int, out_dim: int, branches):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, width), MultiBatchNorm(width, branches, dims=1), nn.ReLU(inplace=True),
            nn.Linear(width, width), MultiBatchNorm(width, branches, dims=1), nn.ReLU(inplace=True),
            nn.Linear(width, out_dim), MultiBatchNorm(out_dim, branches, dims=1),
        )

    def forward(self, x):
        return self.layers(x)


class MLP2Head(nn.Module):
    """SimCLR's head: Linear, BN, ReLU, Linear."""

    def __init__(self, in_dim: int, width: int, out_dim: int, branches):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, width), MultiBatchNorm(width, branches, dims=1), nn.ReLU(inplace=True),
            nn.Linear(width, out_dim),
        )

    def forward(self, x):
        return self.layers(x)


class LinearHead(nn.Module):
    """One linear layer (classifiers, pseudo-label heads); `width` is unused."""

    def __init__(self, in_dim: int, width: int, out_dim: int, branches):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, x):
        return self.layers(x)


HEADS: Registry = Registry("head kind")
for _name, _cls in {"mlp3": MLP3Head, "mlp2": MLP2Head, "linear": LinearHead}.items():
    HEADS.add(_name, _cls)
