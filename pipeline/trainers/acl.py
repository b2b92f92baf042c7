"""Adversarial contrastive learning (ACL, Jiang et al. 2020) and DynACL's schedule (Luo et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.attacks import PGD
from pipeline.augment import ContrastiveAugment
from pipeline.losses import nt_xent
from pipeline.models import model_spec
from pipeline.trainers.base import StepRecord, Trainer, register_trainer
from pipeline.trainers.selective import rows_of
from pipeline.config import AT_LEAST_ONE, NONNEG, POSITIVE, register_section, setting, within

NAT, ADV = "nat", "adv"  # ACL's two batch-norm branches; the eval branch is the adversarial one


@register_section("acl")
@dataclass
class ACLConfig:
    temperature: float = setting(0.5, "NT-Xent temperature.", check=POSITIVE)
    min_crop_scale: float = setting(0.08, "Smallest area of RandomResizedCrop (raise it for tiny images).",
                                    check=within(0, 1, False, True))


@register_section("dynacl")
@dataclass
class DynACLConfig:
    period: int = setting(50, "Epochs between augmentation-strength steps.", check=AT_LEAST_ONE)
    swap: float = setting(2 / 3, "How far the loss weight moves towards the adversarial term over the run.",
                          check=NONNEG)


@register_trainer
class ACLTrainer(Trainer):
    """Two augmented views; PGD on the contrastive loss (eval mode, adversarial branch) perturbs both; loss =
    mean of natural NT-Xent (natural batch norm) and adversarial NT-Xent (adversarial batch norm)."""

    name = "acl"
    sections = ("acl",)
    selective_attack = True

    def model_spec(self) -> dict:
        m = self.cfg.model
        return model_spec(m.arch, self.channels, self.image_size,
                          heads={"proj": {"kind": "mlp3", "width": m.head_width, "out": m.proj_dim}},
                          branches=(NAT, ADV), roles={"natural": NAT, "adversarial": ADV, "eval": ADV})

    def setup(self) -> None:
        a = self.cfg.acl
        self.augment = ContrastiveAugment(self.image_size, min_scale=a.min_crop_scale)
        b = self.budget
        self.attack = PGD(lambda x: self.model(x, ADV, heads=("proj",))["proj"],
                          lambda z, _: nt_xent(z, a.temperature), b.eps, b.step, b.steps, module=self.model,
                          generator=self.gen, autocast_dtype=self.autocast)

    def adv_weight(self, epoch: int) -> float:
        return 1.0

    def attack_some(self, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The adversarial views of the samples at `positions` only (both their views), the others unperturbed.
        The attack maximises the same NT-Xent over the whole batch, the unperturbed views held fixed: one
        forward of theirs (no gradient) instead of `steps` forward and backward passes."""
        n = len(views) // 2
        rows = rows_of(positions, n, 2)
        fixed = torch.ones(len(views), dtype=torch.bool, device=views.device)
        fixed[rows] = False
        was = self.model.training
        self.model.eval()  # as the attack runs: eval mode, adversarial branch
        try:
            with torch.no_grad(), self.autocast_ctx():
                z_fixed = self.model(views[fixed], ADV, heads=("proj",))["proj"].float()
        finally:
            self.model.train(was)
        z_all = torch.zeros(len(views), z_fixed.shape[1], device=views.device)
        z_all[fixed] = z_fixed
        t, b = self.cfg.acl.temperature, self.budget
        pgd = PGD(lambda x: self.model(x, ADV, heads=("proj",))["proj"],
                  lambda z, _: nt_xent(z_all.index_copy(0, rows, z.float()), t),
                  b.eps, b.step, b.steps, module=self.model, generator=self.gen, autocast_dtype=self.autocast)
        adv = views.clone()
        adv[rows] = pgd(views[rows])
        return adv

    def training_step(self, batch, epoch: int) -> StepRecord:
        images = batch.images.to(self.device, non_blocking=True)
        views = torch.cat([self.augment(images, self.gen), self.augment(images, self.gen)])
        views = views.contiguous(memory_format=self.memory_format)
        positions = self.attack_positions(batch)
        adv, attack_s = self.timed(self.attack if positions is None else self.attack_some, views,
                                   *(() if positions is None else (positions,)))
        with self.autocast_ctx():
            out_nat, out_adv = self.forward([views, adv], [NAT, ADV])
        t = self.cfg.acl.temperature
        loss_nat = nt_xent(out_nat["proj"], t, reduction="sample")
        loss_adv = nt_xent(out_adv["proj"], t, reduction="sample")
        w = self.adv_weight(epoch)
        losses = ((2 - w) * loss_nat + w * loss_adv) / 2
        values = {"divergence": self.sample_divergence(out_adv["proj"], out_nat["proj"], 2)} \
            if self.wants("divergence") else {}
        return StepRecord(losses, {"loss_nat": float(loss_nat.detach().mean()),
                                   "loss_adv": float(loss_adv.detach().mean()), "attack_s": attack_s,
                                   "adv_weight": w, "strength": self.augment.strength}, values)

    def selection_settings(self) -> dict:
        return {**super().selection_settings(), "temperature": self.cfg.acl.temperature,
                "min_crop_scale": self.cfg.acl.min_crop_scale, "strength": self.augment.strength}


@register_trainer
class DynACLTrainer(ACLTrainer):
    """ACL with DynACL's annealing: every `dynacl.period` epochs the augmentation strength drops (from 1
    towards 0 over the run) and the loss weight moves towards the adversarial term, as in the DynACL code:
    strength = 1 - floor(e / K) K / E, w_adv = min(1 + floor((e + 1) / K) (K / E) swap, 2)."""

    name = "dynacl"
    sections = ("acl", "dynacl")

    def on_epoch_start(self, epoch: int) -> None:
        k, e = self.cfg.dynacl.period, self.cfg.optim.epochs
        self.augment.strength = 1.0 - (epoch // k) * k / e

    def adv_weight(self, epoch: int) -> float:
        k, e = self.cfg.dynacl.period, self.cfg.optim.epochs
        return min(1.0 + ((epoch + 1) // k) * (k / e) * self.cfg.dynacl.swap, 2.0)
