"""Models: encoders and projection heads with multi-branch batch norm, built from a spec by `create_model`.

A spec is a plain dict (it travels inside checkpoints, so evaluation can rebuild the exact model):
    {"arch": "resnet18", "in_channels": 3, "stem": "cifar", "head": "mlp3", "head_width": 512,
     "proj_dim": 512, "branches": ["nat", "adv"]}
"""

from __future__ import annotations

from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.backbones import BACKBONES
from pipeline.models.heads import HEADS
from pipeline.models.multibn import MultiBatchNorm, set_branch, use_branch


class ContrastiveModel(nn.Module):
    """encoder -> features; head -> projections. `forward(x, branch)` returns projections."""

    def __init__(self, encoder: nn.Module, head: nn.Module, spec: dict):
        super().__init__()
        self.encoder, self.head, self.spec = encoder, head, dict(spec)

    def features(self, x, branch: str | None = None):
        if branch is not None:
            set_branch(self, branch)
        return self.encoder(x)

    def forward(self, x, branch: str | None = None):
        return self.head(self.features(x, branch))


def model_spec(arch: str, in_channels: int, image_size: int, head: str = "mlp3", head_width: int = 512,
               proj_dim: int = 512, branches=("nat", "adv")) -> dict:
    if arch not in BACKBONES:
        raise PipelineError(f"model arch {arch!r}: choose one of {', '.join(BACKBONES)}")
    if head not in HEADS:
        raise PipelineError(f"model head {head!r}: choose one of {', '.join(HEADS)}")
    return {"arch": arch, "in_channels": in_channels, "stem": "cifar" if image_size <= 64 else "imagenet",
            "head": head, "head_width": head_width, "proj_dim": proj_dim, "branches": list(branches)}


def create_model(spec: dict) -> ContrastiveModel:
    branches = tuple(spec["branches"])
    encoder = BACKBONES[spec["arch"]](in_channels=spec["in_channels"], stem=spec["stem"], branches=branches)
    head = HEADS[spec["head"]](encoder.feature_dim, spec["head_width"], spec["proj_dim"], branches=branches)
    return ContrastiveModel(encoder, head, spec)


__all__ = ["ContrastiveModel", "MultiBatchNorm", "create_model", "model_spec", "set_branch", "use_branch"]
