"""Progress for every long-running stage: rich bars on a terminal, steady log lines elsewhere.

Under nohup, a pipe or a cluster scheduler (Slurm writes stderr to a file) a bar cannot draw, and a silent job
looks dead: there `progress_bar` gives `LogLines`, which prints one line per task every PIPELINE_LOG_EVERY
seconds (30) and one when the task ends: `train epoch 2/10: 1,536/3,000 (51%), 548 img/s, ETA 0:00:03`.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from pipeline.runtime import check_interrupt

console = Console(stderr=True, soft_wrap=True)  # never break a path across lines in logs
LOG_EVERY_VARIABLE = "PIPELINE_LOG_EVERY"


class RateColumn(ProgressColumn):
    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}" if speed else f"- {self.unit}", style="cyan")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogLines:
    """The part of rich's Progress the stages use (add_task, advance, update, a context), written as a line per
    task every `every` seconds and one when the block ends, for logs that are read later."""

    def __init__(self, unit: str = "img/s", every: float = 30.0, stream=None):
        self.unit, self.every, self.stream = unit, every, stream
        self._tasks: list[dict] = []

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            for t in self._tasks:
                if t["done"] > t["reported"]:
                    self._write(t, final=True)

    def add_task(self, description: str, total=None, completed=0, **_) -> int:
        now = time.perf_counter()
        self._tasks.append({"description": description, "total": total, "done": completed, "first": completed,
                            "reported": completed, "start": now, "last": now})
        return len(self._tasks) - 1

    def advance(self, task: int, advance=1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, advance=None, completed=None, total=None, description=None, **_) -> None:
        check_interrupt()
        t = self._tasks[task]
        if description is not None:
            t["description"] = description
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["done"] = completed
        if advance:
            t["done"] += advance
        if time.perf_counter() - t["last"] >= self.every:
            self._write(t)

    def _write(self, t: dict, final: bool = False) -> None:
        now = time.perf_counter()
        elapsed = max(now - t["start"], 1e-9)
        rate = (t["done"] - t["first"]) / elapsed
        done, total = t["done"], t["total"]
        where = f"{done:,}/{total:,} ({100 * done / total:.0f}%)" if total else f"{done:,}"
        if final:
            tail = f"done in {_clock(elapsed)}"
        else:
            tail = f"ETA {_clock((total - done) / rate)}" if total and rate > 0 else "ETA -"
        print(f"{t['description']}: {where}, {rate:,.0f} {self.unit}, {tail}", file=self.stream or sys.stderr,
              flush=True)
        t["last"], t["reported"] = now, done


class Bar(Progress):
    """rich's Progress, checking at every step for a stop a signal asked for (`runtime.check_interrupt`)."""

    def advance(self, task_id, advance: float = 1) -> None:
        check_interrupt()
        super().advance(task_id, advance)

    def update(self, task_id, **kwargs) -> None:
        check_interrupt()
        super().update(task_id, **kwargs)


def log_every() -> float:
    try:
        return max(0.0, float(os.environ.get(LOG_EVERY_VARIABLE, "30")))
    except ValueError:
        return 30.0


def progress_bar(enabled: bool = True, unit: str = "img/s"):
    """A progress bar on a terminal; log lines (`LogLines`) when stderr is a file or a pipe; nothing when not
    `enabled` (tests, ranks other than the first)."""
    if enabled and not sys.stderr.isatty():
        return LogLines(unit, log_every())
    return Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
