"""Finetuning protocols for a pre-trained encoder, registered by name: SLF, ALF and AFF (acl-and-eval.md).

With `noise_sigma` > 0 every input the classifier sees in finetuning (natural and adversarial) gets fresh
Gaussian noise first: Cohen et al.'s noise augmentation, which makes it the base of a smoothed classifier.

Independent of the training code on purpose: it imports the model definition, the attack and the data path
(loader, crop-and-flip), nothing from `pipeline.trainers`. The deployed model is the encoder through its eval
batch-norm branch plus a linear layer (zero-initialised, as the benchmark does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import PGD
from pipeline.augment import random_crop_flip, to_float
from pipeline.evaluation.recipes import FinetuneSettings
from pipeline.evaluation.smoothing import add_noise
from pipeline.losses import trades_kl
from pipeline.models.multibn import set_branch
from pipeline.progress import progress_bar
from pipeline.registry import Registry


class LinearClassifier(nn.Module):
    """Encoder + a linear layer. `forward(x)` uses the eval branch; `forward(x, branch)` another one."""

    def __init__(self, encoder: nn.Module, feature_dim: int, n_classes: int, branches: dict):
        super().__init__()
        self.encoder, self.fc, self.branches = encoder, nn.Linear(feature_dim, n_classes), dict(branches)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def features(self, x, branch: str | None = None):
        """Encoder features through the eval branch (or `branch`): the ones the linear layer is deployed on."""
        set_branch(self.encoder, branch or self.branches["eval"])
        return self.encoder(x)

    def forward(self, x, branch: str | None = None):
        return self.fc(self.features(x, branch))


PROTOCOLS: Registry[type["Protocol"]] = Registry("protocol", flag="--protocol")


def register_protocol(cls):
    return PROTOCOLS.register(cls)


class Protocol:
    name = "base"
    trains_encoder = False
    own_classifier = False  # True: evaluate the model's own classifier, no finetuning

    def __init__(self, model: LinearClassifier, s: FinetuneSettings, eps: float, step: float, gen):
        self.model, self.s, self.eps, self.step, self.gen = model, s, eps, step, gen

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        return add_noise(x, self.s.noise_sigma, self.gen) if self.s.noise_sigma > 0 else x


@register_protocol
class SLF(Protocol):
    """Standard linear finetuning: frozen encoder, classifier trained on clean images."""

    name = "slf"

    def loss(self, x, y):
        self.model.encoder.eval()
        with torch.no_grad():  # through the deployed branch: the one the test accuracy is measured through
            feats = self.model.features(self.noisy(x))
        return F.cross_entropy(self.model.fc(feats), y)


@register_protocol
class ALF(Protocol):
    """Adversarial linear finetuning: frozen encoder, classifier trained on PGD-10 images (eval mode)."""

    name = "alf"

    def __init__(self, *args):
        super().__init__(*args)
        self.attack = PGD(lambda x: self.model(self.noisy(x)), lambda out, y: F.cross_entropy(out.float(), y),
                          self.eps, self.step, self.s.train_steps, module=self.model, generator=self.gen)

    def loss(self, x, y):
        self.model.encoder.eval()
        x_adv = self.attack(x, y)
        with torch.no_grad():
            feats = self.model.features(self.noisy(x_adv))
        return F.cross_entropy(self.model.fc(feats), y)


@register_protocol
class AFF(Protocol):
    """Adversarial full finetuning: TRADES (beta 6) on the whole network; natural inputs pass the natural
    branch, adversarial ones the eval (adversarial) branch; the attack starts at x + 0.001 N(0, 1)."""

    name = "aff"
    trains_encoder = True

    def __init__(self, *args):
        super().__init__(*args)
        b = self.model.branches
        self.nat_branch = b[self.s.aff_natural_branch]
        self.attack = PGD(lambda x: self.model(self.noisy(x), b["eval"]), lambda out, p_nat: trades_kl(out, p_nat), self.eps,
                          self.step, self.s.train_steps, start="normal", start_std=self.s.aff_start_std,
                          module=self.model, generator=self.gen)

    def loss(self, x, y):
        self.model.eval()
        with torch.no_grad():
            nat_logits = self.model(self.noisy(x), self.nat_branch)
        x_adv = self.attack(x, nat_logits)
        self.model.train()
        logits = self.model(self.noisy(x), self.nat_branch)
        return F.cross_entropy(logits, y) + self.s.trades_beta * trades_kl(self.model(self.noisy(x_adv)), logits)


@register_protocol
class Direct(Protocol):
    """No finetuning: the pre-trained model's own classifier (its "logits" head, supervised methods such as
    ASCL) through the eval branch."""

    name = "direct"
    own_classifier = True


class OwnClassifier(nn.Module):
    """A model's own classifier head as a plain classifier: `forward(x)` -> logits through the eval branch."""

    def __init__(self, model: nn.Module, branch: str, head: str = "logits"):
        super().__init__()
        self.model, self.branch, self.head = model, branch, head
        self.branches = {"eval": branch}

    def forward(self, x):
        return self.model(x, self.branch, heads=(self.head,))[self.head]




def finetune(model: LinearClassifier, loader, protocol: str, s: FinetuneSettings, eps: float, step: float, device,
             progress=True) -> list[float]:
    """Train `model` in place by `protocol`; returns the mean training loss per epoch (the last epoch's model
    is the one evaluated)."""
    proto_cls = PROTOCOLS[protocol]
    for p in model.encoder.parameters():
        p.requires_grad_(proto_cls.trains_encoder)
    params = list(model.parameters()) if proto_cls.trains_encoder else list(model.fc.parameters())
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(s.milestones), s.gamma)
    gen = torch.Generator(device).manual_seed(s.seed)
    proto = proto_cls(model, s, eps, step, gen)
    losses = []
    for epoch in range(s.epochs):
        total, count = 0.0, 0
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{protocol} epoch {epoch + 1}/{s.epochs}", total=getattr(loader, "samples_per_epoch", None))
            for batch in loader:
                x = to_float(batch.images.to(device))
                x = random_crop_flip(x, gen, padding=max(1, x.shape[-1] // 8))  # 4 px at 32 px, as the reference
                y = batch.labels.to(device)
                loss = proto.loss(x, y)
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
