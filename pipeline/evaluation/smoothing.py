"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019; locuslab/smoothing): PREDICT and CERTIFY, and the
two views of a randomized classifier that attacks need.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) of a base classifier f. Noise is added
to images in [0, 1] without clipping, as the reference does.

- `smoothed_predict`: Cohen's PREDICT, n draws, the two most frequent classes, abstain (-1) unless the
  two-sided binomial test of their counts rejects a tie at level alpha.
- `certify_sample`: Cohen's CERTIFY, n0 draws choose the class, n fresh draws count it, the one-sided
  Clopper-Pearson lower bound pA gives the l2 radius sigma * Phi^-1(pA); abstain when pA < 0.5.
- `RandomizedClassifier`: f(x + noise), one fresh draw per call: what an attack without EOT sees (and what
  AutoAttack's `rand` version averages over itself).
- `EOTClassifier`: log of the softmax averaged over m draws, fresh noise per call: the EOT-PGD target
  (other-methods.md, RUSH: the loss on the averaged softmax, not the average of per-draw losses).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.kv import parse_kv


@dataclass(frozen=True)
class Smoothing:
    """How a smoothed classifier is run: noise sigma, n draws per prediction, the test level alpha, m EOT
    draws per attack step (0: as many as a prediction uses, n, as the reference wants), and at most `batch`
    noisy images per forward pass."""

    sigma: float
    n: int = 100
    alpha: float = 0.001
    eot: int = 0
    batch: int = 4096

    def __post_init__(self):
        if not self.sigma > 0:
            raise PipelineError(f"smoothing sigma={self.sigma}: must be > 0")
        if self.n < 1 or self.batch < 1 or self.eot < 0:
            raise PipelineError("smoothing n and batch must be at least 1, eot at least 0")
        if not 0 < self.alpha < 1:
            raise PipelineError(f"smoothing alpha={self.alpha}: must be in (0, 1)")

    @property
    def eot_draws(self) -> int:
        return self.eot or self.n

    def as_dict(self) -> dict:
        return {**asdict(self), "eot": self.eot_draws}

    @classmethod
    def parse(cls, text: str | dict) -> "Smoothing":
        """"sigma=0.25,n=100,alpha=0.001[,eot=M][,batch=B]"."""
        kinds = {"sigma": float, "n": int, "alpha": float, "eot": int, "batch": int}
        values = parse_kv(text, "--smoothing", kinds, "sigma=0.25,n=100,alpha=0.001")
        if "sigma" not in values:
            raise PipelineError(f"--smoothing {text!r}: sigma is required (e.g. sigma=0.25)")
        return cls(**values)


def add_noise(x: torch.Tensor, sigma: float, gen: torch.Generator | None) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


class RandomizedClassifier(nn.Module):
    """f(x + sigma * N(0, I)): a fresh draw at every call."""

    def __init__(self, base: nn.Module, sigma: float, gen: torch.Generator | None = None):
        super().__init__()
        self.base, self.sigma, self.gen = base, sigma, gen

    def forward(self, x):
        return self.base(add_noise(x, self.sigma, self.gen))


class EOTClassifier(nn.Module):
    """log(mean over m draws of softmax(f(x + noise))): log-probabilities of the randomized model's expected
    output, so cross-entropy on it (nll) is the EOT loss. m * len(x) noisy images go through f at once."""

    def __init__(self, base: nn.Module, sigma: float, draws: int, gen: torch.Generator | None = None):
        super().__init__()
        self.base, self.sigma, self.draws, self.gen = base, sigma, draws, gen

    def forward(self, x):
        noisy = add_noise(x.repeat(self.draws, *([1] * (x.dim() - 1))), self.sigma, self.gen)
        probs = torch.softmax(self.base(noisy).float(), dim=1).view(self.draws, len(x), -1).mean(0)
        return probs.clamp_min(1e-12).log()


@torch.no_grad()
def class_counts(base: nn.Module, x: torch.Tensor, sigma: float, draws: int, n_classes: int,
                 gen: torch.Generator | None = None, batch: int = 4096) -> torch.Tensor:
    """(len(x), n_classes) int64: how often f(x_i + noise) returns each class over `draws` draws, at most
    `batch` noisy images per forward pass."""
    counts = torch.zeros(len(x), n_classes, dtype=torch.int64, device=x.device)
    per_pass = max(1, batch // max(len(x), 1))
    done = 0
    while done < draws:
        k = min(per_pass, draws - done)
        noisy = add_noise(x.repeat(k, *([1] * (x.dim() - 1))), sigma, gen)
        pred = base(noisy).argmax(1).view(k, len(x))
        counts.scatter_add_(1, pred.t(), torch.ones_like(pred.t()))
        done += k
    return counts


def binomial_pvalue(k: int, n: int) -> float:
    """Two-sided binomial test of k successes in n against p = 1/2 (Cohen's `binom_test`)."""
    from scipy.stats import binomtest

    return float(binomtest(int(k), int(n), 0.5).pvalue) if n > 0 else 1.0


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k of n
    (= statsmodels' proportion_confint(k, n, alpha=2 * alpha, method="beta")[0], Cohen's choice)."""
    from scipy.stats import beta

    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


def smoothed_predict(base: nn.Module, x: torch.Tensor, s: Smoothing, n_classes: int,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """Cohen's PREDICT for each image of a batch: the class, or -1 where the test cannot separate the top two."""
    counts = class_counts(base, x, s.sigma, s.n, n_classes, gen, s.batch)
    top = counts.topk(min(2, n_classes), dim=1)
    out = top.indices[:, 0].clone()
    for i in range(len(x)):
        first = int(top.values[i, 0])
        second = int(top.values[i, 1]) if n_classes > 1 else 0
        if binomial_pvalue(first, first + second) > s.alpha:
            out[i] = -1
    return out


def certify_sample(base: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, n_classes: int,
                   gen: torch.Generator | None = None, batch: int = 4096) -> tuple[int, float, float]:
    """Cohen's CERTIFY for one image (C, H, W): (class or -1, l2 radius, pA)."""
    selection = class_counts(base, x[None], sigma, n0, n_classes, gen, batch)[0]
    c = int(selection.argmax())
    estimate = class_counts(base, x[None], sigma, n, n_classes, gen, batch)[0]
    p_a = lower_confidence_bound(int(estimate[c]), n, alpha)
    if p_a < 0.5:
        return -1, 0.0, p_a
    from scipy.stats import norm

    return c, float(sigma * norm.ppf(p_a)), p_a


def linf_radius(l2_radius: float, dims: int) -> float:
    """The l_inf radius an l2 certificate covers: any l_inf perturbation of size e has l2 norm <= e sqrt(d)."""
    return l2_radius / math.sqrt(dims)
