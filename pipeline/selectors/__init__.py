"""Selectors registered by name, and `run_selection`: pool + model snapshot -> manifest."""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.selectors.base import Selection, SelectionContext, Selector
from pipeline.selectors.facility import FacilitySelector
from pipeline.selectors.random import RandomSelector
from pipeline.selectors.rcs import RCSSelector

SELECTORS: dict[str, type[Selector]] = {"random": RandomSelector, "rcs": RCSSelector, "facility": FacilitySelector}


def create_selector(name: str, **params) -> Selector:
    if name not in SELECTORS:
        raise PipelineError(f"selector {name!r}: choose one of {', '.join(SELECTORS)}")
    return SELECTORS[name](**params)


def selector_needs_validation(name: str, params: str | dict) -> bool:
    from pipeline.overlap import parse_params

    return create_selector(name, **(parse_params(params) if isinstance(params, str) else params)).needs_validation


__all__ = ["SELECTORS", "Selection", "SelectionContext", "Selector", "create_selector", "selector_needs_validation"]
