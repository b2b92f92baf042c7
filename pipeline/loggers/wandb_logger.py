"""Weights & Biases (`pipeline[loggers]`): offline unless the user configures it.

    run.wandb_mode = "offline"    the default: files under RUN/wandb/, uploaded later with `wandb sync`
                                  ("online" with an API key; the WANDB_MODE variable overrides the setting)
    run.wandb_project = "pipeline"

The run's id is kept in RUN/wandb/pipeline-run-id, so a resumed run and the evaluations of its checkpoints
continue the same W&B run. Every section is logged against the trainer's global step (`trainer/global_step`);
evaluations go into the run's summary, with every setting in its config.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pipeline.loggers.base import LOGGERS, Logger, evaluation_scalars, series

FOLDER = "wandb"
ID_FILE = "pipeline-run-id"
STEP = "trainer/global_step"


@LOGGERS.register
class WandbLogger(Logger):
    name = "wandb"
    library = "wandb"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None = None):
        super().__init__(run_dir, config, resume_step)
        self.wandb = self.require()
        self.folder = self.run_dir / FOLDER
        self.run = None

    def _run_id(self) -> str:
        path = self.folder / ID_FILE
        if path.is_file():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:8]  # W&B ids: letters and digits
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def _open(self):
        if self.run is None:
            settings = self.config.get("run", {})
            mode = os.environ.get("WANDB_MODE") or settings.get("wandb_mode", "offline")
            self.run = self.wandb.init(project=settings.get("wandb_project") or "pipeline", dir=str(self.run_dir),
                                       id=self._run_id(), resume="allow", mode=mode, config=self.config,
                                       name=self.run_dir.name, reinit="create_new")
            self.run.define_metric(STEP)
            self.run.define_metric("*", step_metric=STEP)
        return self.run

    def log(self, record: dict, step: int) -> None:
        section, values = series(record)
        self._open().log({STEP: step, **{f"{section}/{k}": v for k, v in values.items()}})

    def evaluation(self, result: dict, step: int) -> None:
        run = self._open()
        scalars = evaluation_scalars(result)
        run.summary.update({**scalars, "eval/checkpoint_epoch": result.get("checkpoint_epoch")})
        run.log({STEP: step, **scalars})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
