"""Pre-activation encoders of the adversarial-training literature, with multi-branch batch norm.

- `wrn-DEPTH-WIDTH`: the WideResNet of TRADES, MART and RobustBench (WRN-34-10) and of RCS on ImageNet-32
  (WRN-28-10): (DEPTH - 4) / 6 blocks in each of three stages of 16*WIDTH, 32*WIDTH and 64*WIDTH channels.
- `preact-resnet18`: the PreAct-ResNet-18 of the adversarial-training baselines (Rice et al., "Overfitting in
  adversarially robust deep learning"), with its final batch norm before the pooling.
Both keep a 3x3 stride-1 stem whatever the image size (they are CIFAR and ImageNet-32 networks); the parameter
counts equal the reference implementations' (tests/test_archs.py states them).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.multibn import MultiBatchNorm
from pipeline.models.normalize import Normalize, default_stats

WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)$")


class PreActBlock(nn.Module):
    """(BN, ReLU, 3x3 conv) twice; when the block changes width or resolution, the 1x1 shortcut takes the
    pre-activated input, as in both references."""

    def __init__(self, cin: int, cout: int, stride: int, branches):
        super().__init__()
        self.bn1 = MultiBatchNorm(cin, branches)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = MultiBatchNorm(cout, branches)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActNet(nn.Module):
    """3x3 stem, stages of pre-activation blocks, a final BN and ReLU, global average pooling."""

    def __init__(self, stem_width: int, stages, branches, in_channels: int = 3, mean=None, std=None):
        super().__init__()
        mean, std = (mean, std) if mean is not None else default_stats(in_channels)
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        blocks, cin = [], stem_width
        for i, (width, n) in enumerate(stages):
            stage = []
            for j in range(n):
                stage.append(PreActBlock(cin, width, 2 if (j == 0 and i > 0) else 1, branches))
                cin = width
            blocks.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*blocks)
        self.bn = MultiBatchNorm(cin, branches)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin

    def forward(self, x):
        out = self.relu(self.bn(self.stages(self.stem(self.normalize(x)))))
        return torch.flatten(self.pool(out), 1)


def wide_resnet(depth: int, width: int, branches, in_channels: int = 3, stem=None, mean=None, std=None):
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise PipelineError(f"model.arch wrn-{depth}-{width}: a WideResNet has depth 6n + 4 (10, 16, 22, 28, 34, "
                            "40, ...) and width >= 1, e.g. wrn-34-10 or wrn-28-10")
    n = (depth - 4) // 6
    return PreActNet(16, [(16 * width, n), (32 * width, n), (64 * width, n)], branches, in_channels, mean, std)


def parse_wrn(name: str) -> tuple[int, int] | None:
    """(depth, width) of a `wrn-DEPTH-WIDTH` name, or None."""
    m = WRN_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def preact_resnet18(branches, in_channels: int = 3, stem=None, mean=None, std=None):
    return PreActNet(64, [(64, 2), (128, 2), (256, 2), (512, 2)], branches, in_channels, mean, std)
