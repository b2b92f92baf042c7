"""Greedy maximisation of facility location (+ a modular term) over a sparse similarity graph.

F(S) = sum_i max_{j in S} s_ij + lam * sum_{j in S} r_j, with s from a k-NN graph (row j = the points that
candidate j covers). Facility location is monotone submodular and adding a non-negative modular term keeps it
so, hence greedy keeps its (1 - 1/e) guarantee. The gain of j given the current coverage `cur` is
sum_{i in N(j)} max(0, s_ij - cur_i) + lam r_j, touching only j's neighbours.

Optimisers: `naive` (re-evaluate everything each step, for tests), `lazy` (max-heap of stale gains; the same
picks as naive up to ties), `stochastic` (each step evaluates a random sample of (n/k) ln(1/eps) candidates).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# The greedy loops are scalar and branchy: compiled with numba they run ~50x faster than numpy-per-candidate.
# numba is imported, and the loops compiled (or loaded from numba's cache), on the first greedy only: the
# import alone costs 0.3 s of every process that imports the selectors, an RCS round's included.
_COMPILED = False


def _compile() -> None:
    global _COMPILED, _gain, _take, _lazy, _best_of
    if _COMPILED:
        return
    import numba

    jit = numba.njit(cache=True)
    _gain, _take = jit(_gain), jit(_take)  # first: the loops below call them compiled
    _lazy, _best_of = jit(_lazy), jit(_best_of)
    _COMPILED = True



def _gain(j, indptr, indices, data, cur, mod):
    g = mod[j]
    for p in range(indptr[j], indptr[j + 1]):
        d = data[p] - cur[indices[p]]
        if d > 0:
            g += d
    return g


def _take(j, rank, indptr, indices, data, cur, owner):
    for p in range(indptr[j], indptr[j + 1]):
        i = indices[p]
        if data[p] > cur[i]:
            cur[i] = data[p]
            owner[i] = rank


def _lazy(indptr, indices, data, mod, budget, cur, owner, picks, gains):
    n = len(indptr) - 1
    heap = [(-_gain(0, indptr, indices, data, cur, mod), 0)]
    for j in range(1, n):
        heap.append((-_gain(j, indptr, indices, data, cur, mod), j))
    heapq.heapify(heap)
    count = 0
    while count < budget and len(heap) > 0:
        item = heapq.heappop(heap)
        j = item[1]
        fresh = _gain(j, indptr, indices, data, cur, mod)
        # at least as good as the best stale upper bound: by submodularity it is the best candidate
        if len(heap) == 0 or fresh >= -heap[0][0] - 1e-12:
            _take(j, count, indptr, indices, data, cur, owner)
            picks[count] = j
            gains[count] = fresh
            count += 1
        else:
            heapq.heappush(heap, (-fresh, j))
    return count


def _best_of(cand, indptr, indices, data, cur, mod):
    best, best_g = -1, -np.inf
    for c in cand:
        g = _gain(c, indptr, indices, data, cur, mod)
        if g > best_g:
            best, best_g = c, g
    return best, best_g


@dataclass
class GreedyResult:
    picks: np.ndarray  # indices in pick order
    gains: np.ndarray  # marginal gain of each pick
    coverage: np.ndarray  # final max similarity of every point to the selection
    owner: np.ndarray  # which pick covers each point best (-1: none within the graph)

    @property
    def objective(self) -> float:
        return float(self.gains.sum())


def _all_gains(g: sp.csr_matrix, cur: np.ndarray, modular: np.ndarray) -> np.ndarray:
    contrib = np.maximum(g.data - cur[g.indices], 0.0)
    sums = np.add.reduceat(contrib, g.indptr[:-1]) if g.nnz else np.zeros(g.shape[0])
    sums[np.diff(g.indptr) == 0] = 0.0
    return sums + modular


def maximize(graph: sp.csr_matrix, budget: int, optimizer: str = "lazy", modular: np.ndarray | None = None,
             seed: int = 0, epsilon: float = 0.01) -> GreedyResult:
    """`graph`: candidates x points (square when every point is a candidate; GreeDi's merge step covers all
    points with the union of the parts' picks)."""
    _compile()
    n = graph.shape[0]
    budget = min(budget, n)
    indptr, indices = graph.indptr.astype(np.int64), graph.indices.astype(np.int64)
    data = graph.data.astype(np.float64)
    mod = np.zeros(n) if modular is None else np.asarray(modular, dtype=np.float64)
    cur = np.zeros(graph.shape[1])
    owner = np.full(graph.shape[1], -1, dtype=np.int64)
    chosen = np.zeros(n, dtype=bool)
    picks, gains = [], []

    def take(j: int, gj: float) -> None:
        _take(j, len(picks), indptr, indices, data, cur, owner)
        chosen[j] = True
        picks.append(j)
        gains.append(gj)

    if optimizer == "naive":
        g64 = sp.csr_matrix((data, indices, indptr), shape=graph.shape)
        for _ in range(budget):
            all_g = _all_gains(g64, cur, mod)
            all_g[chosen] = -np.inf
            j = int(np.argmax(all_g))
            take(j, float(all_g[j]))
    elif optimizer == "lazy":
        out_p, out_g = np.empty(budget, dtype=np.int64), np.empty(budget)
        count = _lazy(indptr, indices, data, mod, budget, cur, owner, out_p, out_g) if n else 0
        picks, gains = out_p[:count].tolist(), out_g[:count].tolist()
    elif optimizer == "stochastic":
        rng = np.random.default_rng(seed)
        sample = max(1, int(math.ceil(n / max(budget, 1) * math.log(1 / epsilon))))
        for _ in range(budget):
            remaining = np.flatnonzero(~chosen)
            cand = remaining if len(remaining) <= sample else rng.choice(remaining, sample, replace=False)
            j, gj = _best_of(cand.astype(np.int64), indptr, indices, data, cur, mod)
            take(int(j), float(gj))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: naive, lazy or stochastic")
    return GreedyResult(np.asarray(picks, dtype=np.int64), np.asarray(gains), cur, owner)


def facility_value(graph: sp.csr_matrix, picks: np.ndarray) -> float:
    """F(S) without the modular term, from the graph directly (for comparisons with other libraries)."""
    if len(picks) == 0:
        return 0.0
    sub = graph[np.asarray(picks)]  # rows: what each pick covers
    return float(np.asarray(sub.max(axis=0).todense()).sum())
