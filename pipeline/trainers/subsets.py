"""Where a run's training subset comes from, epoch by epoch: one `SubsetSource` interface, five kinds.

- `WholeSplit`: every sample of the split (less a held-out validation part, when the run keeps one).
- `FixedManifest`: one manifest for the whole run (`--manifest`).
- `ManifestFolder`: the newest valid `round-NNNN.json` of a folder at each epoch boundary (`--manifests`,
  fed by `pipeline select --watch` or anything else).
- `SelectionRounds`: the run selects its own rounds in a background process (`--selector rcs|facility|random`):
  full data for the warm-up, then a snapshot every `every` epochs, read back as a manifest folder.
- `ScoredSubsets`, `InfoBatchSubsets` (pruning.py): in-process pruners (`--selector loss|el2n|margin|forgetting|
  grad-norm|infobatch`): per-sample scores that training steps report are gathered, and the next subset is
  picked from them in the trainer's own process.

Rank 0 decides; the trainer broadcasts the manifest path so every rank trains on the same subset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import declare_choices
from pipeline.errors import PipelineError
from pipeline.kv import parse_kv
from pipeline.progress import console
from pipeline.registry import Registry
from pipeline.selectors import SELECTORS, create_selector, draw_validation, selector_needs_validation
from pipeline.selectors.background import Round, SelectionScheduler
from pipeline.objectives import OBJECTIVES, objective_of
from pipeline.selectors.proxies import divergence_on
from pipeline.selectors.recorded import RowBook
from pipeline.shards.manifest import Manifest, newest_valid, round_path, round_paths


class SubsetSource:
    kind = "base"
    fixed_fraction = True  # its subsets are select.fraction of the pool (InfoBatch's follow the losses)

    def __init__(self, trainer):
        self.trainer = trainer

    def epoch_start(self, epoch: int) -> None:
        """Rank 0, at every epoch boundary before the subset is chosen (selection points go here)."""

    def current(self, epoch: int) -> Manifest | None:
        """Rank 0: the subset to train on this epoch (None: the whole split)."""
        return None

    def observe(self, batch, record) -> None:
        """Every rank, after every step: the batch and its `StepRecord` (per-sample values by batch.ids)."""

    def epoch_end(self, epoch: int, summary: dict) -> None:
        """Every rank, after the epoch, with the epoch's summary (images, seconds, subset)."""

    def records(self) -> list[dict]:
        """Rank 0: metrics records to log (selection rounds, ...), each returned once."""
        return []

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class WholeSplit(SubsetSource):
    kind = "split"

    def __init__(self, trainer, pool: Manifest | None = None):
        super().__init__(trainer)
        self.pool = pool  # the split less a held-out part, when the run keeps one

    def current(self, epoch: int) -> Manifest | None:
        return self.pool


class FixedManifest(SubsetSource):
    kind = "manifest"

    def __init__(self, trainer, path: str):
        super().__init__(trainer)
        self.manifest = Manifest.load(path)
        self.manifest.check_against(trainer.shardset)

    def current(self, epoch: int) -> Manifest | None:
        return self.manifest


class ManifestFolder(SubsetSource):
    """Newest valid round of a folder; a manifest is loaded once, and again only when a newer round appears."""

    kind = "manifests"

    def __init__(self, trainer, folder: str | Path, fallback: Manifest | None = None):
        super().__init__(trainer)
        self.folder, self.fallback = Path(folder), fallback
        self._cached: Manifest | None = None
        self._cached_key = None

    def current(self, epoch: int) -> Manifest | None:
        rounds = round_paths(self.folder)
        key = (str(rounds[0][1]), rounds[0][1].stat().st_mtime_ns) if rounds else None
        if key is None:
            return self.fallback
        if key != self._cached_key:
            found = newest_valid(self.folder, self.trainer.shardset, self.trainer.cfg.data.split)
            self._cached, self._cached_key = found, key
        return self._cached if self._cached is not None else self.fallback


