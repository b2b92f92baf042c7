"""Source readers, one module per input form, chosen by the prefix of a SOURCE spec (`form:path`)."""

from __future__ import annotations

from typing import Callable

from pipeline.errors import PipelineError
from pipeline.shards.sources.base import Encoded, Source


def _folder(arg, follow_symlinks: bool = False):
    from pipeline.shards.sources.folder import FolderSource

    return FolderSource(arg, follow_symlinks)


def _cifar(form):
    def make(arg):
        from pipeline.shards.sources.cifar import CifarSource

        return CifarSource(arg, form)

    return make


def _mnist(arg):
    from pipeline.shards.sources.mnist import MnistSource

    return MnistSource(arg)


def _digits(arg):
    from pipeline.shards.sources.digits import DigitsSource

    return DigitsSource(arg)


def _synthetic(arg):
    from pipeline.shards.sources.synthetic import SyntheticSource

    return SyntheticSource(arg)


SOURCES: dict[str, Callable[[str | None], Source]] = {
    "folder": _folder,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "mnist": _mnist,
    "digits": _digits,
    "synthetic": _synthetic,
}


def open_source(spec: str, follow_symlinks: bool = False) -> Source:
    """`form:arg` (or a bare form) -> the reader for it. `follow_symlinks`: folder sources read links whose
    target lies outside the source folder (skipped and listed otherwise)."""
    form, _, arg = spec.partition(":")
    if form not in SOURCES:
        raise PipelineError(
            f"unknown source {spec!r}: expected one of {', '.join(f + ':PATH' if f not in ('digits', 'synthetic') else f for f in SOURCES)}"
        )
    source = SOURCES[form](arg or None, follow_symlinks) if form == "folder" else SOURCES[form](arg or None)
    if sum(len(source.labels(s)) for s in source.splits()) == 0:
        raise PipelineError(f"{spec}: the data set is empty")
    return source


__all__ = ["Encoded", "SOURCES", "Source", "open_source"]
