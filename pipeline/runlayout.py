"""The one home of a run folder's names (as `shards/layout.py` is the shard set's): every stage that writes or
reads a run (trainer, selection rounds, eval, certify, report, experiment, --overwrite) asks `RunLayout`.

    RUN/.pipeline-run.json        marker: this folder is a run of ours
    RUN/config.toml               the effective configuration
    RUN/metrics.jsonl             one JSON record per line: epochs, steps, selection rounds, accounting
    RUN/checkpoints/last.pt       and epoch-NNNN.pt
    RUN/manifests/round-NNNN.json the subsets the run trained on (headers; arrays beside them)
    RUN/snapshots/round-NNNN.pt   the model a background round selected with (.group: its rendezvous file;
                                  .rows: the rows training recorded for it; book.rows: all recorded rows)
    RUN/selection/pool.json       the split less the held-out U, and U (validation.json), for selectors with U
    RUN/results.json              every evaluation of the run's checkpoints
    RUN/classifiers/*.pt          finetuned classifiers (`pipeline eval`)
    RUN/certify/NAME/             certify.tsv, certify.json, certified.png (`pipeline certify`)
    RUN/tensorboard/, RUN/wandb/, RUN/logs/*.csv   the curves of run.loggers (pipeline.loggers)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = ".pipeline-run.json"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
LAST = "last.pt"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunLayout":
        """The run a checkpoint belongs to (RUN/checkpoints/x.pt, RUN/classifiers/x.pt), else its folder."""
        ckpt = Path(checkpoint)
        return cls(ckpt.parent.parent if ckpt.parent.name in ("checkpoints", "classifiers") else ckpt.parent)

    # -- files ------------------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:04d}.pt"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, number: int) -> Path:
        return self.snapshots / f"round-{number:04d}.pt"

    def round_rows(self, number: int) -> Path:
        """The rows training recorded, handed to round `number` (select.proxies = recorded)."""
        return self.snapshots / f"round-{number:04d}.rows"

    @property
    def row_book(self) -> Path:
        """Every pool sample's latest recorded rows, saved with each checkpoint so that a resume has them."""
        return self.snapshots / "book.rows"

    @property
    def selection(self) -> Path:
        return self.root / "selection"

    @property
    def pool(self) -> Path:
        return self.selection / "pool.json"

    @property
    def validation(self) -> Path:
        return self.selection / "validation.json"

    @property
    def classifiers(self) -> Path:
        return self.root / "classifiers"

    @property
    def certify(self) -> Path:
        return self.root / "certify"

    def certifications(self) -> list[Path]:
        """The certify.json of every certification of this run, by name."""
        return sorted(self.certify.glob("*/certify.json"))

    # -- what --overwrite may delete --------------------------------------------------------------------
    # sub-folder -> names the trainer writes there; manifests (with the arrays their headers name) in
    # MANIFEST_FOLDERS. Files of other names are never touched.
    OWNED = {
        ".": re.compile(rf"^({re.escape(CONFIG)}|{re.escape(METRICS)}|{re.escape(RESULTS)}|{re.escape(MARKER)}"
                        rf"|\.{re.escape(RESULTS)}\.lock)$"),  # the lock of results.json (record_lock)
        "checkpoints": re.compile(r"^(last|epoch-\d{4})\.pt$"),
        # .group: a multi-process round's rendezvous; .rows and book.rows: recorded selection rows
        "snapshots": re.compile(r"^(round-\d{4}\.(pt|group|rows)|book\.rows)$"),
        # run.loggers: TensorBoard's event files, the CSV files, the W&B run id (W&B's own run folders stay:
        # an offline run not yet synced is the user's)
        "tensorboard": re.compile(r"^events\.out\.tfevents\.[\w.\-]+$"),
        "logs": re.compile(r"^[a-z_]+\.csv$"),
        "wandb": re.compile(r"^pipeline-run-id$"),
    }
    MANIFEST_FOLDERS = ("manifests", "selection")

    def is_run(self) -> bool:
        return self.marker.is_file() or self.config.is_file()


__all__ = ["CONFIG", "LAST", "MARKER", "METRICS", "RESULTS", "RunLayout"]
