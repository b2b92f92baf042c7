"""One registry idiom for every kind of pluggable part (timm's register_model / create_model / list_models).

    TRAINERS = Registry("method", flag="--method")
    @TRAINERS.register            # the class's own `name`; or @TRAINERS.register("name")
    class ACLTrainer(Trainer): ...
    TRAINERS.lookup("acl")        # the class; one line naming the flag and every choice for an unknown name
    TRAINERS.create("acl", cfg)   # lookup, then call
    TRAINERS.names()              # what help texts and "choose one of" messages are built from

A registry reads like the dict it replaces (`name in R`, `R[name]`, iteration in registration order), so a
part registered anywhere, a test file included, shows up wherever the names are listed. A module of one's own
(a method, a selector, a measure) is registered in every process the tool starts, background selection rounds
included, when it is named in PIPELINE_PLUGINS (comma-separated module names, importable on the Python path).
"""

from __future__ import annotations

import importlib
import os
from typing import Generic, Iterator, TypeVar

from pipeline.errors import PipelineError, user_code

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str | None = None):
        self.kind, self.flag = kind, flag
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}  # a name users guess -> the registered one

    def register(self, item=None, *, name: str | None = None):
        """Decorator: `@R.register`, `@R.register("name")` or `R.register(obj, name=...)`."""
        if isinstance(item, str):
            return lambda obj: self.add(item, obj)
        if item is None:
            return lambda obj: self.add(name or obj.name, obj)
        return self.add(name or item.name, item)

    def add(self, name: str, item: T) -> T:
        """Register `item` as `name`. A name is taken once: a part of one's own that picks a built-in's name (or
        another plugin's) is refused in one line naming both, never silently put in its place. The same
        definition registered again (a module imported twice or reloaded) is not a conflict."""
        old = self._items.get(name)
        if old is not None and old is not item and _origin(old) != _origin(item):
            raise PipelineError(f"{self.kind} {name!r} is taken by {_origin(old)}; {_origin(item)} cannot "
                                f"register under it: give it a name of its own")
        self._items[name] = item
        return item

    def alias(self, alias: str, name: str) -> None:
        """`alias` finds the part registered as `name` (`kcenter` for `kcg`); listed under its own name only."""
        if alias in self._items or self._aliases.get(alias, name) != name:
            raise PipelineError(f"{self.kind} {alias!r} is taken; it cannot also stand for {name!r}")
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name `name` stands for (itself unless it is an alias)."""
        return self._aliases.get(name, name) if isinstance(name, str) else name

    def remove(self, name: str) -> None:
        """For tests that register a part of their own and clean up after."""
        self._items.pop(name, None)

    def get(self, name: str, default=None):
        """As dict.get: the part, or `default` (see `lookup` for the one-line error)."""
        return self._items.get(self.canonical(name), default)

    def lookup(self, name: str) -> T:
        """The part registered as `name`; one line naming the flag and every choice when there is none."""
        if self.canonical(name) not in self._items:
            where = f"{self.flag} " if self.flag else f"{self.kind} "
            raise PipelineError(f"{where}{name!r}: choose one of {self.choices(', ')}")
        return self._items[self.canonical(name)]

    def create(self, name: str, *args, **kwargs):
        return self.lookup(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return list(self._items)

    def choices(self, sep: str = " | ") -> str:
        return sep.join(self._items)

    def keys(self):
        return self._items.keys()

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def __contains__(self, name) -> bool:
        return self.canonical(name) in self._items

    def __getitem__(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


def _origin(item) -> str:
    """Where a registered part was defined: `module.QualName`, the words a conflict names."""
    module = getattr(item, "__module__", None) or type(item).__module__
    qualname = getattr(item, "__qualname__", None) or type(item).__qualname__
    return f"{module}.{qualname}"


PLUGINS_VARIABLE = "PIPELINE_PLUGINS"


def load_plugins() -> list[str]:
    """Import the modules PIPELINE_PLUGINS names (their decorators register their parts); returns their names."""
    names = [n.strip() for n in os.environ.get(PLUGINS_VARIABLE, "").split(",") if n.strip()]
    for name in names:
        # Importing a plugin is a step of its own that fails loudly: whatever the import raises, SystemExit
        # included (a plugin's `sys.exit(0)` would otherwise end the command with success, having done nothing).
        # A name it registers that is taken comes back as the registry's line, the plugin named.
        with user_code(f"{PLUGINS_VARIABLE}: importing plugin {name!r}",
                       f"put its folder on PYTHONPATH, fix it, or remove it from {PLUGINS_VARIABLE}"):
            importlib.import_module(name)
    return names


__all__ = ["PLUGINS_VARIABLE", "Registry", "load_plugins"]
