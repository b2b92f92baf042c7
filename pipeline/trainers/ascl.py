"""ASCL (Bui et al. 2021): adversarial supervised contrastive learning with local positive/negative selection.

As its public code (tuananhbui89/ASCL, `ascl_pgd_2trans`, `soft_lcscl` of contrastive_losses_v2) runs it:
two crop+flip views per image, PGD on cross-entropy in train mode (10 steps); 4B embeddings (the two views,
natural then adversarial) from a linear projection; similarity = -l_inf distance of the normalised embeddings
/ temperature 0.2; each anchor's loss is minus the mean log-probability of its positives under a softmax over
the entries its rule leaves legal (`ascl_masks`); total = ASCL + 2 x KL(natural || adversarial) + CE(adversarial).
One batch-norm branch; the model's own classifier is evaluated directly (`pipeline eval --protocol direct`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.attacks import PGD
from pipeline.augment import random_crop_flip, to_float
from pipeline.errors import PipelineError
from pipeline.losses import kl_per_sample
from pipeline.models import model_spec
from pipeline.trainers.base import StepRecord, Trainer, register_trainer
from pipeline.config import NONNEG, POSITIVE, one_of, register_section, setting

NAT = "nat"
RULES = ("all", "hard", "soft", "leaking")
BIG = 1e9  # the reference's LARGE_NUM: logits of illegal entries drop by it


@register_section("ascl")
@dataclass
class ASCLConfig:
    rule: str = setting("leaking", "Which positives and negatives an anchor keeps.", check=one_of(*RULES))
    temperature: float = setting(0.2, "Similarity temperature.", check=POSITIVE)
    distance: str = setting("linf", "linf (the reference's) | cosine.", check=one_of("linf", "cosine"))
    kl_weight: float = setting(2.0, "Weight of KL(natural || adversarial).", check=NONNEG)
    ce_weight: float = setting(1.0, "Weight of the cross-entropy on the adversarial views.", check=NONNEG)


def ascl_masks(labels: torch.Tensor, preds: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, legal) boolean (n, n) masks for anchors i (rows) and candidates j (columns), i != j.

    positives: same true label (`leaking`: and same predicted label). legal: the entries the softmax sees:
    `all` every j; `hard` positives and the negatives j with pred_j == y_i; `soft` positives and the negatives
    with pred_j == pred_i; `leaking` only the j with pred_j == pred_i (positives and negatives among them)."""
    if rule not in RULES:
        raise PipelineError(f"ascl.rule {rule!r}: choose one of {', '.join(RULES)}")
    off = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    same_label = (labels[:, None] == labels[None, :]) & off
    diff_label = labels[:, None] != labels[None, :]
    same_pred = (preds[:, None] == preds[None, :]) & off
    if rule == "all":
        return same_label, off
    if rule == "hard":
        return same_label, same_label | (diff_label & (labels[:, None] == preds[None, :]))
    if rule == "soft":
        return same_label, same_label | (diff_label & same_pred)
    return same_label & same_pred, same_pred


def ascl_loss(z: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, rule: str, temperature: float,
              distance: str = "linf") -> tuple[torch.Tensor, dict]:
    """Per-anchor ASCL loss (n,) and the fractions of positives and negatives kept."""
    zn = F.normalize(z.float(), dim=1)
    if distance == "linf":
        sim = -torch.cdist(zn, zn, p=float("inf")) / temperature
    elif distance == "cosine":
        sim = zn @ zn.t() / temperature
    else:
        raise PipelineError(f"ascl.distance {distance!r}: choose linf or cosine")
    pos, legal = ascl_masks(labels, preds, rule)
    logprob = (sim - BIG * (~legal).float()).log_softmax(1)
    loss = -(logprob * pos).sum(1) / pos.sum(1).clamp_min(1)
    off = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negatives = (labels[:, None] != labels[None, :]) & off
    all_pos = (labels[:, None] == labels[None, :]) & off
    kept = {"positives_kept": float(pos.sum() / all_pos.sum().clamp_min(1)),
            "negatives_kept": float((negatives & legal).sum() / negatives.sum().clamp_min(1))}
    return loss, kept


def scaled_milestones(epochs: int) -> list[int]:
    """The reference's x0.1 at epochs 100, 105 and 110 of 120, in proportion to `epochs`."""
    return sorted({max(1, round(epochs * m / 120)) for m in (100, 105, 110)})


@register_trainer
class ASCLTrainer(Trainer):
    name = "ascl"
    needs_labels = True
    sections = ("ascl",)
    config_defaults = {"optim.optimizer": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
                       "optim.schedule": "step", "optim.warmup_epochs": 0, "optim.epochs": 120,
                       "attack.steps": 10, "data.batch_size": 128, "model.proj_dim": 128}

    def model_spec(self) -> dict:
        m = self.cfg.model
        n_classes = len(self.shardset.classes)
        return model_spec(m.arch, self.channels, self.image_size,
                          heads={"logits": {"kind": "linear", "width": 0, "out": n_classes},
                                 "proj": {"kind": "linear", "width": 0, "out": m.proj_dim}},
                          branches=(NAT,), roles={"natural": NAT, "adversarial": NAT, "eval": NAT})

    def setup(self) -> None:
        o = self.cfg.optim
        if o.schedule == "step" and not o.milestones:
            o.milestones = scaled_milestones(o.epochs)
        b = self.budget
        self.attack = PGD(lambda x: self.model(x, NAT, heads=("logits",))["logits"],
                          lambda out, y: F.cross_entropy(out.float(), y), b.eps, b.step, b.steps, module=self.model,
                          train_mode=True, generator=self.gen, autocast_dtype=self.autocast)

    def training_step(self, batch, epoch: int) -> StepRecord:
        a = self.cfg.ascl
        images = batch.images.to(self.device, non_blocking=True)
        y = batch.labels.to(self.device).long()
        pad = max(1, images.shape[-1] // 8)
        x = to_float(images)
        views = torch.cat([random_crop_flip(x, self.gen, pad), random_crop_flip(x, self.gen, pad)])
        views = views.contiguous(memory_format=self.memory_format)
        y2 = torch.cat([y, y])
        adv, attack_s = self.timed(self.attack, views, y2)
        with self.autocast_ctx():
            nat_out, adv_out = self.forward([views, adv], [NAT, NAT])
        logits_nat, logits_adv = nat_out["logits"].float(), adv_out["logits"].float()
        preds = torch.cat([logits_nat.argmax(1), logits_adv.argmax(1)])
        con, kept = ascl_loss(torch.cat([nat_out["proj"], adv_out["proj"]]), torch.cat([y2, y2]), preds, a.rule,
                              a.temperature, a.distance)
        n = len(y)
        con = con.view(4, n).mean(0)
        kl = kl_per_sample(logits_nat, logits_adv).view(2, n).mean(0)
        ce = F.cross_entropy(logits_adv, y2, reduction="none").view(2, n).mean(0)
        losses = con + a.kl_weight * kl + a.ce_weight * ce
        return StepRecord(losses, {"loss_ascl": float(con.detach().mean()), "loss_kl": float(kl.detach().mean()),
                                   "loss_ce_adv": float(ce.detach().mean()), "attack_s": attack_s, **kept,
                                   "accuracy_adv": float((logits_adv.argmax(1) == y2).float().mean())})

    def selection_settings(self) -> dict:
        a = self.cfg.ascl
        return {**super().selection_settings(), "kl_weight": a.kl_weight, "ce_weight": a.ce_weight}
