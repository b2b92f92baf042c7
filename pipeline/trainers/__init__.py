"""Trainers registered by name; each method is a small subclass of `Trainer`."""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.trainers.acl import ACLTrainer, DynACLTrainer
from pipeline.trainers.base import Trainer
from pipeline.trainers.config import TrainConfig, load_config

TRAINERS: dict[str, type[Trainer]] = {"acl": ACLTrainer, "dynacl": DynACLTrainer}


def create_trainer(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Trainer:
    if cfg.method.name not in TRAINERS:
        raise PipelineError(f"method {cfg.method.name!r}: choose one of {', '.join(TRAINERS)}")
    return TRAINERS[cfg.method.name](cfg, resume=resume, progress=progress)


__all__ = ["TRAINERS", "TrainConfig", "Trainer", "create_trainer", "load_config"]
