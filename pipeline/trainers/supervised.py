"""Supervised adversarial training: PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019), MART (Wang et al.
2020), the trainers data-pruned adversarial training prunes for (other-methods.md).

One batch-norm branch, the model's own classifier (a linear `logits` head on the encoder: evaluate it with
`pipeline eval --protocol direct`). Each step attacks in eval mode, as the TRADES and MART reference code does
(`model.eval()` while crafting, `model.train()` for the update), then takes the method's per-sample loss:

- `pgd-at`: cross-entropy on PGD-10 images (uniform random start, attack on cross-entropy);
- `trades`: CE(natural) + beta KL(natural || adversarial), the attack maximising that KL from x + 0.001 N(0, 1);
- `mart`: boosted CE on the adversarial images + beta KL weighted by 1 - p_y(natural), the attack on
  cross-entropy from x + 0.001 N(0, 1) (the MART reference's start).

Every step also reports, per sample (`StepRecord.values`, for pruners, at no extra forward pass): its loss,
EL2N (l2 norm of softmax minus one-hot) and margin (true logit minus the largest other) on the natural images,
whether the adversarial image is classified correctly (for forgetting events), and the norm of the
classifier's weight-and-bias gradient of its cross-entropy on the adversarial image (||p - onehot|| x
sqrt(||h||^2 + 1), exact for a linear head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.attacks import PGD
from pipeline.augment import random_crop_flip, to_float
from pipeline.losses import kl_per_sample
from pipeline.models import model_spec
from pipeline.objectives.supervised import (ClassifierObjective, MARTObjective, PGDATObjective,
                                            TRADESObjective)
from pipeline.trainers.base import StepRecord, Trainer, register_trainer
from pipeline.config import NONNEG, register_section, setting

NAT = "nat"


@register_section("at")
@dataclass
class SupervisedATConfig:
    beta: float = setting(6.0, "TRADES and MART: weight of the KL term.", check=NONNEG)
    start_std: float = setting(0.001, "TRADES and MART: the attack starts at x + start_std N(0, 1).", check=NONNEG)


def per_sample_scores(logits_nat: torch.Tensor, logits_adv: torch.Tensor, feats_adv: torch.Tensor,
                      y: torch.Tensor) -> dict:
    """Scores of each sample from outputs the step already has (no extra forward pass)."""
    with torch.no_grad():
        onehot = F.one_hot(y, logits_nat.shape[1]).float()
        p_nat = F.softmax(logits_nat.float(), 1)
        true = logits_nat.float().gather(1, y[:, None]).squeeze(1)
        other = logits_nat.float().masked_fill(onehot.bool(), float("-inf")).amax(1)
        err_adv = (F.softmax(logits_adv.float(), 1) - onehot).norm(dim=1)
        return {"el2n": (p_nat - onehot).norm(dim=1), "margin": true - other,
                "correct_adv": (logits_adv.argmax(1) == y).float(),
                "grad_norm": err_adv * (feats_adv.float().pow(2).sum(1) + 1).sqrt()}


class SupervisedATTrainer(Trainer):
    """The shared step; a method says how it attacks (`attack_loss`, `start`) and what it minimises (`loss`)."""

    name = "supervised-at"
    needs_labels = True
    sections = ("at",)
    config_defaults = {"optim.optimizer": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
                       "optim.schedule": "step", "optim.warmup_epochs": 0, "attack.steps": 10,
                       "data.batch_size": 128}
    objective: type[ClassifierObjective]  # the per-sample loss, shared with selection
    start = "uniform"
    selective_attack = True

    def model_spec(self) -> dict:
        return model_spec(self.cfg.model.arch, self.channels, self.image_size,
                          heads={"logits": {"kind": "linear", "width": 0, "out": len(self.shardset.classes)}},
                          branches=(NAT,), roles={"natural": NAT, "adversarial": NAT, "eval": NAT})

    @classmethod
    def complete_config(cls, cfg) -> None:
        super().complete_config(cfg)
        o = cfg.optim
        if o.schedule == "step" and not o.milestones:  # the usual x0.1 at 50% and 75% of training
            o.milestones = sorted({max(1, round(o.epochs * 0.5)), max(1, round(o.epochs * 0.75))})

    def setup(self) -> None:
        b = self.budget
        self.attack = PGD(lambda x: self.model(x, NAT, heads=("logits",))["logits"], self.attack_loss, b.eps, b.step,
                          b.steps, start=self.start, start_std=self.cfg.at.start_std, module=self.model,
                          generator=self.gen, autocast_dtype=self.autocast)

    @staticmethod
    def attack_loss(logits, target):
        """PGD-CE: `target` are the labels."""
        return F.cross_entropy(logits.float(), target)

    def attack_target(self, x, y):
        return y

    def loss(self, logits_nat, logits_adv, y) -> torch.Tensor:
        return self.objective.loss(logits_nat, logits_adv, y, {"beta": self.cfg.at.beta})

    def training_step(self, batch, epoch: int) -> StepRecord:
        images = batch.images.to(self.device, non_blocking=True)
        y = batch.labels.to(self.device).long()
        x = random_crop_flip(to_float(images), self.gen, max(1, images.shape[-1] // 8))
        x = x.contiguous(memory_format=self.memory_format)
        positions = self.attack_positions(batch)
        target = self.attack_target(x, y)
        if positions is None:
            adv, attack_s = self.timed(self.attack, x, target)
        else:  # the others enter unperturbed: the loss keeps its form, the attack costs its share
            adv = x.clone()
            adv[positions], attack_s = self.timed(self.attack, x[positions], target[positions])
        with self.autocast_ctx():
            nat_out, adv_out = self.forward([x, adv], [NAT, NAT], [("logits",), ("logits",)])
        logits_nat, logits_adv = nat_out["logits"].float(), adv_out["logits"].float()
        losses = self.loss(logits_nat, logits_adv, y)
        values = per_sample_scores(logits_nat, logits_adv, adv_out["features"], y)
        if self.wants("divergence"):
            values["divergence"] = self.sample_divergence(logits_adv, logits_nat)
        return StepRecord(losses, {"attack_s": attack_s, "accuracy_adv": float(values["correct_adv"].mean()),
                                   "accuracy_nat": float((logits_nat.argmax(1) == y).float().mean())}, values)

    def selection_settings(self) -> dict:
        return {**super().selection_settings(), "beta": self.cfg.at.beta}


@register_trainer
class PGDATTrainer(SupervisedATTrainer):
    name = "pgd-at"
    objective = PGDATObjective


@register_trainer
class TRADESTrainer(SupervisedATTrainer):
    name = "trades"
    objective = TRADESObjective
    start = "normal"

    @staticmethod
    def attack_loss(logits_adv, logits_nat):
        """TRADES' attack: KL(natural || adversarial), summed (the reference's size_average=False)."""
        return kl_per_sample(logits_nat, logits_adv.float()).sum()

    def attack_target(self, x, y):
        with torch.no_grad():
            self.model.eval()
            out = self.model(x, NAT, heads=("logits",))["logits"].float()
            self.model.train()
        return out


@register_trainer
class MARTTrainer(SupervisedATTrainer):
    name = "mart"
    objective = MARTObjective
    start = "normal"
