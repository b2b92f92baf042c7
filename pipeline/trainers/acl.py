"""Adversarial contrastive learning (ACL, Jiang et al. 2020) and DynACL's schedule (Luo et al. 2023)."""

from __future__ import annotations

import time

import torch

from pipeline.losses import nt_xent
from pipeline.trainers.base import Trainer


class ACLTrainer(Trainer):
    """Two augmented views; PGD on the contrastive loss perturbs both; loss = mean of natural NT-Xent (natural
    batch norm) and adversarial NT-Xent (adversarial batch norm)."""

    name = "acl"

    def adv_weight(self, epoch: int) -> float:
        return 1.0

    def training_step(self, batch, epoch: int):
        images = batch.images.to(self.device, non_blocking=True)
        views = torch.cat([self.augment(images, self.gen), self.augment(images, self.gen)])
        views = views.contiguous(memory_format=self.memory_format)
        t0 = time.perf_counter()
        adv = self.attack(views)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        attack_s = time.perf_counter() - t0
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            z_nat, z_adv = self.forward([views, adv], ["nat", "adv"])
        t = self.cfg.method.temperature
        loss_nat, loss_adv = nt_xent(z_nat, t), nt_xent(z_adv, t)
        w = self.adv_weight(epoch)
        loss = ((2 - w) * loss_nat + w * loss_adv) / 2
        return loss, {"loss_nat": float(loss_nat.detach()), "loss_adv": float(loss_adv.detach()),
                      "attack_s": attack_s, "adv_weight": w, "strength": self.augment.strength}


class DynACLTrainer(ACLTrainer):
    """ACL with DynACL's annealing: every `dynacl_period` epochs the augmentation strength drops (from 1
    towards 0 over the run) and the loss weight moves towards the adversarial term, as in the DynACL code:
    strength = 1 - floor(e / K) K / E, w_adv = min(1 + floor((e + 1) / K) (K / E) swap, 2)."""

    name = "dynacl"

    def on_epoch_start(self, epoch: int) -> None:
        k, e = self.cfg.method.dynacl_period, self.cfg.optim.epochs
        self.augment.strength = 1.0 - (epoch // k) * k / e

    def adv_weight(self, epoch: int) -> float:
        k, e = self.cfg.method.dynacl_period, self.cfg.optim.epochs
        return min(1.0 + ((epoch + 1) // k) * (k / e) * self.cfg.method.dynacl_swap, 2.0)
