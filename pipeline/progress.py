"""Rich progress bars with an items-per-second column, shared by every long-running stage."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # never break a path across lines in logs


class RateColumn(ProgressColumn):
    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}" if speed else f"- {self.unit}", style="cyan")


def progress_bar(enabled: bool = True, unit: str = "img/s") -> Progress:
    """A progress bar; shown only when `enabled` and stderr is a terminal (quiet in CI logs and tests)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and sys.stderr.isatty()),
        transient=False,
    )
