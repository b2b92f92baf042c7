"""Trainers registered by name (`@register_trainer` where each class lives); each method is one module with a
small subclass of `Trainer`, the config sections it reads and, for selection, its objective
(pipeline.objectives). A new method is its module plus its import here."""

from __future__ import annotations

from pipeline.config import TrainConfig, load_config
from pipeline.progress import console
from pipeline.trainers import acl, simclr, advcl, ascl, supervised, pruning  # noqa: F401,I001  (registration, in this order)
from pipeline.trainers.base import TRAINERS, StepRecord, Trainer, list_trainers, register_trainer
from pipeline.trainers.optim import lr_at
from pipeline.trainers.subsets import check_rounds_land


def create_trainer(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Trainer:
    cls = TRAINERS.lookup(cfg.method.name)
    cls.complete_config(cfg)
    cfg.validate()
    check_rounds_land(cfg)
    if cfg.data.split == "test":
        console.print("[yellow]warning:[/] training on the test split, which evaluation measures accuracy on")
    o = cfg.optim
    if 0 < o.epochs <= o.warmup_epochs:
        peak = lr_at(o.epochs, o.lr, o.epochs, o.warmup_epochs, o.schedule, o.milestones, o.gamma)
        console.print(f"[yellow]warning:[/] optim.warmup_epochs = {o.warmup_epochs} is not below optim.epochs = "
                      f"{o.epochs}: the learning rate only rises, to {peak:.3g} of {o.lr:g} at the end, and never "
                      f"decays; shorten it (--set optim.warmup_epochs={max(0, o.epochs // 10)})")
    return cls(cfg, resume=resume, progress=progress)


__all__ = ["StepRecord", "TRAINERS", "TrainConfig", "Trainer", "create_trainer", "list_trainers", "load_config",
           "register_trainer"]
