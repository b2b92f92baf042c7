"""`pipeline select --watch RUN`: feed a running trainer from outside.

Whenever RUN/checkpoints/last.pt is `every` epochs newer than the last snapshot selected from, select from it
and write the next round into RUN/manifests/, which `pipeline train --manifests RUN/manifests` picks up at its
next epoch boundary. Stops when the run has finished its epochs (or on Ctrl-C).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.progress import console
from pipeline.runlayout import RunLayout
from pipeline.selectors.base import round_seed
from pipeline.selectors.run import run_selection
from pipeline.shards.manifest import next_round, round_path


def _identity(run: Path):
    """What tells the watched run from another: the folder's (device, inode) and its run marker's (inode, mtime)
    once the run has written it; None when the folder is gone. A folder made again under the same name can get
    the same inode back, but not the same marker."""
    try:
        st = run.stat()
    except OSError:
        return None
    try:
        mk = RunLayout(run).marker.stat()
        marker = (mk.st_ino, mk.st_mtime_ns)
    except OSError:
        marker = None
    return (st.st_dev, st.st_ino), marker


def _same_run(before, now) -> bool:
    """The folder is still the watched run: present, the same folder, and its marker unchanged (a marker that
    appears is the run starting, one that vanishes or changes is another run)."""
    if now is None or now[0] != before[0]:
        return False
    return before[1] is None or now[1] == before[1]


def watch_run(run: Path, data, selector: str, fraction: float, params: dict, seed: int, device, every: int = 1,
              poll_s: float = 5.0, max_rounds: int | None = None) -> int:
    """Select round after round for `run`; returns the number of rounds written."""
    run = Path(run)
    if not run.is_dir():
        raise PipelineError(f"{run}: no such run folder (start the run with `pipeline train --out {run} ...`)")
    last_pt, manifests = RunLayout(run).last, RunLayout(run).manifests
    seen_mtime, last_epoch, written = None, None, 0
    identity = _identity(run)
    console.print(f"watching {last_pt} (every {every} epoch(s)); Ctrl-C to stop")
    while max_rounds is None or written < max_rounds:
        now = _identity(run)
        if not _same_run(identity, now):  # deleted, or replaced by another folder of the same name
            what = "was deleted" if now is None else "was replaced by another folder"
            raise PipelineError(f"{run}: the run folder {what} while being watched; {written} round(s) were "
                                "written. Start the watch again for the new run")
        if identity[1] is None and now[1] is not None:
            identity = now  # the run wrote its marker: from now on that marker is the run
        if last_pt.is_file() and last_pt.stat().st_mtime != seen_mtime:
            seen_mtime = last_pt.stat().st_mtime
            ckpt = load_checkpoint(last_pt)
            epoch, total = int(ckpt["epoch"]), int((ckpt.get("config") or {}).get("optim", {}).get("epochs", 0))
            if last_epoch is None or epoch >= last_epoch + every:
                number = next_round(manifests)
                m = run_selection(data, selector, fraction, round_path(manifests, number), last_pt, seed=round_seed(seed, number),
                                  device=device, params=params, round_no=number, epoch=epoch)
                console.print(f"round {number}: {len(m):,} samples from the epoch-{epoch} snapshot "
                              f"in {m.extra['timing']['total']:.1f} s")
                last_epoch, written = epoch, written + 1
            if total and epoch >= total:
                console.print(f"{run} finished its {total} epochs; stopping")
                break
        time.sleep(poll_s)
    return written
