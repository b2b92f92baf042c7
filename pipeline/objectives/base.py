"""The contract between training and selection: a method's per-sample loss as selection sees it at one head.

A selection process works from a snapshot, with no trainer: it asks the method's `Objective` (registered by the
method's name) for the rows of a batch at the objective's `head`, and measures RCS's representational
divergence there with `divergence`. Trainers import their objective; selectors never import a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.registry import Registry


@dataclass
class HeadRows:
    """A batch's per-sample training loss as selection sees it at one head of the model: sample i enters the
    head R times (row r: input `feats[r][i]` on batch-norm branch `branches[r]`), and `grads[r][i]` is the
    gradient of sample i's loss with respect to the head's output for that row, the other samples held fixed.
    The head's per-sample parameter gradient follows exactly: sum over rows of (output gradient x input)."""

    feats: list
    grads: list
    branches: list
    inputs: list | None = None  # the images of each row (n each), where the objective keeps them


class Objective:
    """`rows(model, batch, gen, settings, attack)`: the method's per-sample loss gradient at `head` for one
    batch (model in eval mode; `settings`: what the method's step looked like at the snapshot, from
    `Trainer.selection_settings`; `attack`: the proxy's budget, eps / step / steps)."""

    name = "base"
    head = "proj"  # the head whose per-sample gradients selection uses (and RCS's RD is measured at)
    divergence = "minmax_kl"  # RCS's representational divergence at that head (losses.representational_divergence)

    @classmethod
    def rows(cls, model, batch, gen: torch.Generator, settings: dict, attack) -> HeadRows:
        raise NotImplementedError

    # What a training step already computed, as rows: `passes` are the selection head's inputs during the step's
    # forward, each (features, branch), in the order the step ran them; `n` the batch size. Rows recorded so
    # (`select.proxies = recorded`) stand in for the proxy pass. None: the method does not say (the default).
    rows_from_step = None


OBJECTIVES: Registry[type[Objective]] = Registry("method")


def register_objective(cls: type[Objective]) -> type[Objective]:
    return OBJECTIVES.register(cls)


def objective_of(method: str) -> type[Objective]:
    """The objective of the method a snapshot was trained by; one line when selection cannot see its loss."""
    if method not in OBJECTIVES:
        raise PipelineError(f"the snapshot was trained by method {method!r}, which does not tell selection how it "
                            f"sees its loss (methods that do: {OBJECTIVES.choices(', ')}); use --selector random")
    return OBJECTIVES[method]


def list_objectives() -> list[str]:
    return OBJECTIVES.names()
