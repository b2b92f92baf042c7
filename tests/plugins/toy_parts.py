"""Parts registered from outside the package, as a user's own module would: a method with state beyond the
model (an EMA teacher), a selector and a measure. Loaded by tests through PIPELINE_PLUGINS, so background
selection processes (spawned, a fresh interpreter) register them too."""

from __future__ import annotations

import copy

import numpy as np
import torch

from pipeline.evaluation.measures import Measure, register_measure
from pipeline.losses import nt_xent
from pipeline.selectors import Selection, Selector, register_selector
from pipeline.trainers import register_trainer
from pipeline.trainers.base import StepRecord
from pipeline.trainers.simclr import NAT, SimCLRTrainer


@register_trainer
class EMATeacherTrainer(SimCLRTrainer):
    """SimCLR plus a distillation term towards an exponential moving average of the model (a teacher)."""

    name = "test-ema"
    sections = ("simclr",)
    momentum = 0.9

    def setup(self) -> None:
        super().setup()
        self.teacher = copy.deepcopy(self.model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def training_step(self, batch, epoch: int) -> StepRecord:
        with torch.no_grad():  # the teacher follows the weights of the step before this one
            for t, s in zip(self.teacher.state_dict().values(), self.model.state_dict().values()):
                t.copy_(self.momentum * t + (1 - self.momentum) * s) if t.is_floating_point() else t.copy_(s)
        images = batch.images.to(self.device)
        views = torch.cat([self.augment(images, self.gen), self.augment(images, self.gen)])
        (out,) = self.forward([views], [NAT])
        with torch.no_grad():
            target = self.teacher(views, NAT, heads=("proj",))["proj"]
        distill = (out["proj"] - target).pow(2).mean(1).view(2, -1).mean(0)
        losses = nt_xent(out["proj"], 0.5, reduction="sample") + distill
        return StepRecord(losses, {})

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])


@register_selector
class FirstIdsSelector(Selector):
    """The `budget` smallest ids of the pool: nothing to learn, everything to check."""

    name = "test-first"

    def select(self, ctx) -> Selection:
        return Selection(np.sort(ctx.pool_ids)[: ctx.budget])


@register_measure
class FlippedAccuracy(Measure):
    """Accuracy on horizontally flipped images."""

    name = "test-flip"
    title = "Flipped (test)"

    def correct(self, x, y):
        return self._count(x.flip(-1), y)
