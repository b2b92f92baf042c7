"""`random`: a seeded uniform subset; class-balanced (proportional per class) when asked and labels exist."""

from __future__ import annotations

import numpy as np

from pipeline.selectors.base import Selection, SelectionContext, Selector, class_budgets, register_selector


@register_selector
class RandomSelector(Selector):
    name = "random"
    defaults = {"per_class": False}

    def select(self, ctx: SelectionContext) -> Selection:
        rng = np.random.default_rng(ctx.seed)
        if not self.params["per_class"]:
            return Selection(np.sort(rng.choice(ctx.pool_ids, ctx.budget, replace=False)))
        labels = ctx.labels
        picks = [rng.choice(ctx.pool_ids[labels == c], b, replace=False)
                 for c, b in class_budgets(labels, ctx.budget).items()]
        return Selection(np.sort(np.concatenate(picks)))
