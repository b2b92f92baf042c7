"""`rcs`: Robustness-aware Coreset Selection (Xu et al., NeurIPS 2023), the paper's greedy without the
reference code's defects (rcs.md).

Gain of a candidate (a sample, or a shuffled minibatch with `unit=batch`) = eta * <its ACL head gradient,
the RD gradient of the validation set U>, both compressed as in the reference. A pick moves a working copy of
the head one step along the pick's full gradient, applied once (the reference stepped twice): for a minibatch
eta times its mean gradient, as the reference; for one sample eta / `reference_batch` times its gradient, so
that a selected image moves the head as far as it does inside a reference minibatch of 512. U's RD gradient
is then recomputed at the moved head: after every pick (`refreshes=0`, the paper's greedy), or `refreshes`
times per greedy, taking the best gains of a block of picks between refreshes (the default: the per-pick
choices at a fraction of the cost; `tests/test_selectors.py` measures how close). Candidate gradients stay
those of the snapshot (the reference's approximation). Large pools are cut into chunks of `chunk_size`
(0: one greedy over the whole pool, as the reference on CIFAR); each chunk gets picks in proportion to its
size and starts again from the snapshot's head (its own generator: a chunk's picks do not depend on which
process runs it, so under torchrun whole chunks go to ranks). The snapshot's model is never modified.

Defaults beyond the paper, measured with benchmarks/bench_selection.py: each candidate's gradient (and U's)
is the mean over `draws` = 4 augmentation and attack draws (one draw's scores correlate 0.44 between two
passes, four draws' 0.75), and candidates are ranked by cosine (`normalize`), so that a hard sample's large
gradient is not by itself a large gain. `preset=fast`: one draw, inner products (the earlier default).
`preset=reference` gives the reference's choices: minibatch units of 512, one greedy over the whole pool
with one U, the training attack (5 steps) for the candidates' views, a refresh after every pick.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from pipeline.dist import gather_objects, rank_and_world
from pipeline.errors import PipelineError
from pipeline.selectors.base import Selection, SelectionContext, Selector, check_draws, register_selector
from pipeline.selectors.proxies import head_linears, pick_gradient, rd_gradient


def block_sizes(picks: int, refreshes: int) -> list[int]:
    """Picks per block between refreshes of U's gradient: 1 each when refreshes is 0 (or >= picks)."""
    if picks <= 0:
        return []
    if refreshes <= 0 or refreshes >= picks:
        return [1] * picks
    return [len(b) for b in np.array_split(np.arange(picks), refreshes)]


