"""SimCLR (Chen et al. 2020): standard, non-adversarial contrastive pre-training.

The cheap baseline of every robustness table (what does robustness cost?), the encoder AdvCL's pseudo-labels
come from, and the base of RUSH. Two augmented views, NT-Xent, one batch-norm branch, no attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.augment import ContrastiveAugment
from pipeline.losses import nt_xent
from pipeline.models import model_spec
from pipeline.trainers.base import StepRecord, Trainer, register_trainer
from pipeline.config import POSITIVE, one_of, register_section, setting, within

NAT = "nat"  # the only branch: it plays every role


@register_section("simclr")
@dataclass
class SimCLRConfig:
    temperature: float = setting(0.5, "NT-Xent temperature.", check=POSITIVE)
    min_crop_scale: float = setting(0.08, "Smallest area of RandomResizedCrop (raise it for tiny images).",
                                    check=within(0, 1, False, True))
    head: str = setting("mlp2", "SimCLR's head (Linear, BN, ReLU, Linear); mlp3 for ACL's, to compare like with like.",
                        check=one_of("mlp2", "mlp3", "linear"))


@register_trainer
class SimCLRTrainer(Trainer):
    name = "simclr"
    sections = ("simclr",)

    def model_spec(self) -> dict:
        m, s = self.cfg.model, self.cfg.simclr
        return model_spec(m.arch, self.channels, self.image_size,
                          heads={"proj": {"kind": s.head, "width": m.head_width, "out": m.proj_dim}},
                          branches=(NAT,), roles={"natural": NAT, "adversarial": NAT, "eval": NAT})

    def setup(self) -> None:
        self.augment = ContrastiveAugment(self.image_size, min_scale=self.cfg.simclr.min_crop_scale)

    def training_step(self, batch, epoch: int) -> StepRecord:
        images = batch.images.to(self.device, non_blocking=True)
        views = torch.cat([self.augment(images, self.gen), self.augment(images, self.gen)])
        views = views.contiguous(memory_format=self.memory_format)
        with self.autocast_ctx():
            (out,) = self.forward([views], [NAT])
        losses = nt_xent(out["proj"], self.cfg.simclr.temperature, reduction="sample")
        return StepRecord(losses, {"loss_nt_xent": float(losses.detach().mean())})

    def selection_settings(self) -> dict:
        s = self.cfg.simclr
        return {**super().selection_settings(), "temperature": s.temperature, "min_crop_scale": s.min_crop_scale,
                "strength": self.augment.strength}
