"""A model of one's own, as a user would write it: plain torch, batch norm in nested containers, a classifier-free
feature output (tests/test_archs.py trains ACL on it through `--arch module:own_model:make_net`)."""

from collections import OrderedDict

from torch import nn


class Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.parts = nn.ModuleDict({"conv": nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                                    "norm": nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(cout, eps=1e-3, momentum=0.2)))})

    def forward(self, x):
        return self.parts["norm"](self.parts["conv"](x)).relu()


class OwnNet(nn.Module):
    """1-channel input (the digits set), two stages in a ModuleList, a BatchNorm1d in the tail; returns (B, 24)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([Stage(1, 8), Stage(8, 16)])
        self.tail = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 24), nn.BatchNorm1d(24), nn.ReLU())

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.tail(x)


def make_net():
    return OwnNet()


def make_feature_map():
    """A body that ends in a feature map (B, 16, 2, 2): the encoder pools it."""
    return nn.Sequential(Stage(1, 8), Stage(8, 16))


def not_a_module():
    return "a string"
