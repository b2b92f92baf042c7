"""Selection beside training: at each selection point the trainer snapshots its model and hands it to a
background process that writes the next manifest into RUN/manifests/; the trainer keeps training on the current
subset and switches at the first epoch boundary after the manifest appears (`--manifests` semantics).

The schedule lives in `trainers.subsets.SelectionRounds` (a round is used `select.lag` epochs after its
snapshot; with `sync` at once, the paper's blocking behaviour); this module runs the rounds. The background process runs with its own thread
count and a lower scheduling priority (`select.threads`, `select.nice`), so on a CPU machine it takes the
cores training leaves idle. `select.processes = 0` runs each round in the trainer's own process at the snapshot (it
blocks training for the round's duration, with no process start: for rounds from recorded rows, which cost a
few percent of an epoch). `select.processes = N` runs each round as N processes in a process group of
their own (gloo) sharing the proxy pass, as `pipeline select` does under torchrun; `select.device` says
where (a dedicated GPU, `cuda:7`; one device per process, `cuda:6,cuda:7`; the trainer's own by default).
Per round the metrics log the selection time, how long the trainer waited (stall) and how many epochs the
subset was stale.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.checkpoint import save_checkpoint
from pipeline.errors import PipelineError
from pipeline.kv import parse_kv
from pipeline.registry import load_plugins
from pipeline.runlayout import RunLayout
from pipeline.runtime import become_worker, tune_allocator
from pipeline.selectors.base import create_selector, round_seed
from pipeline.selectors.run import run_selection
from pipeline.shards.manifest import read_header, round_path


def _worker(kwargs: dict, threads: int, nice: int, group: tuple | None = None) -> None:
    load_plugins()  # a fresh interpreter: the user's own selectors and methods register again
    become_worker()  # dies with the trainer; Ctrl-C is the trainer's to handle: it ends the round
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # ended by the trainer: exit cleanly, lock released
    if nice:
        os.nice(nice)
    tune_allocator()
    torch.set_num_threads(threads)
    if group is None:
        run_selection(**kwargs)
        return
    init_file, rank, world = group  # a round's own process group: the processes share its proxy pass
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run_selection(**kwargs)
    finally:
        dist.destroy_process_group()


def round_context():
    """Where round processes come from: a fork server that has imported this module (torch, the selectors and
    the data layer, never the training stack) once, so a round's process starts without paying `import torch`
    again (about 1-2.6 s on 2 CPU cores); each child is a fork of that clean server, with no thread pool
    started, no CUDA state and none of the trainer's memory. Started at once: its imports overlap the epochs
    before the first round."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    forkserver.ensure_running()
    return ctx


class _InProcess:
    """A round run in the trainer's own process (`select.processes = 0`): done when it is launched."""

    exitcode = 0

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    terminate = kill = start


class _Processes:
    """A round's selection processes, seen as one: alive while any is, failed when any failed."""

    def __init__(self, procs: list):
        self.procs = procs

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def join(self, timeout: float | None = None) -> None:
        for p in self.procs:
            p.join(timeout)

    def is_alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    @property
    def exitcode(self):
        codes = [p.exitcode for p in self.procs]
        return next((c for c in codes if c != 0), 0) if None not in codes else None

    def terminate(self) -> None:
        for p in self.procs:
            p.terminate()

    def kill(self) -> None:
        for p in self.procs:
            p.kill()


@dataclass
class Round:
    number: int
    epoch: int  # epoch at whose start the snapshot was taken
    snapshot: str
    manifest: str
    submitted: float = field(default_factory=time.time)
    process: object = None
    stall: float = 0.0
    rd_u: float | None = None  # RD(U) at the snapshot, when the run keeps a U
    rows: str | None = None  # the rows training recorded for it (select.proxies = recorded)


