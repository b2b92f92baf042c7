"""AdvCL (Fan et al. 2021): adversarial contrastive learning with a high-frequency view and pseudo-label heads.

As its public code (LijieFan/AdvCL) runs it:
- three batch-norm branches: `normal` (the natural views), `pgd` (the contrastive adversarial view; evaluation
  deploys it) and `pgd_ce` (the pseudo-label adversarial view); the projection head (Linear, BN, ReLU, Linear)
  normalises every branch with one shared batch norm, as the reference's head does;
- views: two SimCLR views (crop scale 0.2-1), a weakly augmented image x (crop with padding, flip) and its
  high-frequency view (`augment.high_pass`, radius 8 at 32 px, scaled with the image size);
- x_cl and x_ce, both from x (uniform start, PGD in train mode), crafted jointly on one loss: the multi-view
  contrastive loss of [x_cl, view 1, view 2, high-frequency view] plus `ce_weight` x the mean cross-entropy of
  the pseudo-label heads on x_ce. Train mode as in the reference: every attack step passes x_cl, x_ce and the
  three natural views through their branches, so each branch's running statistics take `steps` updates
  during the attack besides the one of the training pass;
- the training loss is the same loss at the perturbed images; the contrastive term is multiplied by
  temperature / base temperature (0.5 / 0.07, the reference's SupCon quirk), `advcl.scale_temperature=false`
  for the plain loss.
Pseudo-labels come from `pipeline pseudo-labels` (k-means of a SimCLR encoder's features), read by sample id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.attacks import PGD
from pipeline.augment import ContrastiveAugment
from pipeline.errors import PipelineError
from pipeline.losses import multiview_contrastive
from pipeline.models import model_spec
from pipeline.objectives.advcl import advcl_views
from pipeline.pseudolabels import PseudoLabels
from pipeline.trainers.base import StepRecord, Trainer, register_trainer
from pipeline.config import NONNEG, POSITIVE, register_section, setting, within

NORMAL, PGD_CL, PGD_CE = "normal", "pgd", "pgd_ce"


@register_section("advcl")
@dataclass
class AdvCLConfig:
    pseudo_labels: str = setting("", "The file `pipeline pseudo-labels` wrote (its .json header).")
    temperature: float = setting(0.5, "Contrastive temperature.", check=POSITIVE)
    base_temperature: float = setting(0.07, "The reference's base temperature.", check=POSITIVE)
    scale_temperature: bool = setting(True, "The reference's x temperature / base_temperature; false: the plain loss.")
    ce_weight: float = setting(0.2, "Weight of the pseudo-label cross-entropy.", check=NONNEG)
    hf_radius: float = setting(0.0, "High-pass radius (0: 8 at 32 px, scaled with the image size).", check=NONNEG)
    min_crop_scale: float = setting(0.2, "Smallest area of RandomResizedCrop.", check=within(0, 1, False, True))


def cluster_heads(counts) -> list[str]:
    return [f"cluster_{k}" for k in counts]


@register_trainer
class AdvCLTrainer(Trainer):
    name = "advcl"
    sections = ("advcl",)
    config_defaults = {"optim.optimizer": "sgd", "optim.lr": 0.5, "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
                       "optim.schedule": "cosine", "model.proj_dim": 128}

    def model_spec(self) -> dict:
        a, m = self.cfg.advcl, self.cfg.model
        if not a.pseudo_labels:
            raise PipelineError("advcl trains on pseudo-labels: make them with `pipeline pseudo-labels --data DATA "
                                "--checkpoint SIMCLR_RUN/checkpoints/last.pt --out FILE`, then --set "
                                "advcl.pseudo_labels=FILE")
        self.pseudo = PseudoLabels.load(a.pseudo_labels, self.shardset.fingerprint)
        heads = {"proj": {"kind": "mlp2", "width": m.head_width, "out": m.proj_dim, "shared_bn": True},
                 **{h: {"kind": "linear", "width": 0, "out": k} for h, k in zip(cluster_heads(self.pseudo.counts),
                                                                               self.pseudo.counts)}}
        return model_spec(m.arch, self.channels, self.image_size, heads=heads, branches=(NORMAL, PGD_CL, PGD_CE),
                          roles={"natural": NORMAL, "adversarial": PGD_CL, "eval": PGD_CL})

    def setup(self) -> None:
        a = self.cfg.advcl
        self.augment = ContrastiveAugment(self.image_size, min_scale=a.min_crop_scale)
        self.radius = a.hf_radius or 8 * self.image_size / 32
        self.scale = a.temperature / a.base_temperature if a.scale_temperature else 1.0
        self.heads = cluster_heads(self.pseudo.counts)
        b = self.budget
        self.attack = PGD(self._attack_forward, lambda outs, t: self.loss(outs, t).mean(), b.eps, b.step, b.steps,
                          module=self.model, train_mode=True, generator=self.gen, autocast_dtype=self.autocast)

    def _attack_forward(self, x_cl, x_ce):
        v = self._views
        return self.forward([x_cl, *v, x_ce], [PGD_CL, NORMAL, NORMAL, NORMAL, PGD_CE],
                            [("proj",)] * 4 + [tuple(self.heads)])

    def loss(self, outs: list[dict], targets: torch.Tensor, parts: bool = False):
        """Per-sample loss: the 4-view contrastive term (mean of the sample's 4 rows) + ce_weight x the mean
        over the pseudo-label heads of their cross-entropy on x_ce."""
        a = self.cfg.advcl
        z = torch.cat([o["proj"] for o in outs[:4]])
        con = multiview_contrastive(z, 4, a.temperature, self.scale, reduction="sample")
        ce = torch.stack([F.cross_entropy(outs[4][h].float(), targets[:, i], reduction="none")
                          for i, h in enumerate(self.heads)]).mean(0)
        total = con + a.ce_weight * ce
        return (total, con, ce) if parts else total

    def training_step(self, batch, epoch: int) -> StepRecord:
        images = batch.images.to(self.device, non_blocking=True)
        targets = self.pseudo.lookup(batch.ids).to(self.device)
        x1, x2, x, hf = (v.contiguous(memory_format=self.memory_format)
                         for v in advcl_views(images, self.gen, self.augment, self.radius))
        self._views = (x1, x2, hf)
        (x_cl, x_ce), attack_s = self.timed(self.attack, [x, x], targets)
        with self.autocast_ctx():
            outs = self._attack_forward(x_cl, x_ce)
        losses, con, ce = self.loss(outs, targets, parts=True)
        return StepRecord(losses, {"loss_contrastive": float(con.detach().mean()),
                                   "loss_pseudo": float(ce.detach().mean()), "attack_s": attack_s})

    def selection_settings(self) -> dict:
        a = self.cfg.advcl
        return {**super().selection_settings(), "temperature": a.temperature, "scale": self.scale,
                "min_crop_scale": a.min_crop_scale, "hf_radius": self.radius}