def rcs_greedy(proxies, head, picks_wanted: int, eta: float, unit: str, batch_size: int, rng,
               refreshes: int = 0, reference_batch: int = 512, normalize: bool = False) -> tuple[np.ndarray, list]:
    """Indices into proxies.candidate_ids, in pick order, and the gain of each pick. `normalize`: rank by
    the cosine of each candidate's compressed gradient with U's (times U's norm) instead of the inner product,
    so that a large gradient (a hard sample) is not by itself a large gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every op here is tiny: on 2 threads a pick took 89 ms, on 1 it takes 13 ms
    try:
        return _rcs_greedy(proxies, head, picks_wanted, eta, unit, batch_size, rng, refreshes, reference_batch,
                           normalize)
    finally:
        torch.set_num_threads(threads)


def _rcs_greedy(proxies, head, picks_wanted, eta, unit, batch_size, rng, refreshes, reference_batch, normalize):
    n = len(proxies.candidate_ids)
    if unit == "batch":
        order = rng.permutation(n)
        whole = n - n % batch_size if n >= batch_size else n  # full minibatches only: every pick fills its share
        groups = [order[i:i + batch_size] for i in range(0, whole, batch_size)]
        cand = np.stack([proxies.compressed_grads[g].mean(0) for g in groups])
    else:
        groups = [np.array([i]) for i in range(n)]
        cand = proxies.compressed_grads
    if normalize:
        cand = cand / np.maximum(np.linalg.norm(cand, axis=1, keepdims=True), 1e-12)
    cand = cand.astype(np.float64)  # once: U's gradient is float64, and `cand @` it cast a copy at every block
    work = copy.deepcopy(head)  # stepped during the greedy; the snapshot's head is left alone
    snapshot_head = copy.deepcopy(head)  # candidate gradients are those of the snapshot
    params = [p for lin in head_linears(work) for p in (lin.weight, lin.bias)]
    val_grad = proxies.val_compressed
    available = np.ones(len(groups), dtype=bool)
    chosen, gains = [], []
    for size in block_sizes(min(picks_wanted, len(groups)), refreshes):
        scores = eta * (cand @ val_grad)
        scores[~available] = -np.inf
        best = np.argsort(-scores, kind="stable")[:size]
        chosen += best.tolist()
        gains += scores[best].tolist()
        available[best] = False
        step = [torch.zeros_like(p) for p in params]
        if unit == "batch":  # each minibatch: eta times its mean gradient
            for g in best:
                members = groups[g]
                grads = pick_gradient(snapshot_head, proxies.row_feats[members], proxies.row_grads[members],
                                      proxies.row_branches)
                step = [s + gr / len(members) for s, gr in zip(step, grads)]
        else:  # one sample: eta times its share of a reference minibatch
            members = np.asarray(best)
            grads = pick_gradient(snapshot_head, proxies.row_feats[members], proxies.row_grads[members],
                                  proxies.row_branches)
            step = [gr / reference_batch for gr in grads]
        with torch.no_grad():
            for p, s in zip(params, step):
                p -= eta * s
        val_grad = rd_gradient(work, *proxies.val_feats, branches=proxies.branches, kind=proxies.divergence)
    picked = np.concatenate([groups[c] for c in chosen]) if chosen else np.zeros(0, np.int64)
    return picked, gains


@register_selector
class RCSSelector(Selector):
    name = "rcs"
    needs_model = True
    needs_validation = True  # type: ignore[assignment]
    # draws=4 and normalize: the RCS variant whose subsets did best against random in bench_selection (still
    # not better than random on every seed: benchmarks/RESULTS.md); `preset=fast` the earlier default
    defaults = {"unit": "sample", "eta": 0.01, "chunk_size": 20000, "batch_size": 512, "refreshes": 16,
                "reference_batch": 512, "attack_steps": 1, "draws": 4, "normalize": True}
    presets = {"reference": {"unit": "batch", "batch_size": 512, "chunk_size": 0, "refreshes": 0, "attack_steps": 5,
                             "draws": 1, "normalize": False},
               "fast": {"draws": 1, "normalize": False}}

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        if p["unit"] not in ("sample", "batch"):
            raise PipelineError(f"--unit {p['unit']!r}: choose sample or batch")
        check_draws(p["draws"])
        rng = np.random.default_rng(ctx.seed)
        timing = {"proxies": 0.0, "greedy": 0.0}
        pool = np.asarray(ctx.pool_ids)
        chunk = p["chunk_size"] if p["chunk_size"] > 0 else len(pool)
        chunks = [pool] if len(pool) <= chunk else np.array_split(rng.permutation(pool), -(-len(pool) // chunk))
        rank, world = rank_and_world()
        # Under torch.distributed whole chunks go to ranks (each greedy starts from the snapshot's head, so a
        # chunk's picks do not depend on where it runs); with fewer chunks than ranks the proxies of each chunk
        # are spread instead and every rank runs the (identical) greedy.
        by_chunk = world > 1 and len(chunks) >= world
        done = {}
        for i, part in enumerate(chunks):
            if by_chunk and i % world != rank:
                continue
            t = time.perf_counter()
            proxies = ctx.proxies.compute(part, need_gradients=True, need_features=False, spread=not by_chunk,
                                          draws=p["draws"])
            timing["proxies"] += time.perf_counter() - t
            share = int(round(ctx.budget * len(part) / len(pool)))
            size = min(p["batch_size"], share) if p["unit"] == "batch" else 1
            picks = -(-share // size) if size else 0
            t = time.perf_counter()
            picked, g = rcs_greedy(proxies, ctx.proxies.head, picks, p["eta"], p["unit"], size,
                                   np.random.default_rng([ctx.seed, i]), p["refreshes"], p["reference_batch"],
                                   p["normalize"])
            picked = picked[:share]  # the last batch may overshoot the budget
            timing["greedy"] += time.perf_counter() - t
            done[i] = (proxies.candidate_ids[picked], g, proxies.validation_ids)
        if by_chunk:
            merged = {}
            for part_done in gather_objects(done):
                merged.update(part_done)
            done = merged
        ids = [done[i][0] for i in range(len(chunks))]
        gains = [x for i in range(len(chunks)) for x in done[i][1]]
        val_ids = [done[i][2] for i in range(len(chunks))]
        return Selection(np.sort(np.concatenate(ids)), None, float(np.sum(gains)), timing,
                         {"validation_ids": np.unique(np.concatenate(val_ids)).tolist(), "gains": gains[:1000]})
