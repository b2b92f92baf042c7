"""Finetuning protocols for a pre-trained encoder: SLF, ALF and AFF (acl-and-eval.md).

Independent of the training code on purpose: it imports the model definition, the attack module and the
data path (loader, crop-and-flip), nothing from `pipeline.trainers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import PGD
from pipeline.augment import random_crop_flip, to_float
from pipeline.losses import trades_kl
from pipeline.models.multibn import set_branch
from pipeline.progress import progress_bar

PROTOCOLS = ("slf", "alf", "aff")


class LinearClassifier(nn.Module):
    """Encoder (adversarial batch-norm branch) + a linear layer: the deployed model that attacks target."""

    def __init__(self, encoder: nn.Module, feature_dim: int, n_classes: int, branch: str = "adv"):
        super().__init__()
        self.encoder, self.fc = encoder, nn.Linear(feature_dim, n_classes)
        set_branch(self.encoder, branch)

    def forward(self, x):
        return self.fc(self.encoder(x))


@dataclass
class FinetuneSettings:
    epochs: int = 25
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    eps: float = 8 / 255
    step: float = 2 / 255
    train_steps: int = 10  # PGD-10 (ALF) / TRADES-10 (AFF)
    trades_beta: float = 6.0
    seed: int = 0


def finetune(model: LinearClassifier, loader, protocol: str, s: FinetuneSettings, device, progress=True) -> list[float]:
    """Train `model` in place by `protocol`; returns the mean training loss per epoch."""
    full = protocol == "aff"
    for p in model.encoder.parameters():
        p.requires_grad_(full)
    params = list(model.parameters()) if full else list(model.fc.parameters())
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True)
    # The reference decays x0.1 at epochs 10 and 20 of 25: at 40% and 80% of the run.
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, round(s.epochs * 0.4)), max(1, round(s.epochs * 0.8))], 0.1)
    gen = torch.Generator(device).manual_seed(s.seed)
    attack_loss = "trades" if full else "ce"
    attack = PGD(model, attack_loss, s.eps, s.step, s.train_steps, generator=gen)
    losses = []
    for epoch in range(s.epochs):
        total, count = 0.0, 0
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{protocol} epoch {epoch + 1}/{s.epochs}", total=getattr(loader, "samples_per_epoch", None))
            for batch in loader:
                x = to_float(batch.images.to(device))
                x = random_crop_flip(x, gen, padding=max(1, x.shape[-1] // 8))  # 4 px at 32 px, as the reference
                y = batch.labels.to(device)
                if protocol == "slf":
                    model.encoder.eval()
                    with torch.no_grad():
                        feats = model.encoder(x)
                    loss = F.cross_entropy(model.fc(feats), y)
                elif protocol == "alf":
                    model.encoder.eval()
                    x_adv = attack(x, y)
                    with torch.no_grad():
                        feats = model.encoder(x_adv)
                    loss = F.cross_entropy(model.fc(feats), y)
                else:  # aff: TRADES on the whole network
                    model.eval()
                    with torch.no_grad():
                        nat_logits = model(x)
                    x_adv = attack(x, nat_logits)
                    model.train()
                    logits = model(x)
                    loss = F.cross_entropy(logits, y) + s.trades_beta * trades_kl(model(x_adv), logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
                bar.advance(task, len(y))
        sched.step()
        losses.append(total / max(count, 1))
    model.eval()
    return losses