def check_rounds_land(cfg) -> None:
    """One line, before any work, when a run's selection rounds could never be trained on: the first is taken at
    the start of epoch `warmup` and used from epoch warmup + lag, which must come before the run ends (issue
    40: such an arm trained on all data and was found out in the results table)."""
    name = cfg.select.selector
    if not name or name not in SELECTORS:
        return
    warmup, _ = cfg.select.schedule(cfg.optim.epochs)
    lag = 0 if cfg.select.sync else cfg.select.lag
    if warmup + lag >= cfg.optim.epochs:
        raise PipelineError(f"select.selector = {name!r}: its first round is taken at epoch {warmup + 1} and trained "
                            f"on from epoch {warmup + lag + 1}, after this run's {cfg.optim.epochs} epochs, so no "
                            "subset would ever be used; lower select.warmup (or select.lag, or set select.sync), or "
                            "train for more epochs")


class SelectionRounds(ManifestFolder):
    """Background selection from snapshots (pipeline.selectors.background), on a fixed schedule: the round
    whose snapshot is taken at the start of epoch e is trained on from epoch e + `select.lag` (0 with `sync`);
    if it is not ready then, the trainer waits (recorded as the round's stall). Which subset an epoch trains on
    never depends on timing, and neither do the trainer's threads: on a CPU it leaves the round its cores from
    the snapshot until the epoch the round is due, whether or not it finished sooner (torch's float results
    depend on the thread count). Two runs with the same seed give the same manifests and weights."""

    kind = "selection"

    def __init__(self, trainer, pool: Manifest | None, validation: Manifest | None):
        super().__init__(trainer, trainer.layout.manifests, fallback=pool)
        cfg = trainer.cfg
        self.warmup, self.every = cfg.select.schedule(cfg.optim.epochs)
        self.lag = 0 if cfg.select.sync else cfg.select.lag
        self.last_selection_epoch = -1
        self.scheduler = SelectionScheduler(
            trainer.layout, cfg.data.source(), cfg.data.split, cfg.select, str(trainer.device), cfg.run.seed,
            pool=None if pool is None else str(pool.path), validation=None if validation is None else str(validation.path),
            recorded=self._records(trainer))
        self.scheduler.in_process_ok = not trainer.dist.distributed
        if self.scheduler.processes == 0 and trainer.dist.distributed:
            raise PipelineError("select.processes = 0 (rounds in the trainer's process) works in one process; under "
                                "torchrun give rounds processes of their own: select.processes = 1")
        self.rounds, self._pending_records, self._subset_round = {}, [], None
        self.validation = validation
        self.book = self._row_book(pool) if self.scheduler.recorded else None
        self._rd_last: tuple[int, float] | None = None  # (epochs done, RD(U) then)
        # accounting: what selection cost and what training on subsets saved, estimated from measured epochs
        self.full_images, self.full_per_image = None, None
        self.saved_images, self.saved_s, self.selection_s, self.warned = 0, 0.0, 0.0, False

    def is_selection_epoch(self, epoch: int) -> bool:
        return epoch >= self.warmup and (epoch - self.warmup) % self.every == 0

    def _unused(self) -> list:
        return [r for n, r in sorted(self.rounds.items()) if self._subset_round is None or n > self._subset_round]

    @staticmethod
    def _records(trainer) -> bool:
        """Whether rounds take the rows training records (select.proxies; auto: wherever the selector, the
        method and the run can, said in one line where a model-based selector cannot)."""
        cfg = trainer.cfg.select
        if cfg.proxies == "fresh":
            return False
        sel = create_selector(cfg.selector, **parse_kv(cfg.params, "select.params"))
        method = objective_of(trainer.name) if trainer.name in OBJECTIVES else None
        why = ("it passes the candidates' images itself" if not sel.takes_recorded_rows else
               f"method {trainer.name!r} does not say how its steps give selection rows (ACL, DynACL and SimCLR do)"
               if method is None or method.rows_from_step is None else
               "it works in one process without run.compile for now"
               if trainer.dist.distributed or trainer.cfg.run.compile else None)
        if cfg.proxies == "recorded" and why:
            raise PipelineError(f"select.proxies = recorded: {why}; use select.proxies = fresh")
        if why and sel.needs_model and trainer.is_main:
            console.print(f"selection rounds pass the candidates through each snapshot (fresh proxies): {why}")
        return sel.needs_model and not why

    def _row_book(self, pool: Manifest | None) -> RowBook:
        t = self.trainer
        self.objective = objective_of(t.name)
        book = RowBook(pool.ids if pool is not None else t.shardset.ids(t.cfg.data.split), t.cfg.select.row_epochs,
                       t.shardset.fingerprint)
        if t.layout.row_book.is_file():  # a resume: the rows recorded before the stop
            book.load(t.layout.row_book)
        return book

    def observe(self, batch, record) -> None:
        """Record the step's rows for selection (select.proxies = recorded): the selection head's inputs of the
        step's passes, their rows taken with the head in eval mode (each row passes it on its own)."""
        fwd = self.trainer.branch_forward
        if self.book is None or fwd.capture_head is None:
            return
        passes, fwd.captured = [(f.float(), b) for f, b in fwd.captured], []
        head = fwd.capture_head
        was = head.training
        head.eval()
        try:
            rows = self.objective.rows_from_step(head, passes, len(batch.ids), self.trainer.selection_settings())
        finally:
            head.train(was)
        self.book.add(batch.ids.cpu().numpy() if hasattr(batch.ids, "cpu") else batch.ids, rows, self._epoch)

    def divergence(self, epochs_done: int) -> float | None:
        """RD(U) of the model now (after `epochs_done` epochs), measured once per epoch: what RCS promises to
        lower, logged so that a run shows whether selection works (None when the run keeps no U)."""
        if self.validation is None:
            return None
        if self._rd_last is None or self._rd_last[0] != epochs_done:
            t = self.trainer
            self._rd_last = (epochs_done, divergence_on(t.model, t.shardset, t.cfg.data.split, self.validation.ids,
                                                        t.name, t.budget.eps, t.device))
            if epochs_done == 0:
                self._pending_records.append({"kind": "divergence", "epoch": 0, "rd_u": self._rd_last[1]})
        return self._rd_last[1]

    def epoch_start(self, epoch: int) -> None:
        self._epoch = epoch
        if self.book is not None:
            self.trainer.branch_forward.capture_head = self.trainer.model.heads[self.objective.head]
        if epoch == 0:
            self.divergence(0)  # the starting point of the run's RD(U) curve
        # a round that would be due after the last epoch is never used: not started
        if (self.is_selection_epoch(epoch) and epoch > self.last_selection_epoch
                and epoch + self.lag < self.trainer.cfg.optim.epochs):
            age = self.trainer.cfg.select.row_age
            rows = None if self.book is None else self.book.recorded(epoch - age if age >= 0 else 0)
            rnd = self.scheduler.submit(epoch, self.trainer.snapshot(epoch), rows)
            rnd.rd_u = self.divergence(epoch)
            self.rounds[rnd.number] = rnd
            self.last_selection_epoch = epoch
        self.scheduler.poll()  # a failed round is reported now, not when it is due
        self.scheduler.share_cores(any(r.epoch + self.lag > epoch for r in self._unused()))

    def current(self, epoch: int) -> Manifest | None:
        due = [r for r in self._unused() if r.epoch + self.lag <= epoch]
        if due:
            rnd = due[-1]  # the newest due round (an older one, never trained on, is skipped)
            rnd.stall += self.scheduler.wait_for(rnd)
            self.scheduler.share_cores(any(r.epoch + self.lag > epoch for r in self._unused() if r is not rnd))
            m = Manifest.load(rnd.manifest)
            m.check_against(self.trainer.shardset)
            rec = self.scheduler.record(rnd, epoch)
            rec["overlap"] = overlap(self._cached, m)
            self._pending_records.append(rec)
            self.selection_s += rec.get("wall_s") or 0.0
            self._subset_round, self._cached = rnd.number, m
            self._check_worth(rec, len(m))
        if self._subset_round is None:
            return self.fallback
        if self._cached is None:  # resumed after the round was first used
            self._cached = Manifest.load(round_path(self.folder, self._subset_round))
            self._cached.check_against(self.trainer.shardset)
        return self._cached

    def _check_worth(self, rec: dict, size: int) -> None:
        """Say once per run when a round costs more than the training its subset saves until the next round."""
        if self.full_per_image is None or self.warned:
            return
        pool = self.full_images or size
        expected = self.every * max(pool - size, 0) * self.full_per_image
        cost = rec.get("wall_s") or 0.0  # from snapshot to manifest, process start included
        if cost <= expected:
            return
        self.warned = True
        fallback = self.trainer.cfg.select.fallback
        console.print(f"[yellow]selection round {rec['round']} took {cost:.1f} s, more than the about {expected:.1f} s "
                      f"of training its subset saves over {self.every} epoch(s)[/]" +
                      ("; switching to random subsets for the rest of the run (select.fallback)" if fallback else
                       "; `--set select.fallback=random` would switch to random subsets"))
        self._pending_records.append({"kind": "selection_not_worth", "round": rec["round"], "selection_s": cost,
                                      "expected_saving_s": expected, "fallback": fallback or None})
        if fallback:
            self.scheduler.switch_selector(fallback)

    def epoch_end(self, epoch: int, summary: dict) -> None:
        if self.book is not None:  # saved with the checkpoint that follows: a resume records on from here
            self.book.save(self.trainer.layout.row_book)
            summary["recorded_rows"] = int((self.book.latest >= 0).sum())
        if self.trainer.is_main and self.validation is not None:
            summary["rd_u"] = self.divergence(epoch + 1)
        if summary.get("subset_round") is None:  # a full-data epoch measures what an image costs
            self.full_images = summary["images"]
            self.full_per_image = summary["seconds"] / max(summary["images"], 1)
            return
        if self.full_per_image is None:
            return
        not_attacked = max((self.full_images or 0) - summary["images"], 0)
        self.saved_images += not_attacked
        self.saved_s += not_attacked * self.full_per_image
        self._pending_records.append({"kind": "accounting", "epoch": epoch + 1, "images_not_attacked": not_attacked,
                                      "saved_s_total": self.saved_s, "selection_s_total": self.selection_s,
                                      "net_s": self.saved_s - self.selection_s,
                                      "images_not_attacked_total": self.saved_images})

    def records(self) -> list[dict]:
        out, self._pending_records = self._pending_records, []
        return out

    # What a resume needs to end with the records of an uninterrupted run: rounds finished but not yet used
    # (their selection record is written when a later epoch first trains on them), and the accounting so far.
    _ACCOUNTING = ("full_images", "full_per_image", "saved_images", "saved_s", "selection_s", "warned")

    def state(self) -> dict:
        rounds = {str(n): {"epoch": r.epoch, "snapshot": r.snapshot, "manifest": r.manifest, "submitted": r.submitted,
                           "stall": r.stall, "rd_u": r.rd_u}
                  for n, r in self.rounds.items() if self._subset_round is None or n > self._subset_round}
        return {**self.scheduler.state(), "last_selection_epoch": self.last_selection_epoch, "rounds": rounds,
                "subset_round": self._subset_round, "pending_records": self._pending_records,
                "selector": self.scheduler.selector_name, "params": self.scheduler.params,
                **{k: getattr(self, k) for k in self._ACCOUNTING}}

    def restore(self, state: dict) -> None:
        self.last_selection_epoch = int(state.get("last_selection_epoch", -1))
        self._subset_round = state.get("subset_round")
        self._pending_records = list(state.get("pending_records") or [])
        for key in self._ACCOUNTING:
            if key in state:
                setattr(self, key, state[key])
        if state.get("selector") and state["selector"] != self.scheduler.selector_name:  # fell back to random
            self.scheduler.switch_selector(state["selector"])
        self.rounds = {int(n): Round(int(n), r["epoch"], r["snapshot"], r["manifest"], r.get("submitted", 0.0),
                                     stall=r.get("stall", 0.0), rd_u=r.get("rd_u"))
                       for n, r in (state.get("rounds") or {}).items()}
        for rnd in self.scheduler.restore(state):  # rounds running at the stop start again
            if rnd.process is not None or rnd.number not in self.rounds:
                if rnd.number in self.rounds:
                    rnd.rd_u = self.rounds[rnd.number].rd_u
                self.rounds[rnd.number] = rnd

    def close(self) -> None:
        self.scheduler.close()


