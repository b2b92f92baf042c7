"""Losses as plain functions, shared by training, attacks, selection and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _view_targets(n: int, views: int, device) -> torch.Tensor:
    """(n, n) mask of positives: rows v * B + i (v < views) are views of image i; a row is not its own."""
    b = n // views
    img = torch.arange(n, device=device) % b
    pos = img[:, None] == img[None, :]
    return pos & ~torch.eye(n, dtype=torch.bool, device=device)


def multiview_contrastive(z: torch.Tensor, views: int = 2, temperature: float = 0.5, scale: float = 1.0,
                          reduction: str = "mean", detach_others: bool = False) -> torch.Tensor:
    """The contrastive loss over `views` views per image without labels (SupCon's form; NT-Xent when views=2).

    Rows v * B + i are view v of image i. Anchor row a: -scale * mean over its positives p (the other views of
    its image) of log(exp(s_ap) / sum_{k != a} exp(s_ak)), s = cosine / temperature. `scale` is AdvCL's
    temperature / base_temperature. `reduction`: "mean" over rows, "rows" (one per row), "sample" (the mean of
    an image's rows: their mean is the "mean"). `detach_others`: every row against the others held fixed,
    so that d(row a's loss)/d z_a is that row's own gradient (the per-sample gradient selection needs).
    """
    if z.ndim != 2:
        raise ValueError(f"contrastive loss: z must be 2-D (rows of projections), got shape {tuple(z.shape)}")
    if reduction not in ("mean", "rows", "sample"):
        raise ValueError(f"contrastive loss: reduction {reduction!r}: mean, rows or sample")
    n = z.shape[0]
    if n % views:
        raise ValueError(f"contrastive loss: {n} rows is not a multiple of {views} views")
    zn = F.normalize(z.float(), dim=1)
    sim = zn @ (zn.detach() if detach_others else zn).t() / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(1)
    pos = _view_targets(n, views, z.device)
    rows = -scale * log_prob.masked_fill(~pos, 0).sum(1) / (views - 1)
    if reduction == "rows":
        return rows
    if reduction == "sample":
        return rows.view(views, -1).mean(0)
    return rows.mean()


def nt_xent(z: torch.Tensor, temperature: float = 0.5, reduction: str = "mean") -> torch.Tensor:
    """SimCLR's NT-Xent over 2B projections where rows i and i + B are two views of one image.

    Each row's positive is its partner; the other 2B - 2 rows are its negatives. `reduction`: "mean" over all
    2B rows, or "sample": one value per image, the mean of its two rows' terms (their mean is the "mean").
    """
    if z.shape[0] % 2:
        raise ValueError(f"nt_xent needs an even number of rows (two views per image), got {z.shape[0]}")
    return multiview_contrastive(z, 2, temperature, reduction=reduction)


def row_gradients(z: torch.Tensor, row_losses) -> torch.Tensor:
    """d(row r's loss)/d z_r for every row, from `row_losses(z)` computed with the other rows held fixed."""
    z = z.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(row_losses(z).sum(), z)
    return grad


def kl_per_sample(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax p || softmax q) per sample, summed over classes."""
    lp, lq = F.log_softmax(logits_p.float(), 1), F.log_softmax(logits_q.float(), 1)
    return (lp.exp() * (lp - lq)).sum(1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample values with per-sample weights (sum w v / sum w): a weight of 2 counts a sample
    twice, 0 leaves it out, as if the batch held it twice or not at all."""
    if weights is None or values.ndim == 0:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"weighted_mean: {tuple(weights.shape)} weights for {tuple(values.shape)} values; give one "
                         "weight per sample (a batch's .weights)")
    w = weights.to(values.device, values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1e-12)


def rescaled_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum w v / n: per-sample values scaled by their weights and averaged over the batch (InfoBatch's
    `loss.mul(weights).mean()`), so a kept sample of weight 1/(1 - r) stands in for the dropped ones in
    expectation. Not `weighted_mean`, whose division by sum w would undo the rescaling."""
    return (values * weights.to(values.device, values.dtype)).mean()


def trades_kl(logits_adv: torch.Tensor, logits_nat: torch.Tensor) -> torch.Tensor:
    """KL(p_nat || p_adv), batch mean: the robustness term of TRADES."""
    return kl_per_sample(logits_nat, logits_adv).mean()


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


def trades_loss_per_sample(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                           beta: float = 6.0) -> torch.Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(softmax f(x) || softmax f(x')), per sample (the
    reference's KLDivLoss(size_average=False) / batch size is the batch mean of this KL)."""
    return F.cross_entropy(logits_nat.float(), y, reduction="none") + beta * kl_per_sample(logits_nat, logits_adv)


def mart_loss_per_sample(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                         beta: float = 6.0) -> torch.Tensor:
    """MART (Wang et al. 2020), per sample, with the reference's constants (YisenWang/MART `mart_loss`):
    BCE(f(x'), y) = CE(f(x'), y) - log(1.0001 - p'_{k*} + 1e-12), k* the most likely wrong class of x', plus
    beta KL(p || p') (summed over classes) weighted by (1.0000001 - p_y(x))."""
    adv_probs = F.softmax(logits_adv.float(), 1)
    top2 = adv_probs.argsort(1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(logits_adv.float(), y, reduction="none") - torch.log(
        1.0001 - adv_probs.gather(1, wrong[:, None]).squeeze(1) + 1e-12)
    nat_probs = F.softmax(logits_nat.float(), 1)
    kl = (torch.xlogy(nat_probs, nat_probs) - nat_probs * torch.log(adv_probs + 1e-12)).sum(1)  # KLDivLoss's terms
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    return bce + beta * kl * (1.0000001 - true_probs)
