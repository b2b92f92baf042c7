"""The Python API for a training loop of one's own: the pieces `pipeline train` runs, as plain calls.

    import pipeline.api as pl

    shards = pl.prepare("folder:data/cifar10", "shards/cifar10")      # once; or pl.open_shards("shards/cifar10")
    model = pl.create_model("wrn-28-10", shards, method="acl")       # multi-branch BN, the method's heads
    for epoch in range(epochs):
        for batch in pl.loader(shards, subset, epoch=epoch, batch_size=256):
            images = pl.to_float(batch.images)                       # uint8 -> [0, 1]; batch.labels, .ids,
            ...                                                      # .weights (the subset's, or None)
        pl.save_snapshot("runs/mine/epoch.pt", model, shards, method="acl", epoch=epoch)
        subset = pl.select(shards, "rcs", 0.2, "runs/mine/round-0001.json", checkpoint="runs/mine/epoch.pt")
    pl.evaluate(shards, "runs/mine/epoch.pt", protocol="slf", attack="clean,pgd20")

Everything here is the same code the CLI runs: a subset chosen here trains the CLI's runs and the other way
round, a snapshot saved here is a checkpoint `pipeline eval` and `pipeline select` read. examples/own_loop.py
is this loop written out, run by the tests.

Every call checks what it is given as the CLI does: a wrong type or an impossible value is one PipelineError
naming the argument, before any work (the tensor functions, nt_xent and weighted_mean, raise ValueError the
same way); tests/test_api_checks.py tries each misuse.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import PGD, budget
from pipeline.augment import ContrastiveAugment, to_float
from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate
from pipeline.losses import nt_xent, weighted_mean
from pipeline.models import Model, convert_batchnorm, model_spec, trust, use_branch
from pipeline.models import create_model as _build
from pipeline.selectors.run import run_selection
from pipeline.shards.manifest import Manifest
from pipeline.shards.prepare import PrepareOptions
from pipeline.shards.prepare import prepare as _prepare
from pipeline.shards.shardset import ShardSet
from pipeline.trainers import TRAINERS, TrainConfig


def _path(value, what: str):
    if not isinstance(value, (str, os.PathLike)):
        raise PipelineError(f"{what} = {value!r}: give a path (a str or pathlib.Path)")
    return value


def _shards(value) -> ShardSet:
    """A ShardSet, or the path of one (opened)."""
    if isinstance(value, ShardSet):
        return value
    if isinstance(value, (str, os.PathLike)):
        return ShardSet.open(value)
    raise PipelineError(f"shards = {type(value).__name__}: give a ShardSet (pl.open_shards(PATH)) or its path")


def _options(fn, options: dict, what: str, skip=()) -> None:
    accepted = [n for n, p in inspect.signature(fn).parameters.items()
                if p.kind == p.KEYWORD_ONLY or p.default is not p.empty and n not in skip]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PipelineError(f"{what}: unknown option {unknown[0]!r} (options: {', '.join(accepted)})")


def prepare(source: str, out: str | Path, **options) -> ShardSet:
    """Shards from a source (`folder:PATH`, `cifar10:PATH`, `digits`, ...; see `pipeline prepare --help`);
    `options` are PrepareOptions' fields (image_size, per_class, shard_size, workers, ...)."""
    if not isinstance(source, str):
        raise PipelineError(f"source = {source!r}: give the source as text, e.g. 'folder:PATH' or 'digits'")
    _path(out, "out")
    fields = [f.name for f in dataclasses.fields(PrepareOptions) if f.name != "out"]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise PipelineError(f"prepare: unknown option {unknown[0]!r} (options: {', '.join(fields)})")
    options.setdefault("progress", False)
    return ShardSet.open(_prepare(source, PrepareOptions(out=out, **options)).out)


def open_shards(path: str | Path) -> ShardSet:
    """A prepared shard set: a folder, or an s3://, gs:// or http(s):// prefix."""
    return ShardSet.open(_path(path, "path"))


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PipelineError(f"device = {device!r}: not a device ({exc}); use cpu or cuda") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise PipelineError(f"device = {device!r}: no such CUDA device here ({torch.cuda.device_count()} found); "
                            "use cpu")
    return dev


