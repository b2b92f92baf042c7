"""Trainers registered by name; each method is one module with a small subclass of `Trainer` and the config
sections it reads. A new method is its module plus one line here."""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.trainers.acl import ACLTrainer, DynACLTrainer
from pipeline.trainers.advcl import AdvCLTrainer
from pipeline.trainers.ascl import ASCLTrainer
from pipeline.trainers.base import HeadRows, StepRecord, Trainer
from pipeline.trainers.config import METHOD_SECTIONS, TrainConfig, load_config
from pipeline.trainers.simclr import SimCLRTrainer
from pipeline.trainers.supervised import MARTTrainer, PGDATTrainer, TRADESTrainer

TRAINERS: dict[str, type[Trainer]] = {}


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    TRAINERS[cls.name] = cls
    METHOD_SECTIONS[cls.name] = cls.sections
    return cls


for _cls in (ACLTrainer, DynACLTrainer, SimCLRTrainer, AdvCLTrainer, ASCLTrainer, PGDATTrainer, TRADESTrainer,
             MARTTrainer):
    register_trainer(_cls)


def create_trainer(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Trainer:
    if cfg.method.name not in TRAINERS:
        raise PipelineError(f"method {cfg.method.name!r}: choose one of {', '.join(TRAINERS)}")
    TRAINERS[cfg.method.name].complete_config(cfg)
    cfg.validate()
    if cfg.data.split == "test":
        from pipeline.progress import console

        console.print("[yellow]warning:[/] training on the test split, which evaluation measures accuracy on")
    return TRAINERS[cfg.method.name](cfg, resume=resume, progress=progress)


__all__ = ["HeadRows", "StepRecord", "TRAINERS", "TrainConfig", "Trainer", "create_trainer", "load_config", "register_trainer"]
