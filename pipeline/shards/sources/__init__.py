"""Source readers, one module per input form, chosen by the prefix of a SOURCE spec (`form:path`)."""

from __future__ import annotations

from typing import Callable

from pipeline.errors import PipelineError
from pipeline.registry import Registry
from pipeline.shards.sources.base import Encoded, Source
from pipeline.shards.sources.cifar import CifarSource
from pipeline.shards.sources.digits import DigitsSource
from pipeline.shards.sources.folder import FolderSource
from pipeline.shards.sources.hf import HfSource
from pipeline.shards.sources.imagenet_small import ImagenetSmallSource
from pipeline.shards.sources.mnist import MnistSource
from pipeline.shards.sources.stl10 import Stl10Source
from pipeline.shards.sources.synthetic import SyntheticSource


def _cifar(form):
    return lambda arg: CifarSource(arg, form)


# SOURCE forms: `form:PATH` (or a bare form) -> its reader
SOURCES: Registry[Callable[..., Source]] = Registry("source")
SOURCES.add("folder", lambda arg, follow_symlinks=False: FolderSource(arg, follow_symlinks))
SOURCES.add("cifar10", _cifar("cifar10"))
SOURCES.add("cifar100", _cifar("cifar100"))
SOURCES.add("imagenet32", lambda arg: ImagenetSmallSource(arg, 32))
SOURCES.add("imagenet64", lambda arg: ImagenetSmallSource(arg, 64))
SOURCES.add("mnist", MnistSource)
SOURCES.add("stl10", Stl10Source)
SOURCES.add("hf", HfSource)
SOURCES.add("digits", DigitsSource)
SOURCES.add("synthetic", SyntheticSource)
PATHLESS = {"digits": "digits", "synthetic": "synthetic[:N]"}  # forms that take no PATH


def source_forms() -> str:
    """"folder:PATH | cifar10:PATH | ... | digits | synthetic[:N]": for help texts and errors."""
    return " | ".join(PATHLESS.get(f, f"{f}:PATH") for f in SOURCES)


def open_source(spec: str, follow_symlinks: bool = False) -> Source:
    """`form:arg` (or a bare form) -> the reader for it. `follow_symlinks`: folder sources read links whose
    target lies outside the source folder (skipped and listed otherwise)."""
    form, _, arg = spec.partition(":")
    if form not in SOURCES:
        raise PipelineError(
            f"unknown source {spec!r}: expected one of {source_forms().replace(' | ', ', ')}"
        )
    source = SOURCES[form](arg or None, follow_symlinks) if form == "folder" else SOURCES[form](arg or None)
    if sum(len(source.labels(s)) for s in source.splits()) == 0:
        skipped = list(source.skipped())
        why = (f": all {len(skipped)} entries found were skipped, e.g. {skipped[0]['source']}: {skipped[0]['reason']}"
               if skipped else "")
        raise PipelineError(f"{spec}: the data set is empty{why}")
    return source


__all__ = ["Encoded", "SOURCES", "Source", "open_source", "source_forms"]
