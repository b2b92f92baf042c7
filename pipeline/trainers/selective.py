"""Selective attack: adversarial views for a share of each batch only (`attack.fraction`), chosen each step by a
registered rule (`attack.select`); the other samples enter the adversarial branch unperturbed, so the loss keeps
its form and only the attack's cost falls (BulletTrain, NeurIPS 2021; Losch et al., ICLR 2024; selective
per-batch adversarial training, 2025: shared/reference/dynamic-selection.md).

Rules, each a small class registered by name:
- `random`: k of the batch's n samples uniformly, from a generator of (seed, step): the same samples for the
  same seed, resumed or not;
- `divergence`: the samples with the highest representational divergence between their natural and adversarial
  outputs (RCS's quantity, per sample, at the method's selection head) at their last attacked visit;
- `loss`: the highest per-sample training loss at their last attacked visit.
Scores are kept by sample id (`ScoreBook`, saved with every checkpoint). Only attacked visits update a score:
an unperturbed view's divergence and loss say nothing of the sample's robustness, and updating from them would
keep a sample that was once skipped out of the attack for good. Samples never scored are attacked first, ties
broken at random. k = round(fraction x n), at least 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import declare_choices
from pipeline.errors import PipelineError
from pipeline.registry import Registry
from pipeline.trainers.pruning import ScoreBook


class AttackChoice:
    """How the attacked samples of a batch are picked; `score`: the step's per-sample value it ranks by (highest
    first), None for a rule that needs none."""

    name = "base"
    score: str | None = None


ATTACK_CHOICES: Registry[type[AttackChoice]] = Registry("attack selection", flag="--attack-select")


def register_attack_choice(cls: type[AttackChoice]) -> type[AttackChoice]:
    return ATTACK_CHOICES.register(cls)


@register_attack_choice
class RandomChoice(AttackChoice):
    name = "random"


@register_attack_choice
class DivergenceChoice(AttackChoice):
    name = "divergence"
    score = "divergence"


@register_attack_choice
class LossChoice(AttackChoice):
    name = "loss"
    score = "loss"


declare_choices("attack.select", ATTACK_CHOICES.names)


def attacked_count(n: int, fraction: float) -> int:
    return n if fraction >= 1 else min(n, max(1, int(round(fraction * n))))


class SelectiveAttack:
    def __init__(self, fraction: float, rule: str, pool_ids: np.ndarray, seed: int, distributed: bool = False):
        self.fraction, self.seed, self.distributed = float(fraction), int(seed), distributed
        self.rule = ATTACK_CHOICES.lookup(rule)
        self.book = ScoreBook(pool_ids)

    @property
    def score(self) -> str | None:
        return self.rule.score

    def choose(self, ids: np.ndarray, step: int) -> np.ndarray | None:
        """Sorted positions in the batch to attack (None: all of them)."""
        n = len(ids)
        k = attacked_count(n, self.fraction)
        if k >= n:
            return None
        rng = np.random.default_rng([self.seed, step, 23])
        if self.score is None:
            return np.sort(rng.choice(n, k, replace=False))
        values = self.book.lookup(self.score, ids)
        key = np.where(np.isnan(values), np.inf, values)
        order = np.lexsort((rng.random(n), -key))  # highest first, unscored before all; ties at random
        return np.sort(order[:k])

    def observe(self, ids: np.ndarray, attacked: np.ndarray | None, values: dict) -> None:
        """After a step: the attacked samples' scores (every rank keeps every rank's)."""
        if self.score is None:
            return
        if self.score not in values:
            raise PipelineError(f"attack.select = {self.rule.name}: the method's step reports no per-sample "
                                f"{self.score!r}")
        v = values[self.score].detach().float().cpu().numpy()
        if attacked is not None:
            ids, v = ids[attacked], v[attacked]
        if self.distributed:
            both = [None] * dist.get_world_size()
            dist.all_gather_object(both, (ids, v))
            ids, v = np.concatenate([b[0] for b in both]), np.concatenate([b[1] for b in both])
        self.book.update(ids, {self.score: v})

    def state(self) -> dict:
        return self.book.state()

    def restore(self, state: dict) -> None:
        self.book.restore(state or {})


def create_selective_attack(trainer, able: list[str]) -> SelectiveAttack | None:
    """None when every sample is attacked; `able`: the methods that attack selectively (for the message)."""
    a = trainer.cfg.attack
    ATTACK_CHOICES.lookup(a.select)
    if a.fraction >= 1:
        return None
    if not trainer.selective_attack:
        raise PipelineError(f"attack.fraction = {a.fraction}: method {trainer.name!r} does not attack selectively "
                            f"(methods that do: {', '.join(able)}); leave attack.fraction at 1")
    return SelectiveAttack(a.fraction, a.select, trainer.shardset.ids(trainer.cfg.data.split), trainer.cfg.run.seed,
                           trainer.dist.distributed)


def rows_of(positions: torch.Tensor, n: int, views: int) -> torch.Tensor:
    """Row indices of the samples at `positions` in a batch of `views` stacked views of n samples each."""
    return torch.cat([positions + v * n for v in range(views)])


__all__ = ["ATTACK_CHOICES", "AttackChoice", "SelectiveAttack", "attacked_count", "create_selective_attack",
           "register_attack_choice", "rows_of"]
