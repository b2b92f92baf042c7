"""Encoders with multi-branch batch norm: the CIFAR ResNet-18, ResNet-50, a small CNN for CPU work, and the
pre-activation WideResNets and PreAct-ResNet-18 of pipeline.models.preact. Each normalises its [0, 1] inputs
itself (pipeline.models.normalize).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.multibn import MultiBatchNorm
from pipeline.models.normalize import Normalize, default_stats
from pipeline.models.preact import parse_wrn, preact_resnet18, wide_resnet
from pipeline.registry import Registry


def shortcut(cin: int, cout: int, stride: int, branches) -> nn.Module:
    """Identity, or a strided 1x1 projection when the block changes resolution or width."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), MultiBatchNorm(cout, branches))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride, branches):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = MultiBatchNorm(cout, branches)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = MultiBatchNorm(cout, branches)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(cin, cout, stride, branches)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, branches):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = MultiBatchNorm(width, branches)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = MultiBatchNorm(width, branches)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = MultiBatchNorm(cout, branches)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(cin, cout, stride, branches)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, layers, branches, in_channels=3, stem="cifar", mean=None, std=None):
        super().__init__()
        mean, std = (mean, std) if mean is not None else default_stats(in_channels)
        self.normalize = Normalize(mean, std)
        if stem == "cifar":  # 3x3, stride 1, no max-pool: keeps 32x32 inputs large enough
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), MultiBatchNorm(64, branches),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), MultiBatchNorm(64, branches),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, branches))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin

    def forward(self, x):
        return torch.flatten(self.pool(self.stages(self.stem(self.normalize(x)))), 1)


class SmallCNN(nn.Module):
    """Three convolutions: about 30x cheaper than ResNet-18 on 32x32 inputs; for CPU demos and tests."""

    def __init__(self, branches, in_channels=3, mean=None, std=None, width=32, stem=None):
        super().__init__()
        mean, std = (mean, std) if mean is not None else default_stats(in_channels)
        self.normalize = Normalize(mean, std)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), MultiBatchNorm(w, branches), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), MultiBatchNorm(2 * w, branches), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False), MultiBatchNorm(4 * w, branches), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * w

    def forward(self, x):
        return torch.flatten(self.pool(self.body(self.normalize(x))), 1)


def resnet18(branches, **kw):
    return ResNet(BasicBlock, (2, 2, 2, 2), branches, **kw)


def resnet50(branches, **kw):
    return ResNet(Bottleneck, (3, 4, 6, 3), branches, **kw)


def smallcnn_wide(branches, **kw):
    """The small CNN at twice the width (64-128-256 channels, 256 features): about 3x its cost, for CPU
    experiments where the encoder has to learn (issue 24)."""
    return SmallCNN(branches, width=64, **kw)


BACKBONES: Registry = Registry("arch", flag="model.arch")
for _name, _make in {"smallcnn": SmallCNN, "smallcnn-wide": smallcnn_wide, "resnet18": resnet18,
                     "resnet50": resnet50, "preact-resnet18": preact_resnet18}.items():
    BACKBONES.add(_name, _make)
for _depth, _width in ((34, 10), (28, 10)):  # the field's two; any other wrn-DEPTH-WIDTH is built on request
    BACKBONES.add(f"wrn-{_depth}-{_width}", lambda branches, _d=_depth, _w=_width, **kw: wide_resnet(_d, _w, branches, **kw))


def builtin_encoder(arch: str):
    """The factory of a registered arch or of any `wrn-DEPTH-WIDTH`; None for other names."""
    if arch in BACKBONES:
        return BACKBONES[arch]
    wrn = parse_wrn(arch)
    if wrn is None:
        return None
    return lambda branches, **kw: wide_resnet(*wrn, branches, **kw)
