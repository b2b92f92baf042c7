"""`rcs`: Robustness-aware Coreset Selection (Xu et al., NeurIPS 2023), the paper's greedy without the
reference code's defects (rcs.md).

Gain of a candidate (a sample, or a shuffled minibatch with `unit=batch`) = eta * <its ACL head gradient,
the RD gradient of the validation set U>, both compressed as in the reference. After each pick the head takes
one step of size eta along the pick's full gradient (once), and U's RD gradient is recomputed at the new head.
Candidate gradients stay those of the snapshot (the reference's approximation). Large pools are cut into
chunks; each gets picks in proportion to its size and starts again from the snapshot's head. The snapshot's
model is never modified.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.selectors.base import Selection, SelectionContext, Selector
from pipeline.selectors.proxies import head_linears, pick_gradient, rd_gradient


def rcs_greedy(proxies, head, picks_wanted: int, eta: float, unit: str, batch_size: int, rng) -> tuple[np.ndarray, list]:
    """Indices into proxies.candidate_ids, in pick order, and the gain of each pick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every op here is tiny: on 2 threads a pick took 89 ms, on 1 it takes 13 ms
    try:
        return _rcs_greedy(proxies, head, picks_wanted, eta, unit, batch_size, rng)
    finally:
        torch.set_num_threads(threads)


def _rcs_greedy(proxies, head, picks_wanted, eta, unit, batch_size, rng):
    n = len(proxies.candidate_ids)
    if unit == "batch":
        order = rng.permutation(n)
        groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:
        groups = [np.array([i]) for i in range(n)]
    cand = np.stack([proxies.compressed_grads[g].mean(0) for g in groups]) if unit == "batch" else proxies.compressed_grads
    work = copy.deepcopy(head)  # stepped during the greedy; the snapshot's head is left alone
    snapshot_head = copy.deepcopy(head)  # candidate gradients are those of the snapshot
    lins = head_linears(work)
    params = [p for lin in lins for p in (lin.weight, lin.bias)]
    val_grad = proxies.val_compressed
    available = np.ones(len(groups), dtype=bool)
    chosen, gains = [], []
    for _ in range(min(picks_wanted, len(groups))):
        scores = eta * (cand @ val_grad)
        scores[~available] = -np.inf
        best = int(np.argmax(scores))
        chosen.append(best)
        gains.append(float(scores[best]))
        available[best] = False
        members = groups[best]
        grads = pick_gradient(snapshot_head, proxies.row_feats[members], proxies.row_grads[members])
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= eta * g / len(members)  # one step, applied once (the reference stepped twice)
        val_grad = rd_gradient(work, *proxies.val_feats)
    picked = np.concatenate([groups[c] for c in chosen]) if chosen else np.zeros(0, np.int64)
    return picked, gains


class RCSSelector(Selector):
    name = "rcs"
    needs_model = True
    defaults = {"unit": "sample", "eta": 0.01, "chunk_size": 20000, "batch_size": 512}

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        if p["unit"] not in ("sample", "batch"):
            raise PipelineError(f"--unit {p['unit']!r}: choose sample or batch")
        rng = np.random.default_rng(ctx.seed)
        timing = {"proxies": 0.0, "greedy": 0.0}
        pool = np.asarray(ctx.pool_ids)
        chunks = [pool] if len(pool) <= p["chunk_size"] else np.array_split(rng.permutation(pool),
                                                                           -(-len(pool) // p["chunk_size"]))
        ids, gains, val_ids = [], [], []
        head = ctx.proxies.model.head
        for chunk in chunks:
            t = time.perf_counter()
            proxies = ctx.proxies.compute(chunk, need_gradients=True)
            timing["proxies"] += time.perf_counter() - t
            share = int(round(ctx.budget * len(chunk) / len(pool)))
            size = min(p["batch_size"], share) if p["unit"] == "batch" else 1
            picks = -(-share // size)
            t = time.perf_counter()
            picked, g = rcs_greedy(proxies, head, picks, p["eta"], p["unit"], size, rng)
            picked = picked[:share]  # the last batch may overshoot the budget
            timing["greedy"] += time.perf_counter() - t
            ids.append(proxies.candidate_ids[picked])
            gains += g
            val_ids.append(proxies.validation_ids)
        return Selection(np.sort(np.concatenate(ids)), None, float(np.sum(gains)), timing,
                         {"validation_ids": np.concatenate(val_ids).tolist(), "gains": gains[:1000]})
