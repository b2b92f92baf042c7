"""Each method's loss as selection sees it (its rows, selection head and divergence), registered by the
method's name: the layer that lets a selection process work from a snapshot without the training stack."""

from pipeline.objectives import advcl, contrastive, supervised  # noqa: F401  (registration)
from pipeline.objectives.base import OBJECTIVES, HeadRows, Objective, list_objectives, objective_of, register_objective

__all__ = ["HeadRows", "OBJECTIVES", "Objective", "list_objectives", "objective_of", "register_objective"]