def held_out_parts(trainer) -> tuple[Manifest | None, Manifest | None]:
    """(pool, validation) of a run whose selector keeps a validation part U: U is drawn once per run (seeded),
    saved as RUN/selection/validation.json, and the pool (the split less U) as RUN/selection/pool.json; every
    epoch, warm-up included, trains on the pool only. (None, None) when the selector needs no U."""
    cfg = trainer.cfg
    if not selector_needs_validation(cfg.select.selector, cfg.select.params):
        return None, None
    pool_path, val_path = trainer.layout.pool, trainer.layout.validation
    ss, split = trainer.shardset, cfg.data.split
    if pool_path.is_file() and val_path.is_file():
        pool, val = Manifest.load(pool_path), Manifest.load(val_path)
        pool.check_against(ss)
        val.check_against(ss)
        return pool, val
    ids = ss.ids(split)
    val_ids = draw_validation(ids, cfg.select.validation_fraction, cfg.run.seed)
    if trainer.dist.is_main:
        meta = {"validation_fraction": cfg.select.validation_fraction, "seed": cfg.run.seed}
        Manifest.for_shardset(ss, split, val_ids, producer={"name": "validation", "params": meta}).save(val_path)
        Manifest.for_shardset(ss, split, np.setdiff1d(ids, val_ids),
                              producer={"name": "pool", "params": meta}).save(pool_path)
    trainer.dist.barrier()
    return Manifest.load(pool_path), Manifest.load(val_path)


