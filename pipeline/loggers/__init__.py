"""Loggers of a run's curves besides metrics.jsonl (`run.loggers`): tensorboard, wandb, csv; see base.py."""

from pipeline.loggers import csv_logger, tensorboard_logger, wandb_logger  # noqa: F401  (registers them)
from pipeline.loggers.base import (ALWAYS, LOGGERS, Logger, RunLoggers, check_loggers, evaluation_scalars,
                                   flat_settings, series)

__all__ = ["ALWAYS", "LOGGERS", "Logger", "RunLoggers", "check_loggers", "evaluation_scalars", "flat_settings",
           "series"]