class SelectionScheduler:
    def __init__(self, layout: RunLayout, data: str, split: str, cfg, device: str, seed: int, pool: str | None = None,
                 validation: str | None = None, recorded: bool = False):
        self.layout, self.data, self.split, self.cfg, self.device, self.seed = layout, data, split, cfg, device, seed
        self.pool, self.validation = pool, validation
        self.recorded = recorded  # rounds take rows training recorded (select.proxies, resolved by the trainer)
        self.in_process_ok = True  # False under torchrun: a round in one rank's process would stall the others
        self.train_threads = torch.get_num_threads()
        self.params = parse_kv(cfg.params, "select.params")
        self.selector_name = cfg.selector
        self.pending: list[Round] = []
        self.next_round = 1
        self.manifest_dir = layout.manifests
        self.ctx = round_context() if self.processes > 0 else None

    def state(self) -> dict:
        return {"next_round": self.next_round,
                "pending": [{"number": r.number, "epoch": r.epoch, "snapshot": r.snapshot, "manifest": r.manifest,
                             "rows": r.rows} for r in self.pending]}

    def restore(self, state: dict) -> list[Round]:
        """After --resume: rounds that were running when the run stopped are started again from their snapshot
        (returned; a round whose manifest had appeared meanwhile is returned as finished)."""
        self.next_round = int(state.get("next_round", 1))
        rounds = []
        for r in state.get("pending", []):
            rnd = Round(r["number"], r["epoch"], r["snapshot"], r["manifest"], rows=r.get("rows"))
            if not Path(r["manifest"]).is_file() and Path(r["snapshot"]).is_file():
                self._launch(rnd)
            rounds.append(rnd)
        return rounds

    def _launch(self, rnd: Round, rows=None) -> None:
        kwargs = dict(data=self.data, selector=self.selector_name, fraction=self.cfg.fraction, out=rnd.manifest,
                      checkpoint=rnd.snapshot, split=self.split, seed=round_seed(self.seed, rnd.number), device=self.device,
                      params=self.params, round_no=rnd.number, epoch=rnd.epoch,
                      pool=self.pool, validation=self.validation, recorded=rnd.rows)
        n = self.processes
        if n == 0:  # in the trainer's process, with its threads: no process start (cheap rounds, recorded rows)
            run_selection(**{**kwargs, "recorded": rows if rows is not None else rnd.rows}, workers=self.cfg.workers)
            rnd.process = _InProcess()
            self.pending.append(rnd)
            return
        devices = [d.strip() for d in self.cfg.device.split(",") if d.strip()] or [self.device]
        group_file = Path(rnd.snapshot).with_suffix(".group")
        group_file.unlink(missing_ok=True)  # file:// rendezvous needs a fresh file
        procs = []
        for rank in range(n):
            group = (str(group_file), rank, n) if n > 1 else None
            args = ({**kwargs, "device": devices[rank % len(devices)], "workers": self.cfg.workers},
                    self.cfg.threads, self.cfg.nice, group)
            # Not daemonic: a round's proxy pass has loader workers of its own, which a daemonic process may not
            # start. The trainer ends running rounds itself (close(), on failure too); die_with_parent covers a kill.
            procs.append((self.ctx or round_context()).Process(target=_worker, args=args, daemon=False))
        rnd.process = _Processes(procs)
        rnd.process.start()
        self.pending.append(rnd)

    def submit(self, epoch: int, snapshot_state: dict, rows=None) -> Round:
        """Snapshot the model and start selecting the next round in the background; `rows`
        (selectors.recorded.RecordedRows) go beside the snapshot for the round to use."""
        stall = self.wait_all()  # never two selections at once: the machine is shared with training
        number = self.next_round
        self.next_round += 1
        snap = self.layout.snapshot(number)
        save_checkpoint(snap, snapshot_state)
        rnd = Round(number, epoch, str(snap), str(round_path(self.manifest_dir, number)))
        rnd.stall = stall
        if rows is not None and self.processes == 0:  # in this process: the rows need no file
            self._launch(rnd, rows)
            return rnd
        if rows is not None:
            rnd.rows = str(rows.save(self.layout.round_rows(number)))
        self._launch(rnd)
        return rnd

    def wait_for(self, rnd: Round) -> float:
        """Seconds waited for `rnd` to finish (0 when it has)."""
        start = time.perf_counter()
        if rnd in self.pending:
            rnd.process.join()
            self._finish(rnd)
        return time.perf_counter() - start

    def wait_all(self) -> float:
        start = time.perf_counter()
        for r in list(self.pending):
            r.process.join()
            self._finish(r)
        return time.perf_counter() - start

    def poll(self) -> list[Round]:
        done = [r for r in self.pending if not r.process.is_alive()]
        for r in done:
            self._finish(r)
        return done

    def share_cores(self, busy: bool) -> None:
        """On a CPU, the trainer leaves the selection processes their threads while a round is scheduled to
        run: two thread pools on the same cores stall each other (OpenMP threads spin), and a niced round would
        starve. The caller says when, by the schedule, so that the trainer's thread count is reproducible."""
        if not self.device.startswith("cpu"):
            return
        used = self.cfg.threads * self.processes  # 0 with rounds in process: the trainer keeps its threads
        torch.set_num_threads(max(1, self.train_threads - used) if busy else self.train_threads)

    def _finish(self, r: Round) -> None:
        if r in self.pending:
            self.pending.remove(r)
        Path(r.snapshot).with_suffix(".group").unlink(missing_ok=True)
        if r.process.exitcode != 0 or not Path(r.manifest).is_file():
            raise PipelineError(f"selection round {r.number} failed (exit code {r.process.exitcode}); its snapshot is "
                                f"{r.snapshot}: run `pipeline select --checkpoint {r.snapshot}` to see why")
        if r.rows:  # needed only while the round runs (a resume relaunches a running round with it)
            Path(r.rows).unlink(missing_ok=True)
        r.finished = time.time()

    @property
    def processes(self) -> int:
        """Processes per round; `select.processes = -1` (the default): none, in the trainer's process, for rounds
        that pass nothing through a model (random) or use recorded rows, since a process start and cores kept
        free for it cost more than such a round; else one."""
        if self.cfg.processes >= 0:
            return self.cfg.processes
        cheap = not create_selector(self.selector_name, **self.params).needs_model or self.recorded
        return 0 if cheap and self.in_process_ok else 1

    def switch_selector(self, name: str) -> None:
        """Later rounds use `name` (with its defaults) instead of the configured selector."""
        self.selector_name, self.params = name, {}

    def close(self) -> None:
        """End the running rounds and wait for them: they are not daemons, so the interpreter would wait too."""
        for r in self.pending:
            r.process.terminate()
        for r in self.pending:
            r.process.join(timeout=30)
            if r.process.is_alive():
                r.process.kill()
                r.process.join()
        self.pending.clear()
        self.share_cores(False)

    def record(self, r: Round, used_at_epoch: int) -> dict:
        header = read_header(r.manifest, strict=True)
        # 1-based epochs, as in the epoch records: snapshot at the start of epoch r.epoch + 1
        timing = header.get("timing", {})
        ready = Path(r.manifest).stat().st_mtime
        return {"kind": "selection", "round": r.number, "epoch": r.epoch + 1, "used_from_epoch": used_at_epoch + 1,
                "stale_epochs": used_at_epoch - r.epoch, "selection_s": timing.get("total"),
                "process_s": timing.get("process_s"), "device": timing.get("device"),
                "stall_s": r.stall, "rd_u": r.rd_u, "size": header.get("count"), "selector": header.get("producer", {}).get("name"),
                "submitted_at": r.submitted, "ready_at": ready,
                "wall_s": ready - r.submitted}  # process start included: what the round cost at most
