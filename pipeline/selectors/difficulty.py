"""`easy` and `ccs`: subsets chosen by how hard each sample is for the snapshot, from the same proxies as RCS.

Difficulty is the norm of the sample's full gradient at the selection head under the checkpoint's method
(`proxies.head_gradient_norms`: the training loss's rows, averaged over `draws` augmentation and attack draws).

- `easy`: the lowest-difficulty samples (EasyCore, 2025: for adversarial training, low gradient-norm samples
  beat other coresets; the RCS alignment score, measured in benchmarks/bench_selection.py, favours hard ones).
- `ccs`: coverage-centric coreset selection (Zheng et al., ICLR 2023): drop the hardest `hard_cut` share, cut
  the rest into `strata` equal-width difficulty bins and spend the budget evenly over the bins, the smallest
  first (a bin smaller than its share is taken whole and its leftover goes to the others), sampling uniformly
  within a bin (seeded). Equal-width bins are the paper's; the cut defaults to its 0.1 for moderate budgets.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.errors import PipelineError
from pipeline.selectors.base import Selection, SelectionContext, Selector, check_draws, register_selector
from pipeline.selectors.proxies import head_gradient_norms


def difficulty(ctx: SelectionContext, draws: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(candidate ids, their difficulty, timing)."""
    t = time.perf_counter()
    proxies = ctx.proxies.compute(ctx.pool_ids, need_gradients=True, need_features=False, draws=draws,
                                  validation=False)
    t_proxies = time.perf_counter() - t
    norms = head_gradient_norms(ctx.proxies.head, proxies.row_feats, proxies.row_grads, proxies.row_branches)
    return proxies.candidate_ids, norms, {"proxies": t_proxies, "scores": time.perf_counter() - t - t_proxies}


def stratified_budget(sizes: np.ndarray, budget: int) -> np.ndarray:
    """CCS's allocation: visit bins from the smallest, give each min(its size, the remaining budget / the
    remaining bins)."""
    take = np.zeros(len(sizes), dtype=np.int64)
    left = budget
    order = np.argsort(sizes, kind="stable")
    for i, b in enumerate(order):
        take[b] = min(int(sizes[b]), left // (len(order) - i))
        left -= take[b]
    return take


class _DifficultySelector(Selector):
    needs_model = True


@register_selector
class EasySelector(_DifficultySelector):
    name = "easy"
    defaults = {"draws": 1, "attack_steps": 1}

    def select(self, ctx: SelectionContext) -> Selection:
        check_draws(self.params["draws"])
        ids, norms, timing = difficulty(ctx, self.params["draws"])
        keep = np.argsort(norms, kind="stable")[: ctx.budget]
        return Selection(np.sort(ids[keep]), None, float(norms[keep].sum()), timing,
                         {"difficulty_kept": [float(norms[keep].mean()), float(norms.mean())]})


@register_selector
class CCSSelector(_DifficultySelector):
    name = "ccs"
    defaults = {"draws": 1, "attack_steps": 1, "hard_cut": 0.1, "strata": 50}

    def select(self, ctx: SelectionContext) -> Selection:
        check_draws(self.params["draws"])
        p = self.params
        if not 0 <= p["hard_cut"] < 1:
            raise PipelineError(f"--hard_cut {p['hard_cut']!r}: the share of hardest samples dropped, in [0, 1)")
        if not isinstance(p["strata"], int) or p["strata"] < 1:
            raise PipelineError(f"--strata {p['strata']!r}: a whole number of difficulty bins, at least 1")
        ids, norms, timing = difficulty(ctx, p["draws"])
        order = np.argsort(norms, kind="stable")
        kept = order[: max(ctx.budget, len(order) - int(round(p["hard_cut"] * len(order))))]
        edges = np.linspace(norms[kept].min(), norms[kept].max(), p["strata"] + 1)
        bins = np.clip(np.searchsorted(edges, norms[kept], side="right") - 1, 0, p["strata"] - 1)
        take = stratified_budget(np.bincount(bins, minlength=p["strata"]), ctx.budget)
        rng = np.random.default_rng(ctx.seed)
        picks = [rng.choice(kept[bins == b], take[b], replace=False) for b in range(p["strata"]) if take[b]]
        chosen = np.concatenate(picks) if picks else np.zeros(0, np.int64)
        return Selection(np.sort(ids[chosen]), None, None, timing,
                         {"difficulty_kept": [float(norms[chosen].mean()), float(norms.mean())]})
