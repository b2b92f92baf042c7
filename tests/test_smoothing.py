"""Randomized smoothing: PREDICT and CERTIFY against hand computations and IBM ART, EOT against single-draw PGD on
a model built to fool single draws, resumable certification, smoothed evaluation end to end."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.attacks import Budget
from pipeline.errors import PipelineError
from pipeline.evaluation.measures import MEASURES
from pipeline.evaluation.smoothing import (Smoothing, certify_sample, class_counts, lower_confidence_bound,
                                           smoothed_predict)


class Constant(nn.Module):
    """Always class `c` of `k`."""

    def __init__(self, c=2, k=4):
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        out = torch.zeros(len(x), self.k)
        out[:, self.c] = 1.0
        return out


class CoinFlip(nn.Module):
    """Class 0 when the first pixel is above 0.5, else class 1: at x = 0.5 every noise draw is a fair coin."""

    def forward(self, x):
        s = x.flatten(1)[:, :1] - 0.5
        return torch.cat([s, -s], dim=1)


def test_constant_classifier_certifies_with_the_hand_computed_radius():
    sigma, n, alpha = 0.5, 1000, 0.001
    x = torch.rand(1, 3, 4, 4)
    pred, radius, p_a = certify_sample(Constant(2), x[0], sigma, 100, n, alpha, 4, torch.Generator().manual_seed(0))
    # all n draws vote for class 2: the one-sided Clopper-Pearson bound of n successes in n is alpha^(1/n)
    hand_p = alpha ** (1 / n)
    assert pred == 2
    assert p_a == pytest.approx(hand_p, rel=1e-9)
    assert radius == pytest.approx(sigma * NormalDist().inv_cdf(hand_p), rel=1e-7)
    assert lower_confidence_bound(0, n, alpha) == 0.0


def test_lower_bound_is_the_clopper_pearson_bound_statsmodels_gives():
    proportion = pytest.importorskip("statsmodels.stats.proportion", reason="statsmodels (dev extra) not installed")
    for k, n in [(1, 10), (480, 500), (73, 100), (99_000, 100_000)]:
        ref = proportion.proportion_confint(k, n, alpha=2 * 0.001, method="beta")[0]  # Cohen's call
        assert lower_confidence_bound(k, n, 0.001) == pytest.approx(ref, rel=1e-10)


def test_tiny_sigma_gives_the_base_classifier():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    x = torch.rand(40, 3, 4, 4)
    want = base(x).argmax(1)
    gen = torch.Generator().manual_seed(1)
    got = smoothed_predict(base, x, Smoothing(sigma=1e-6, n=50, alpha=0.001), 5, gen)
    assert torch.equal(got, want)
    for i in range(5):
        pred, radius, _ = certify_sample(base, x[i], 1e-6, 20, 200, 0.001, 5, gen)
        assert pred == int(want[i]) and 0 < radius < 1e-5


def test_two_tied_classes_abstain():
    x = torch.full((6, 1, 2, 2), 0.5)
    gen = torch.Generator().manual_seed(0)
    counts = class_counts(CoinFlip(), x, 0.25, 2000, 2, gen)
    assert (counts.sum(1) == 2000).all() and ((counts[:, 0] - 1000).abs() < 150).all()
    assert (smoothed_predict(CoinFlip(), x, Smoothing(sigma=0.25, n=1000, alpha=0.001), 2, gen) == -1).all()
    pred, radius, p_a = certify_sample(CoinFlip(), x[0], 0.25, 100, 1000, 0.001, 2, gen)
    assert pred == -1 and radius == 0.0 and p_a < 0.5
    # the same coin far from the boundary is no tie
    assert (smoothed_predict(CoinFlip(), torch.full((3, 1, 2, 2), 0.9), Smoothing(sigma=0.25, n=1000), 2, gen) == 0).all()


class Wiggly(nn.Module):
    """A smooth margin w.(z - 0.5) plus A sin(k z_i) per pixel: under noise the wiggle averages out, but one
    draw's gradient is dominated by A k cos(k z_i), a random sign per pixel: single-draw PGD wanders, PGD on
    the softmax averaged over many draws follows w."""

    def __init__(self, amplitude=0.4, k=50.0):
        super().__init__()
        self.amplitude, self.k = amplitude, k

    def forward(self, x):
        z = x.flatten(1)
        margin = (z - 0.5).sum(1) + self.amplitude * torch.sin(self.k * z).sum(1)
        return torch.stack([torch.zeros_like(margin), margin], dim=1)


def test_eot_pgd_is_no_weaker_than_single_draw_pgd_on_a_model_built_to_fool_it():
    x = torch.full((60, 1, 4, 4), 0.6)  # clean margin 16 x 0.1 = 1.6: class 1
    y = torch.ones(60, dtype=torch.int64)
    b = Budget(eps=0.2, step=0.05, steps=20)  # a full move lowers the margin by 3.2: enough to flip it
    s = Smoothing(sigma=0.1, n=100, alpha=0.001, eot=64)
    model = Wiggly()
    acc = {name: MEASURES[name](model, b, 2, 0, "cpu", s).correct(x, y) / len(y)
           for name in ("clean", "pgd20", "eot-pgd20")}
    assert acc["clean"] == 1.0
    assert acc["eot-pgd20"] <= acc["pgd20"]
    assert acc["pgd20"] >= 0.7 and acc["eot-pgd20"] <= 0.2, acc  # fails if the m draws were not averaged


def test_eot_measure_needs_smoothing():
    with pytest.raises(PipelineError, match="--smoothing"):
        MEASURES["eot-pgd20"](Wiggly(), Budget(0.1, 0.025, 20), 2, 0, "cpu", None)


def test_smoothing_spec_parses_and_rejects_bad_values():
    s = Smoothing.parse("sigma=0.25,n=100,alpha=0.001")
    assert (s.sigma, s.n, s.alpha, s.eot_draws) == (0.25, 100, 0.001, 100)
    assert Smoothing.parse("sigma=0.5, eot=8").eot_draws == 8
    for bad in ("n=100", "sigma=abc", "sigma=0.25,m=3", "sigma=0", "sigma=0.2,alpha=2"):
        with pytest.raises(PipelineError):
            Smoothing.parse(bad)


def test_certified_radii_match_ibm_art():
    pytest.importorskip("statsmodels", reason="statsmodels (dev extra, ART's certify needs it) not installed")
    rs = pytest.importorskip("art.estimators.certification.randomized_smoothing",
                             reason="adversarial-robustness-toolbox (dev extra) not installed")
    torch.manual_seed(3)
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        base[1].weight.mul_(6)
    sigma, n0, n, alpha = 0.25, 100, 4000, 0.001
    x = torch.rand(12, 1, 4, 4)
    art = rs.PyTorchRandomizedSmoothing(model=base, loss=nn.CrossEntropyLoss(), input_shape=(1, 4, 4), nb_classes=3,
                                        sample_size=n0, scale=sigma, alpha=alpha, device_type="cpu")
    np.random.seed(0)
    art_pred, art_radius = art.certify(x.numpy(), n=n, batch_size=1000)
    compared = 0
    for i in range(len(x)):
        pred, radius, p_a = certify_sample(base, x[i], sigma, n0, n, alpha, 3, torch.Generator().manual_seed(i))
        if abs(p_a - 0.5) < 0.05:  # near the abstention threshold either may abstain: Monte Carlo, not a bug
            continue
        compared += 1
        assert pred == art_pred[i]
        # Monte Carlo error of two independent estimates: 4 standard deviations of the count, through the radius
        p = min(max(p_a, 0.5), 0.999)
        sd_p = math.sqrt(p * (1 - p) / n)
        slack = sigma * (NormalDist().inv_cdf(min(p + 4 * sd_p, 0.9999)) - NormalDist().inv_cdf(p)) + 1e-6
        assert abs(radius - art_radius[i]) <= 2 * slack, (i, radius, art_radius[i])
    assert compared >= 8
