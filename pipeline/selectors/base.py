"""The selector interface: `select(context) -> Selection`, one small class per method, registered by name."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import PipelineError
from pipeline.kv import parse_kv
from pipeline.registry import Registry


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
    # whether its proxies may come from rows training recorded (select.proxies); a selector that makes its
    # own pass over the images (alignment) says False
    takes_recorded_rows = True
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


SELECTORS: Registry[type[Selector]] = Registry("selector", flag="--selector")


def register_selector(cls: type[Selector]) -> type[Selector]:
    return SELECTORS.register(cls)


def create_selector(name: str, **params) -> Selector:
    return SELECTORS.create(name, **params)


def list_selectors() -> list[str]:
    return SELECTORS.names()


def selector_needs_validation(name: str, params: str | dict) -> bool:
    return create_selector(name, **parse_kv(params, "select.params")).needs_validation


def check_draws(draws) -> int:
    """The `draws` parameter of the proxy-based selectors: a whole number, at least 1."""
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise PipelineError(f"--draws {draws!r}: a whole number of proxy draws, at least 1")
    return draws


def round_seed(run_seed: int, number: int) -> int:
    """The seed of a run's selection round `number`. Distinct for every (run seed, round) pair: `run_seed + number`
    made run seed 1's rounds run seed 0's shifted by one (the same random subsets a round apart), so the seeds of an
    experiment were not independent draws. Run seed 0 keeps the seeds it always had."""
    return int(run_seed) * 1_000_003 + int(number)


def draw_validation(pool_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """RCS's held-out validation part U of a pool: the one formula every caller draws it by (sorted ids, at
    least 2, a seeded stream of its own)."""
    rng = np.random.default_rng([seed, 7])
    n_val = max(2, int(round(len(pool_ids) * fraction)))
    return np.sort(rng.choice(pool_ids, n_val, replace=False))


def class_budgets(labels: np.ndarray, budget: int) -> dict[int, int]:
    """Budget per class proportional to its size (largest remainders), summing to `budget`."""
    if len(labels) and labels.min() < 0:
        raise PipelineError("per_class: the split has no labels (a split prepared without them, such as STL-10's "
                            "unlabeled), so there are no classes to balance; select without per_class")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * budget
    base = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - base))[: budget - base.sum()]:
        base[i] += 1
    return {int(c): int(b) for c, b in zip(classes, base)}
