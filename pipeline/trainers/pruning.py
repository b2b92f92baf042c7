"""In-process pruning: subsets chosen in the trainer's own process from per-sample scores that training steps
report (`StepRecord.values`), at no extra forward pass. The core's `SubsetSource` interface, two kinds:

- `ScoredSubsets` (`--selector loss|el2n|margin|forgetting|grad-norm`): every `select.every` epochs after the
  warm-up, keep `select.fraction` of the pool by the score: its highest values (`order=highest`, default), its
  lowest (`order=lowest`), or evenly over `bins` equal-count score bins (`order=stratified`, seeded); samples
  never scored are kept first. `anneal=N`: the last N epochs train on all data again.
- `InfoBatchSubsets` (`--selector infobatch`, Qin et al. ICLR 2024): every epoch, a random share `r` (default
  0.5) of the samples whose last loss is below the mean is dropped and the kept ones among them weigh 1/(1 - r)
  in the loss (manifest weights, averaged over the batch as its code's `loss.mul(weights).mean()`: the
  manifest says `weighting = rescale`), so the expected gradient of an epoch is unchanged; pruning stops
  after the first 1 - `anneal` share of the epochs (default 0.125, the code's delta 0.875: 1 full epoch of 10,
  24 of 200). Any method whose step gives per-sample losses: the supervised ones, and the ACL family (each
  sample's contrastive loss, the mean of its rows' terms).

Scores, by name: `loss` (the method's per-sample training loss), `el2n` (||softmax - onehot|| on natural
images), `margin` (true logit minus the largest other: low = hard), `forgetting` (times a sample went from
correctly to wrongly classified under attack), `grad-norm` (last-layer gradient norm). All are kept per sample
id and saved in the checkpoint, so a resumed run prunes exactly as an uninterrupted one. Rounds are written
to RUN/manifests like background ones; pruned epochs read only the kept samples (indexed reads).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import PipelineError
from pipeline.kv import parse_kv
from pipeline.shards.manifest import Manifest, newest_valid, next_round, round_path
from pipeline.trainers.subsets import PRUNERS, SubsetSource, overlap, register_pruner

SCORES = {"loss": "loss", "el2n": "el2n", "margin": "margin", "forgetting": "correct_adv", "grad-norm": "grad_norm"}
ORDERS = ("highest", "lowest", "stratified")


class ScoreBook:
    """The last reported value of each score per sample id (NaN: never scored), and forgetting counts."""

    def __init__(self, pool_ids: np.ndarray):
        self.ids = np.sort(np.asarray(pool_ids, dtype=np.int64))
        self.values: dict[str, np.ndarray] = {}
        self.forgetting = np.zeros(len(self.ids))
        self.last_correct = np.full(len(self.ids), np.nan)

    def update(self, ids: np.ndarray, values: dict) -> None:
        pos = np.searchsorted(self.ids, ids)
        ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
        pos = pos[ok]
        for key, v in values.items():
            arr = self.values.setdefault(key, np.full(len(self.ids), np.nan))
            arr[pos] = np.asarray(v, dtype=np.float64)[ok]
        if "correct_adv" in values:
            now = np.asarray(values["correct_adv"], dtype=np.float64)[ok]
            self.forgetting[pos] += (self.last_correct[pos] == 1) & (now == 0)  # a forgetting event
            self.last_correct[pos] = now

    def lookup(self, key: str, ids: np.ndarray) -> np.ndarray:
        """The last value of `key` for each of `ids` (NaN: never scored, or not in the pool)."""
        out = np.full(len(ids), np.nan)
        arr = self.values.get(key)
        if arr is None or not len(self.ids):
            return out
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        ok = self.ids[pos] == ids
        out[ok] = arr[pos[ok]]
        return out

    def score(self, name: str) -> np.ndarray:
        """Per pool sample; higher = more worth keeping under `order=highest` (margin negated: low margin = hard)."""
        if name == "forgetting":
            return np.where(np.isnan(self.last_correct), np.nan, self.forgetting)
        v = self.values.get(SCORES[name])
        if v is None:
            return np.full(len(self.ids), np.nan)
        return -v if name == "margin" else v

    def state(self) -> dict:
        """Flat {name: tensor} (checkpoints hold tensors, loaded with weights_only=True)."""
        out = {"ids": self.ids, "forgetting": self.forgetting, "last_correct": self.last_correct,
               **{f"value:{k}": v for k, v in self.values.items()}}
        return {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in out.items()}

    def restore(self, state: dict) -> None:
        if "ids" not in state or not np.array_equal(state["ids"].cpu().numpy(), self.ids):
            return  # another pool: start scoring afresh
        self.forgetting = state["forgetting"].cpu().numpy().copy()
        self.last_correct = state["last_correct"].cpu().numpy().copy()
        self.values = {k[len("value:"):]: v.cpu().numpy().copy() for k, v in state.items() if k.startswith("value:")}


def prune(ids: np.ndarray, score: np.ndarray, budget: int, order: str = "highest", bins: int = 10,
          rng: np.random.Generator | None = None) -> np.ndarray:
    """The `budget` ids to keep (sorted). Unscored (NaN) samples first; then by `order`."""
    if order not in ORDERS:
        raise PipelineError(f"select.params order={order!r}: choose one of {', '.join(ORDERS)}")
    budget = min(max(int(budget), 0), len(ids))
    unscored = np.flatnonzero(np.isnan(score))
    if len(unscored) >= budget:
        return np.sort(ids[unscored[:budget]])
    scored = np.flatnonzero(~np.isnan(score))
    need = budget - len(unscored)
    if order == "stratified":
        rng = rng or np.random.default_rng(0)
        ranked = scored[np.argsort(score[scored], kind="stable")]
        groups = [g for g in np.array_split(ranked, min(bins, len(ranked))) if len(g)]
        share = np.floor(need * np.array([len(g) for g in groups]) / len(ranked)).astype(int)
        for i in np.argsort([-len(g) for g in groups], kind="stable")[: need - share.sum()]:
            share[i] += 1  # the remainder, one each to the largest bins
        chosen = np.concatenate([rng.choice(g, min(k, len(g)), replace=False) for g, k in zip(groups, share)])
    else:
        key = score[scored] if order == "highest" else -score[scored]
        chosen = scored[np.argsort(-key, kind="stable")[:need]]
    return np.sort(ids[np.concatenate([unscored, chosen]).astype(np.int64)])


def infobatch_draw(ids: np.ndarray, losses: np.ndarray, r: float, rng: np.random.Generator):
    """(kept ids, their weights), as InfoBatch's code prunes: of the samples whose loss is below the mean of the
    scored losses, int(keep x count) are kept, drawn without replacement (keep = 1 - r, clipped to [0.1, 1] as
    there), and weigh 1/keep; the others are all kept with weight 1. Unscored samples are kept with weight 1."""
    keep_ratio = min(1.0, max(0.1, 1.0 - r))
    scored = ~np.isnan(losses)
    low = np.zeros(len(ids), dtype=bool)
    if scored.any():
        low[scored] = losses[scored] < losses[scored].mean()
    low_at = np.flatnonzero(low)
    keep = ~low
    keep[rng.choice(low_at, int(keep_ratio * len(low_at)), replace=False)] = True
    weights = np.where(low, 1.0 / keep_ratio, 1.0)[keep]
    return ids[keep], weights.astype(np.float32)


def _params(trainer) -> dict:
    return parse_kv(trainer.cfg.select.params, "select.params")


class _InProcess(SubsetSource):
    """What both in-process sources share: the score book, the rounds they write, their records."""

    kind = "scored"

    def __init__(self, trainer, pool_ids):
        super().__init__(trainer)
        self.book = ScoreBook(pool_ids)
        self.folder = trainer.layout.manifests
        self.epochs = trainer.cfg.optim.epochs
        self._manifest, self._records, self._full = None, [], False

    def observe(self, batch, record) -> None:
        wanted = {k: v for k, v in record.values.items() if k in SCORES.values()}
        if not wanted:
            raise PipelineError(f"--selector {self.trainer.cfg.select.selector}: method {self.trainer.name} reports no "
                                "per-sample scores")
        ids = batch.ids.detach().cpu().numpy()
        vals = {k: v.detach().float().cpu().numpy() for k, v in wanted.items()}
        if self.trainer.dist.distributed:  # every rank keeps every rank's scores
            both = [None] * self.trainer.dist.world_size
            dist.all_gather_object(both, (ids, vals))
            ids = np.concatenate([b[0] for b in both])
            vals = {k: np.concatenate([b[1][k] for b in both]) for k in vals}
        self.book.update(ids, vals)

    def _write(self, epoch: int, keep: np.ndarray, weights=None, params=None, extra=None) -> None:
        cfg = self.trainer.cfg
        number = next_round(self.folder)
        m = Manifest.for_shardset(self.trainer.shardset, cfg.data.split, keep, weights=weights,
                                  producer={"name": cfg.select.selector, "params": params or {}}, round=number,
                                  epoch=epoch, fraction=len(keep) / len(self.book.ids),
                                  extra={"pool_size": int(len(self.book.ids)), "in_process": True, **(extra or {})})
        m.save(round_path(self.folder, number))
        previous, self._manifest, self._full = self._manifest, m, False
        self._records.append({"kind": "selection", "round": number, "epoch": epoch + 1, "used_from_epoch": epoch + 1,
                              "stale_epochs": 0, "selection_s": 0.0, "stall_s": 0.0, "size": len(keep),
                              "overlap": overlap(previous, m), "selector": cfg.select.selector})

    def current(self, epoch: int) -> Manifest | None:
        if self._full:
            return None
        if self._manifest is None:  # after --resume: the newest round this run wrote
            self._manifest = newest_valid(self.folder, self.trainer.shardset, self.trainer.cfg.data.split)
        return self._manifest

    def records(self) -> list[dict]:
        out, self._records = self._records, []
        return out

    def state(self) -> dict:
        return {"full": self._full, "tensors": self.book.state()}

    def restore(self, state: dict) -> None:
        self.book.restore(state.get("tensors") or {})
        self._full = bool(state.get("full", False))


class ScoredSubsets(_InProcess):
    """Registered once per score (`loss`, `el2n`, ...): the registered name is the score it prunes by."""

    name = "loss"

    def __init__(self, trainer, pool_ids):
        super().__init__(trainer, pool_ids)
        p = _params(trainer)
        self.score_name = self.name
        self.order = p.get("order", "highest")
        self.bins, self.anneal = int(p.get("bins", 10)), int(p.get("anneal", 0))
        if self.order not in ORDERS:
            raise PipelineError(f"select.params order={self.order!r}: choose one of {', '.join(ORDERS)}")
        self.warmup, self.every = trainer.cfg.select.schedule(self.epochs)

    def epoch_start(self, epoch: int) -> None:
        if self.anneal and epoch >= self.epochs - self.anneal:
            self._full = True  # the annealed final phase: all data
            return
        if epoch < self.warmup or (epoch - self.warmup) % self.every:
            return
        score = self.book.score(self.score_name)
        if epoch == self.warmup and np.isnan(score).all():
            return  # nothing scored yet (no warm-up): keep the whole pool for one round
        budget = max(1, int(round(self.trainer.cfg.select.fraction * len(self.book.ids))))
        rng = np.random.default_rng([self.trainer.cfg.run.seed, epoch])
        keep = prune(self.book.ids, score, budget, self.order, self.bins, rng)
        self._write(epoch, keep, params={"score": self.score_name, "order": self.order, "bins": self.bins,
                                         "anneal": self.anneal})


def infobatch_full_from(epochs: int, anneal: float) -> int:
    """The first 0-based epoch on all data. InfoBatch's sampler prunes while the epoch is at most delta x epochs
    (delta = 1 - anneal): at delta 0.875, 1 full epoch of 10, 24 of 200, none of 8 (rounded to 1e-9 against
    float error at whole products)."""
    return math.floor(round((1 - anneal) * epochs, 9)) + 1


class InfoBatchSubsets(_InProcess):
    name = "infobatch"
    fixed_fraction = False  # the subset size follows the losses, not select.fraction

    def __init__(self, trainer, pool_ids):
        super().__init__(trainer, pool_ids)
        p = _params(trainer)
        self.r, self.anneal = float(p.get("r", 0.5)), float(p.get("anneal", 0.125))
        if not 0 <= self.r < 1:
            raise PipelineError(f"select.params r={self.r}: the drop probability must be in [0, 1)")
        self.full_from = infobatch_full_from(self.epochs, self.anneal)

    def epoch_start(self, epoch: int) -> None:
        losses = self.book.values.get("loss")
        if epoch >= self.full_from or losses is None or np.isnan(losses).all():
            self._full = True
            return
        rng = np.random.default_rng([self.trainer.cfg.run.seed, epoch, 11])
        keep, weights = infobatch_draw(self.book.ids, losses, self.r, rng)
        # "rescale": the loop averages w x loss over the batch (InfoBatch's code), not over the weights
        self._write(epoch, keep, weights, params={"r": self.r, "anneal": self.anneal}, extra={"weighting": "rescale"})


for _score in SCORES:  # one pruner per score, registered before InfoBatch (the order help texts list them in)
    PRUNERS.add(_score, type(f"ScoredSubsets[{_score}]", (ScoredSubsets,), {"name": _score}))
register_pruner(InfoBatchSubsets)

__all__ = ["InfoBatchSubsets", "ScoreBook", "ScoredSubsets", "infobatch_draw", "infobatch_full_from", "prune"]
