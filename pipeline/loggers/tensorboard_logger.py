"""TensorBoard event files (torch.utils.tensorboard, which needs the `tensorboard` package: `pipeline[loggers]`).

    RUN/tensorboard/events.out.tfevents.*          train/, epoch/, selection/ scalars against the global step
    RUN/tensorboard/eval-N/events.out.tfevents.*   each evaluation: its accuracies as hyper-parameter metrics
                                                   beside every setting of the run (the HParams tab)

A resumed run opens its writer with purge_step one past the checkpoint's global step: TensorBoard hides what
the stopped run logged after it, which the resumed run logs again, and keeps the checkpoint's own step.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.loggers.base import LOGGERS, Logger, evaluation_scalars, flat_settings, series

FOLDER = "tensorboard"


@LOGGERS.register
class TensorBoardLogger(Logger):
    name = "tensorboard"
    library = "torch.utils.tensorboard"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None = None):
        super().__init__(run_dir, config, resume_step)
        self._writer_class = self.require().SummaryWriter
        self.folder = self.run_dir / FOLDER
        self.writer = None  # opened at the first record: `pipeline eval` writes only its own folder

    def _open(self):
        if self.writer is None:
            # purge from the first step the resumed run logs again: the checkpoint's own step was logged
            # before the stop and is not redone (purging it lost one point per resume)
            purge = None if self.resume_step is None else self.resume_step + 1
            self.writer = self._writer_class(str(self.folder), purge_step=purge)
        return self.writer

    def log(self, record: dict, step: int) -> None:
        section, values = series(record)
        writer = self._open()
        for key, value in values.items():
            writer.add_scalar(f"{section}/{key}", value, global_step=step)

    def evaluation(self, result: dict, step: int) -> None:
        scalars = evaluation_scalars(result)
        if not scalars:
            return
        n = 1 + sum(1 for p in self.folder.glob("eval-*") if p.is_dir()) if self.folder.is_dir() else 1
        with self._writer_class(str(self.folder / f"eval-{n}")) as writer:
            settings = {**flat_settings(self.config), "eval.checkpoint_epoch": result.get("checkpoint_epoch") or 0,
                        "eval.protocol": result.get("protocol", "")}
            writer.add_hparams(settings, scalars, run_name=".")
            for key, value in scalars.items():
                writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
