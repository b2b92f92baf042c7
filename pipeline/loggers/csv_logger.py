"""CSV files of a run's curves, one per section (timm's summary.csv, per epoch and more):

    RUN/logs/train.csv  epoch.csv  selection.csv  ...  eval.csv

A column per field; a record with a field the file has not seen yet rewrites the file with the wider header
(rare: a method's extra term appears from its first record on). A resumed run first drops the rows of the
steps it is about to redo, as metrics.jsonl does.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.atomic import appending, atomic_path, move_aside
from pipeline.loggers.base import LOGGERS, Logger, evaluation_scalars, flat_settings
from pipeline.progress import console

FOLDER = "logs"


def _cell(value):
    return "" if value is None else value if isinstance(value, (int, float, str)) else str(value)


@LOGGERS.register
class CSVLogger(Logger):
    name = "csv"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None = None):
        super().__init__(run_dir, config, resume_step)
        self.folder = self.run_dir / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.headers: dict[Path, list[str]] = {}
        for path in self.folder.glob("*.csv"):
            try:
                rows = self._rows(path)
                if resume_step is not None and path.stem != "eval":
                    rows = [r for r in rows if r.get("global_step") in (None, "") or int(r["global_step"]) <= resume_step]
            except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
                # a damaged or foreign file where a curve goes never stops the run: kept aside, started afresh
                aside = move_aside(path)
                console.print(f"[yellow]{path}: unreadable as this logger's table ({type(exc).__name__}); kept as "
                              f"{aside.name}, starting a new one[/]")
                continue
            self._write(path, list(rows[0]) if rows else [], rows)

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def _write(self, path: Path, header: list[str], rows: list[dict]) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.headers[path] = header

    def _append(self, section: str, row: dict) -> None:
        path = self.folder / f"{section}.csv"
        header = self.headers.get(path)
        if header is None or not set(row) <= set(header):
            old = self._rows(path) if path.exists() else []
            self._write(path, list(dict.fromkeys([*(header or []), *row])), old)
            header = self.headers[path]
        with appending(path, newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerow({k: _cell(v) for k, v in row.items()})

    def log(self, record: dict, step: int) -> None:
        section = {"step": "train"}.get(record.get("kind"), record.get("kind", "other"))
        row = {"global_step": step, **{k: v for k, v in record.items() if k != "kind"}}
        self._append(section, row)

    def evaluation(self, result: dict, step: int) -> None:
        row = {"global_step": step, **evaluation_scalars(result),
               **{k: result.get(k) for k in ("checkpoint", "checkpoint_epoch", "protocol", "measures", "date")},
               **flat_settings(self.config)}
        self._append("eval", row)
