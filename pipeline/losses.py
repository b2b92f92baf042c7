"""Losses as plain functions, shared by training, attacks, selection and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z: torch.Tensor, temperature: float = 0.5, reduction: str = "mean") -> torch.Tensor:
    """SimCLR's NT-Xent over 2B projections where rows i and i + B are two views of one image.

    Each row's positive is its partner; the other 2B - 2 rows are its negatives. `reduction`: "mean" over all
    2B rows, or "sample": one value per image, the mean of its two rows' terms (their mean is the "mean").
    """
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"nt_xent needs an even number of rows (two views per image), got {n}")
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    half = n // 2
    targets = torch.cat([torch.arange(half, n), torch.arange(0, half)]).to(z.device)
    if reduction == "mean":
        return F.cross_entropy(sim, targets)
    rows = F.cross_entropy(sim, targets, reduction="none")
    return (rows[:half] + rows[half:]) / 2


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample values with per-sample weights (sum w v / sum w): a weight of 2 counts a sample
    twice, 0 leaves it out, as if the batch held it twice or not at all."""
    if weights is None or values.ndim == 0:
        return values.mean()
    w = weights.to(values.device, values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1e-12)


def trades_kl(logits_adv: torch.Tensor, logits_nat: torch.Tensor) -> torch.Tensor:
    """KL(p_nat || p_adv), batch mean: the robustness term of TRADES."""
    return F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_nat.float(), 1), reduction="batchmean")


def representational_divergence(z_adv: torch.Tensor, z_nat: torch.Tensor, kind: str = "minmax_kl",
                                reduction: str = "mean") -> torch.Tensor:
    """RCS's distance between the representations of an image and of its perturbation.

    `minmax_kl` (the CIFAR/STL path of the RCS code): each row is min-max scaled to [0, 1], then
    KL(adv || nat) elementwise as torch's KLDivLoss(log(nat + 1e-8), adv + 1e-8). `kl`: softmax KL, as on
    ImageNet. `reduction="none"` gives one value per sample.
    """
    z_adv, z_nat = z_adv.float(), z_nat.float()
    if kind == "minmax_kl":
        def scale(z):
            lo, hi = z.min(1, keepdim=True).values, z.max(1, keepdim=True).values
            return (z - lo) / (hi - lo + 1e-12)

        p_nat, p_adv = scale(z_nat) + 1e-8, scale(z_adv) + 1e-8
        per_elem = p_adv * (p_adv.log() - p_nat.log())
        per_sample = per_elem.mean(1)
    elif kind == "kl":
        per_sample = F.kl_div(F.log_softmax(z_nat, 1), F.log_softmax(z_adv, 1), reduction="none", log_target=True).sum(1)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return per_sample if reduction == "none" else per_sample.mean()