# In-process pruners by --selector name (pipeline.trainers.pruning registers them).
PRUNERS: Registry[type[SubsetSource]] = Registry("pruner", flag="--selector")


def register_pruner(cls: type[SubsetSource]) -> type[SubsetSource]:
    return PRUNERS.register(cls)


declare_choices("select.selector", lambda: [*SELECTORS, *PRUNERS], empty_ok=True, also=lambda v: v in SELECTORS)


def overlap(previous: Manifest | None, current: Manifest) -> float | None:
    """The share of `current`'s samples that the previous round's subset held too (None for the first)."""
    if previous is None or len(current) == 0:
        return None
    return float(np.isin(current.ids, previous.ids).mean())


def create_subset_source(trainer) -> SubsetSource:
    cfg = trainer.cfg
    sel = cfg.select.selector
    if sel:
        if cfg.data.manifest or (cfg.data.manifests and Path(cfg.data.manifests) != trainer.layout.manifests):
            raise PipelineError("choose either --selector (the run selects its own subsets) or --manifest/--manifests")
        if not 0 < cfg.select.fraction <= 1:
            raise PipelineError(f"--fraction {cfg.select.fraction}: must be in (0, 1]")
        if sel in PRUNERS:
            return PRUNERS[sel](trainer, trainer.shardset.ids(cfg.data.split))
        create_selector(sel, **parse_kv(cfg.select.params, "select.params"))  # fail now, not in a background process
        pool, validation = held_out_parts(trainer)
        if not trainer.dist.is_main:
            return ManifestFolder(trainer, trainer.layout.manifests, fallback=pool)
        return SelectionRounds(trainer, pool, validation)
    if cfg.data.manifest:
        return FixedManifest(trainer, cfg.data.manifest)
    if cfg.data.manifests:
        return ManifestFolder(trainer, cfg.data.manifests)
    return WholeSplit(trainer)


__all__ = ["FixedManifest", "ManifestFolder", "PRUNERS", "SelectionRounds", "SubsetSource", "WholeSplit",
           "create_subset_source", "held_out_parts", "register_pruner"]