def loader(shards: ShardSet, subset: Manifest | str | Path | None = None, *, split: str = "train", epoch: int = 0,
           batch_size: int = 256, seed: int = 0, device="cpu", workers: int = 0, use_weights: bool = True,
           shuffle: bool = True, drop_last: bool = False):
    """The batches of one epoch over `split`, or over a subset manifest (its per-sample weights on the batches
    when it has them), or over sample ids (an array or list). The order is a function of (seed, epoch): the
    same epoch gives the same batches."""
    shards = _shards(shards)
    if isinstance(subset, (list, tuple, np.ndarray, torch.Tensor)):
        ids = np.asarray(subset.cpu() if isinstance(subset, torch.Tensor) else subset)
        if ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
            raise PipelineError(f"subset: {ids.ndim}-D {ids.dtype} values; give sample ids (whole numbers), a "
                                "Manifest or a manifest's path")
        subset = ids.astype(np.int64)
    elif subset is not None and not isinstance(subset, Manifest):
        subset = Manifest.load(_path(subset, "subset"))
    if isinstance(subset, Manifest):
        subset.check_against(shards)
    device = _device(device)
    batches = shards.loader(split, subset, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                            device=device, num_workers=workers, use_weights=use_weights)
    batches.set_epoch(epoch)
    return batches


def method_spec(method: str, arch: str, shards: ShardSet, **settings) -> dict:
    """The model spec a method trains on these shards (its heads and batch-norm branches), exactly as
    `pipeline train` builds it; `settings` are dotted settings the method reads (`model.head_width`,
    `advcl.pseudo_labels`, ...), underscores for the dots: model__head_width=256."""
    shards = _shards(shards)
    if shards.image_size is None:
        raise PipelineError(f"{shards.root}: images vary in size; prepare it with --image-size N to build a model")
    cls = TRAINERS.lookup(method)
    cfg = TrainConfig()
    cfg.set("method.name", method)
    cfg.set("model.arch", arch)
    for key, value in settings.items():
        cfg.set(key.replace("__", "."), value, origin="settings")
    cls.complete_config(cfg)
    cfg.validate()
    probe = cls.__new__(cls)  # only model_spec() runs: it reads the settings, the data's channels, size, classes
    probe.cfg, probe.shardset, probe.channels, probe.image_size = cfg, shards, shards.channels, shards.image_size
    return cls.model_spec(probe)


def create_model(arch: str, shards: ShardSet, method: str = "acl", **settings) -> Model:
    """The model `pipeline train --method METHOD --arch ARCH` would train on these shards (any arch form:
    registered, wrn-D-W, module:PKG.MODULE:FUNCTION, ...). forward(x, branch) returns {"features", heads...}."""
    trust(arch)
    return _build(method_spec(method, arch, shards, **settings))


def save_snapshot(path: str | Path, model: Model, shards: ShardSet, method: str = "acl", epoch: int = 0,
                  eps: float | None = None, step: float | None = None, steps: int | None = None,
                  settings: dict | None = None) -> Path:
    """The model as a checkpoint `pipeline select`, `pipeline eval` and `select()`/`evaluate()` read: its spec,
    weights, the data's fingerprint, the method and its attack (the selection proxies mimic that step)."""
    shards = _shards(shards)
    if not isinstance(model, Model):
        raise PipelineError(f"model = {type(model).__name__}: save a model made by pl.create_model (its spec is "
                            "what `pipeline eval` and `pipeline select` rebuild it from)")
    TRAINERS.lookup(method)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise PipelineError(f"epoch = {epoch!r}: must be a whole number >= 0")
    b = budget(shards.channels, eps, step, steps)
    return save_checkpoint(path, {
        "method": method, "model_spec": model.spec, "model": model.state_dict(), "epoch": epoch,
        "dataset_fingerprint": shards.fingerprint, "attack": b.as_dict(),
        "selection_settings": {"attack": b.as_dict(), "method": method, **(settings or {})}})


def select(shards: ShardSet, selector: str, fraction: float, out: str | Path, checkpoint: str | Path | None = None,
           **options) -> Manifest:
    """One selection round (any registered selector: random, rcs, facility, kcg, ...) written to `out` as a
    manifest; `options` as selectors.run.run_selection (params={...}, pool=..., seed=..., device=...)."""
    shards = _shards(shards)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise PipelineError(f"fraction = {fraction!r}: a number in (0, 1], the share of the pool to keep")
    _path(out, "out")
    _options(run_selection, options, "select", skip=("checkpoint",))
    return run_selection(shards, selector, fraction, out, checkpoint=checkpoint, **options)


__all__ = ["ContrastiveAugment", "Manifest", "Model", "PGD", "ShardSet", "budget", "convert_batchnorm",
           "create_model", "evaluate", "load_model", "loader", "method_spec", "nt_xent", "open_shards", "prepare",
           "save_snapshot", "select", "to_float", "use_branch", "weighted_mean"]
