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


def watch_run(run: Path, data, selector: str, fraction: float, params: dict, seed: int, device, every: int = 1,
              poll_s: float = 5.0, max_rounds: int | None = None) -> int:
    """Select round after round for `run`; returns the number of rounds written."""
    run = Path(run)
    if not run.is_dir():
        raise PipelineError(f"{run}: no such run folder (start the run with `pipeline train --out {run} ...`)")
    last_pt, manifests = RunLayout(run).last, RunLayout(run).manifests
    seen_mtime, last_epoch, written = None, None, 0
    console.print(f"watching {last_pt} (every {every} epoch(s)); Ctrl-C to stop")
    while max_rounds is None or written < max_rounds:
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
