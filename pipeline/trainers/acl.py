"""Adversarial contrastive learning (ACL, Jiang et al. 2020) and DynACL's schedule (Luo et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.attacks import PGD
from pipeline.augment import ContrastiveAugment
from pipeline.losses import multiview_contrastive, nt_xent, row_gradients
from pipeline.models import model_spec
from pipeline.models.multibn import use_branch
from pipeline.trainers.base import HeadRows, StepRecord, Trainer
from pipeline.trainers.config import register_section

NAT, ADV = "nat", "adv"  # ACL's two batch-norm branches; the eval branch is the adversarial one


@register_section("acl")
@dataclass
class ACLConfig:
    temperature: float = 0.5
    min_crop_scale: float = 0.08  # smallest area of RandomResizedCrop (raise it for tiny images)


@register_section("dynacl")
@dataclass
class DynACLConfig:
    period: int = 50  # epochs between augmentation-strength steps
    swap: float = 2 / 3  # how far the loss weight moves towards the adversarial term over the run


class ACLTrainer(Trainer):
    """Two augmented views; PGD on the contrastive loss (eval mode, adversarial branch) perturbs both; loss =
    mean of natural NT-Xent (natural batch norm) and adversarial NT-Xent (adversarial batch norm)."""

    name = "acl"
    sections = ("acl",)

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

    def training_step(self, batch, epoch: int) -> StepRecord:
        images = batch.images.to(self.device, non_blocking=True)
        views = torch.cat([self.augment(images, self.gen), self.augment(images, self.gen)])
        views = views.contiguous(memory_format=self.memory_format)
        adv, attack_s = self.timed(self.attack, views)
        with self.autocast_ctx():
            out_nat, out_adv = self.forward([views, adv], [NAT, ADV])
        t = self.cfg.acl.temperature
        loss_nat = nt_xent(out_nat["proj"], t, reduction="sample")
        loss_adv = nt_xent(out_adv["proj"], t, reduction="sample")
        w = self.adv_weight(epoch)
        losses = ((2 - w) * loss_nat + w * loss_adv) / 2
        return StepRecord(losses, {"loss_nat": float(loss_nat.detach().mean()),
                                   "loss_adv": float(loss_adv.detach().mean()), "attack_s": attack_s,
                                   "adv_weight": w, "strength": self.augment.strength})

    def selection_settings(self) -> dict:
        return {**super().selection_settings(), "temperature": self.cfg.acl.temperature,
                "min_crop_scale": self.cfg.acl.min_crop_scale, "strength": self.augment.strength}

    @classmethod
    def selection_rows(cls, model, batch, gen, settings, attack) -> HeadRows:
        """4 rows per sample: its two views (natural branch) and their PGD views (adversarial branch); each
        row's NT-Xent term against the batch held fixed, over 4 (the sample's loss is the mean of its rows)."""
        t = settings.get("temperature", 0.5)
        augment = ContrastiveAugment(batch.images.shape[-1], settings.get("strength", 1.0),
                                     settings.get("min_crop_scale", 0.08))
        views = torch.cat([augment(batch.images, gen), augment(batch.images, gen)])
        return contrastive_rows(model, [views], views_per_row_group=2, temperature=t, attack=attack, gen=gen)


def contrastive_rows(model, inputs: list, views_per_row_group: int, temperature: float, attack, gen,
                     scale: float = 1.0, head: str = "proj") -> HeadRows:
    """Rows of a contrastive method for selection: `inputs` (each 2B views stacked) on the natural branch and,
    when the model's adversarial branch differs or an attack is asked for, their PGD versions (eval mode, on
    the adversarial branch); gradients of each row's term with the others held fixed."""
    nat, adv = model.branch("natural"), model.branch("adversarial")
    n = len(inputs[0]) // views_per_row_group
    feats, branches = [], []
    with torch.no_grad():
        for x in inputs:
            feats.append(model.features(x, nat))
            branches += [nat] * views_per_row_group
    if attack is not None and attack.steps > 0:
        pgd = PGD(lambda x: model(x, adv, heads=(head,))[head],
                  lambda z, _: multiview_contrastive(z, views_per_row_group, temperature, scale),
                  attack.eps, attack.step, attack.steps, module=model, generator=gen)
        for x in inputs:
            with torch.no_grad():
                feats.append(model.features(pgd(x), adv))
            branches += [adv] * views_per_row_group
    rows_f, rows_g = [], []
    for f, branch in zip(feats, branches[::views_per_row_group]):
        with torch.no_grad(), use_branch(model.heads[head], branch):
            z = model.heads[head](f)
        g = row_gradients(z, lambda zz: multiview_contrastive(zz, views_per_row_group, temperature, scale,
                                                              reduction="rows", detach_others=True))
        rows_f += list(f.split(n))
        rows_g += list(g.split(n))
    total = len(rows_f)
    return HeadRows(rows_f, [g / total for g in rows_g], branches)


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
