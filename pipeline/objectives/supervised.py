"""Objectives measured at the model's own classifier: ASCL's supervised terms, PGD-AT, TRADES and MART.

Each has 2 rows per sample at the `logits` head: the image (natural) and its PGD-CE version; the rows' output
gradients are those of the method's per-sample supervised loss with respect to both logits. RD at the logits
is the softmax KL, as RCS does for supervised outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attacks import PGD
from pipeline.augment import to_float
from pipeline.losses import kl_per_sample, mart_loss_per_sample, trades_loss_per_sample
from pipeline.objectives.base import HeadRows, Objective, register_objective


class ClassifierObjective(Objective):
    """`loss(logits_nat, logits_adv, y, settings)`: the method's per-sample loss on the two rows' logits."""

    head = "logits"
    divergence = "kl"

    @staticmethod
    def loss(logits_nat, logits_adv, y, settings: dict) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def rows(cls, model, batch, gen, settings, attack) -> HeadRows:
        x = to_float(batch.images)
        y = batch.labels.to(x.device).long()
        branch = model.branch("natural")  # one branch: it plays every role
        head = model.heads["logits"]
        pgd = PGD(lambda v: model(v, branch, heads=("logits",))["logits"],
                  lambda out, t: F.cross_entropy(out.float(), t), attack.eps, attack.step, attack.steps,
                  module=model, generator=gen)
        with torch.no_grad():
            feats = [model.features(x, branch), model.features(pgd(x, y), branch)]
            logits = [head(f) for f in feats]
        nat, adv = (t.detach().float().requires_grad_(True) for t in logits)
        loss = cls.loss(nat, adv, y, settings)
        grads = torch.autograd.grad(loss.sum(), [nat, adv], allow_unused=True)  # PGD-AT's loss has no natural term
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (nat, adv))]
        return HeadRows(feats, grads, [branch, branch])


@register_objective
class ASCLObjective(ClassifierObjective):
    """kl_weight x KL(natural || adversarial) + ce_weight x CE(adversarial); the contrastive term does not pass
    the classifier."""

    name = "ascl"

    @staticmethod
    def loss(logits_nat, logits_adv, y, settings):
        kl_w, ce_w = settings.get("kl_weight", 2.0), settings.get("ce_weight", 1.0)
        return kl_w * kl_per_sample(logits_nat, logits_adv) + ce_w * F.cross_entropy(logits_adv, y, reduction="none")


@register_objective
class PGDATObjective(ClassifierObjective):
    name = "pgd-at"

    @staticmethod
    def loss(logits_nat, logits_adv, y, settings):
        return F.cross_entropy(logits_adv, y, reduction="none")


@register_objective
class TRADESObjective(ClassifierObjective):
    name = "trades"

    @staticmethod
    def loss(logits_nat, logits_adv, y, settings):
        return trades_loss_per_sample(logits_nat, logits_adv, y, settings.get("beta", 6.0))


@register_objective
class MARTObjective(ClassifierObjective):
    name = "mart"

    @staticmethod
    def loss(logits_nat, logits_adv, y, settings):
        return mart_loss_per_sample(logits_nat, logits_adv, y, settings.get("beta", 6.0))
