"""`facility`: facility location over a FAISS k-NN graph of proxy vectors, plus an optional robustness term.

Proxy vectors: the compressed per-sample head gradients of the checkpoint's method (`proxy=gradients`, the
default, averaged over `draws` = 4 augmentation and attack draws: CRAIG's gradient coverage), or encoder
features of the natural images (`proxy=features`, `preset=features`: a tenth of the cost, but its subsets raised
RD(U) more than random ones did in benchmarks/bench_selection.py). With `alignment_weight` > 0 the modular RCS term is added: each
candidate's alignment of its ACL gradient with the RD gradient of the validation set, scaled to [0, 1] and to
the size of a typical coverage gain; the sum stays monotone submodular. Weights: how many pool points each
pick represents (its points in the k-NN graph; points with no pick among their neighbours go to the most
similar pick by exact search). `partitions=m` (> 1) selects by GreeDi's partition and merge (`greedi_select`;
0: one part per torchrun process): the parts' greedies run on the ranks, the merge on every rank.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.dist import gather_objects, rank_and_world
from pipeline.errors import PipelineError
from pipeline.selectors.base import (Selection, SelectionContext, Selector, check_draws, class_budgets,
                                     register_selector)
from pipeline.selectors.greedy import maximize
from pipeline.selectors.knn import _normalise, cover_graph, knn_graph


def _assign_orphans(vectors: np.ndarray, picks: np.ndarray, owner: np.ndarray) -> np.ndarray:
    orphans = np.flatnonzero(owner < 0)
    if len(orphans) and len(picks):
        import faiss

        x = _normalise(vectors)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[picks])
        _, nearest = index.search(x[orphans], 1)
        owner = owner.copy()
        owner[orphans] = nearest[:, 0]
    return owner


def facility_select(vectors: np.ndarray, budget: int, k: int, optimizer: str, modular: np.ndarray | None,
                    backend: str, seed: int, device: str = "cpu", spread: bool = False):
    """(picks, weights, objective, timing) for one group of candidates. With `spread` under torch.distributed
    the ranks share the k-NN search and rank 0 alone runs the greedy (the others get None)."""
    t0 = time.perf_counter()
    graph, used = knn_graph(vectors, k, backend, seed, device, spread)
    if spread and rank_and_world()[0] != 0:
        return None
    t1 = time.perf_counter()
    result = maximize(graph, budget, optimizer, modular, seed)
    t2 = time.perf_counter()
    owner = _assign_orphans(vectors, result.picks, result.owner)
    weights = np.bincount(owner, minlength=len(result.picks)).astype(np.float32)
    return result.picks, weights, result.objective, {"knn": t1 - t0, "greedy": t2 - t1, "knn_backend": used}


def greedi_select(vectors: np.ndarray, budget: int, k: int, optimizer: str, modular: np.ndarray | None,
                  backend: str, seed: int, device: str, partitions: int):
    """GreeDi (Mirzasoleiman et al. 2013), partition and merge: the points are cut into `partitions` seeded
    random parts, each part's greedy picks `budget` from its own k-NN graph (under torch.distributed the parts
    are spread over the ranks), then one greedy picks `budget` from the union of those picks, judged on how
    well it covers every point (each point's k most similar members of the union). Each part's graph costs
    (n/m)^2 instead of n^2. (picks, weights, objective, timing) as `facility_select`."""
    t0 = time.perf_counter()
    rank, world = rank_and_world()
    parts = np.array_split(np.random.default_rng([seed, 17]).permutation(len(vectors)), partitions)
    local = {}
    for i, part in enumerate(parts):
        if i % world == rank and len(part):
            picks, _, _, _ = facility_select(vectors[part], min(budget, len(part)), k, optimizer,
                                             None if modular is None else modular[part], backend, seed + i, device)
            local[i] = part[picks]
    union = np.unique(np.concatenate([p for done in gather_objects(local) for p in done.values()]))
    t1 = time.perf_counter()
    graph, used = cover_graph(vectors, union, k, backend, seed, device)
    result = maximize(graph, budget, optimizer, None if modular is None else modular[union], seed)
    t2 = time.perf_counter()
    picks = union[result.picks]
    owner = _assign_orphans(vectors, picks, result.owner)
    weights = np.bincount(owner, minlength=len(picks)).astype(np.float32)
    return picks, weights, result.objective, {"knn": t1 - t0, "greedy": t2 - t1, "knn_backend": used,
                                              "union": int(len(union))}


@register_selector
class FacilitySelector(Selector):
    name = "facility"
    needs_model = True
    # gradients over 4 draws: valid (RD(U) below random's spread on every seed) at one of the settings measured
    # and never clearly worse than random at the others (benchmarks/RESULTS.md, bench_selection);
    # `preset=features` is the earlier default, coverage of features, worse than random
    defaults = {"k": 20, "optimizer": "lazy", "per_class": False, "alignment_weight": 0.0, "proxy": "gradients",
                "knn_backend": "auto", "attack_steps": 1, "partitions": 1, "draws": 4}
    presets = {"features": {"proxy": "features", "draws": 1}}

    @property
    def needs_validation(self) -> bool:
        return self.params["alignment_weight"] > 0

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        if p["proxy"] not in ("features", "gradients"):
            raise PipelineError(f"--proxy {p['proxy']!r}: choose features or gradients")
        timing = {}
        t = time.perf_counter()
        check_draws(p["draws"])
        proxies = ctx.proxies.compute(ctx.pool_ids, need_gradients=p["proxy"] == "gradients" or p["alignment_weight"] > 0,
                                      need_features=p["proxy"] == "features", draws=p["draws"],
                                      validation=p["alignment_weight"] > 0)
        timing["proxies"] = time.perf_counter() - t
        vectors = proxies.features if p["proxy"] == "features" else proxies.compressed_grads
        modular = None
        if p["alignment_weight"] > 0:
            align = proxies.alignment
            span = align.max() - align.min()
            scaled = (align - align.min()) / span if span > 0 else np.zeros_like(align)
            modular = p["alignment_weight"] * scaled * p["k"] / 2  # a typical coverage gain is O(k) similarities
        cand_ids = proxies.candidate_ids  # the pool less the validation part, when one was held out
        partitions = p["partitions"] if p["partitions"] > 0 else rank_and_world()[1]  # 0: one part per process
        groups = [np.arange(len(cand_ids))]
        budgets = [ctx.budget]
        if p["per_class"]:
            ss = ctx.shardset
            labels = ss.labels(ctx.split)[ss.rows_of(ctx.split, cand_ids)]
            per = class_budgets(labels, ctx.budget)
            groups = [np.flatnonzero(labels == c) for c in per]
            budgets = list(per.values())
        ids, weights, objective = [], [], 0.0
        timing.update(knn=0.0, greedy=0.0)
        for members, b in zip(groups, budgets):
            if b == 0:
                continue
            args = (vectors[members], b, p["k"], p["optimizer"], None if modular is None else modular[members],
                    p["knn_backend"], ctx.seed, ctx.proxies.device_name if ctx.proxies else "cpu")
            if partitions > 1:
                picks, w, obj, tm = greedi_select(*args, partitions)
            else:  # the ranks share the k-NN search; rank 0 runs the greedy
                done = facility_select(*args, spread=True)
                if done is None:
                    continue
                picks, w, obj, tm = done
            ids.append(cand_ids[members[picks]])
            weights.append(w)
            objective += obj
            timing["knn"] += tm["knn"]
            timing["greedy"] += tm["greedy"]
            timing["knn_backend"] = tm["knn_backend"]
        if not ids:  # not rank 0: the manifest is rank 0's to write
            return Selection(np.zeros(0, np.int64), np.zeros(0, np.float32), None, timing)
        return Selection(np.concatenate(ids), np.concatenate(weights), objective, timing,
                         {"validation_ids": proxies.validation_ids.tolist()})
