"""The selector interface: `select(context) -> Selection`, one small class per method, registered by name."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import PipelineError


@dataclass
class SelectionContext:
    """What a selector may use. `pool_ids` are the candidates; `proxies` computes model-based inputs lazily."""

    shardset: object
    split: str
    pool_ids: np.ndarray
    budget: int
    seed: int = 0
    params: dict = field(default_factory=dict)
    proxies: object = None  # a proxies.ProxyComputer, when the selector needs a model
    validation_ids: np.ndarray | None = None  # U, held out of the pool, when the selector needs one

    @property
    def labels(self) -> np.ndarray:
        ss = self.shardset
        return ss.labels(self.split)[ss.rows_of(self.split, self.pool_ids)]


@dataclass
class Selection:
    ids: np.ndarray
    weights: np.ndarray | None = None
    objective: float | None = None
    timing: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


class Selector:
    """Parameters are spelled the same everywhere: `pipeline select --k 20`, `select.params = "k=20"`.
    `preset=NAME` applies a named set of parameters first (explicit ones still win)."""

    name = "base"
    needs_model = False
    defaults: dict = {}
    presets: dict[str, dict] = {}

    def __init__(self, **params):
        preset = params.pop("preset", None)
        if preset is not None and preset not in self.presets:
            raise PipelineError(f"selector {self.name!r} preset {preset!r}: choose one of "
                                f"{', '.join(self.presets) or '(it has none)'}")
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise PipelineError(f"selector {self.name!r} takes no {', '.join(sorted(unknown))} "
                                f"(it takes {', '.join([*self.defaults, 'preset'])})")
        self.params = {**self.defaults, **(self.presets.get(preset) or {}), **params}
        if preset is not None:
            self.params["preset"] = preset

    @property
    def needs_validation(self) -> bool:
        """Whether the selector scores candidates against a held-out validation part U of the pool."""
        return False

    def select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError


def class_budgets(labels: np.ndarray, budget: int) -> dict[int, int]:
    """Budget per class proportional to its size (largest remainders), summing to `budget`."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * budget
    base = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - base))[: budget - base.sum()]:
        base[i] += 1
    return {int(c): int(b) for c, b in zip(classes, base)}
