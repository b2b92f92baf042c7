"""`kcg`: k-center greedy (Sener & Savarese, ICLR 2018), the RCS paper's KCG baseline (and DeepCore's).

The first pick is a seeded random candidate; every next pick is the candidate farthest, in Euclidean
distance between encoder features of the natural images, from its nearest pick so far. This is the 2-
approximation of the k-center problem: the subset covers the feature space evenly, whatever the density. Each
pick updates every candidate's distance to its nearest pick (one pass over the features, in blocks: O(n x
budget) distances, no n x n matrix). Weights: how many candidates each pick is nearest to.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.selectors.base import SELECTORS, Selection, SelectionContext, Selector, register_selector


def k_center_greedy(features: np.ndarray, budget: int, seed: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(picks in pick order, the distance from the farthest candidate to its nearest pick before each pick)
    over `features` (n, d); float32 distances, ties to the lowest index."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n = len(x)
    budget = min(int(budget), n)
    if budget <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    sq = (x * x).sum(1)
    nearest = torch.full((n,), float("inf"))
    picks, radii = [int(np.random.default_rng([seed, 31]).integers(n))], [float("inf")]
    for _ in range(budget - 1):
        c = x[picks[-1]]
        for lo in range(0, n, block):  # squared distances to the newest pick, kept as each point's minimum
            d2 = (sq[lo:lo + block] - 2 * (x[lo:lo + block] @ c) + sq[picks[-1]]).clamp_min(0)
            torch.minimum(nearest[lo:lo + block], d2, out=nearest[lo:lo + block])
        nearest[picks[-1]] = 0.0  # exactly: rounding can leave a pick a tiny distance from itself
        far = int(torch.argmax(nearest))
        radii.append(float(nearest[far].sqrt()))
        picks.append(far)
    return np.asarray(picks, dtype=np.int64), np.asarray(radii)


@register_selector
class KCenterSelector(Selector):
    name = "kcg"
    needs_model = True

    def select(self, ctx: SelectionContext) -> Selection:
        t = time.perf_counter()
        proxies = ctx.proxies.compute(ctx.pool_ids, need_gradients=False)
        timing = {"proxies": time.perf_counter() - t}
        t = time.perf_counter()
        picks, radii = k_center_greedy(proxies.features, ctx.budget, ctx.seed)
        timing["greedy"] = time.perf_counter() - t
        covering = float(radii[-1]) if len(radii) > 1 else None  # the largest distance to a pick, before the last
        return Selection(np.sort(proxies.candidate_ids[picks]), None, covering, timing, {"radius": covering})


SELECTORS.alias("kcenter", "kcg")  # the name users guess (issue 40)
