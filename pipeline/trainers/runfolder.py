"""What a run folder holds, and starting one afresh without touching anything the project did not write."""

from __future__ import annotations

from pathlib import Path

from pipeline.atomic import is_temporary
from pipeline.errors import PipelineError
from pipeline.locks import LOCK_NAME
from pipeline.progress import console
from pipeline.runlayout import RunLayout
from pipeline.shards.manifest import header_arrays, read_header


def is_run(run: Path) -> bool:
    return RunLayout(run).is_run()


def _manifest_files(folder: Path) -> list[Path]:
    """Manifest headers of ours in `folder` and the arrays they name."""
    out = []
    for header in folder.glob("*.json"):
        if read_header(header) is not None:
            out += [header, *header_arrays(header)]
    return out


def started(run: Path) -> bool:
    """Whether a run folder holds a checkpoint: an epoch of it finished."""
    layout = RunLayout(run)
    return layout.last.is_file() or (layout.checkpoints.is_dir() and any(layout.checkpoints.glob("epoch-*.pt")))


def start_fresh(run: Path | None, overwrite: bool) -> None:
    """Check `run` can take a new run; with `overwrite`, delete the files an earlier run wrote (only those)."""
    if run is None or not run.exists():
        return
    if not run.is_dir():
        raise PipelineError(f"--out {run}: exists and is not a folder; choose another run folder")
    entries = sorted(p.name for p in run.iterdir() if p.name != LOCK_NAME)
    if not entries:
        return
    if not is_run(run):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise PipelineError(f"--out {run}: holds files that are not a training run ({shown}); choose an empty or "
                            "new run folder")
    if not overwrite and not started(run):
        # interrupted before its first epoch ended: nothing to continue and nothing of value; starting it again
        # is what its interruption message promised (issue 40: --resume and a rerun sent each other round)
        console.print(f"{run}: no epoch of the run there had finished (no checkpoint); starting it afresh")
    elif not overwrite:
        raise PipelineError(f"{run}: already holds a run; continue it with --resume {run}, start afresh with "
                            "--overwrite, or choose another --out")
    for sub, pattern in RunLayout.OWNED.items():
        folder = run / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and (pattern.match(p.name) or is_temporary(p.name)):  # ours, or a write cut short
                    p.unlink()
    for sub in RunLayout.MANIFEST_FOLDERS:
        if (run / sub).is_dir():
            for p in _manifest_files(run / sub):
                p.unlink(missing_ok=True)
