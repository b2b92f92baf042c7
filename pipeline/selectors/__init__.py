"""Selectors registered by name (`@register_selector` where each class lives), and `run_selection`: pool +
model snapshot -> manifest (pipeline.selectors.run)."""

from __future__ import annotations

from pipeline.selectors import random, rcs, facility, difficulty, alignment, kcenter  # noqa: F401,I001  (registration, in this order)
from pipeline.selectors.base import (SELECTORS, Selection, SelectionContext, Selector, create_selector,
                                     draw_validation, list_selectors, register_selector, selector_needs_validation)

__all__ = ["SELECTORS", "Selection", "SelectionContext", "Selector", "create_selector", "draw_validation",
           "list_selectors", "register_selector", "selector_needs_validation"]
