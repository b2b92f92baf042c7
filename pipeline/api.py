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
"""

from __future__ import annotations

from pathlib import Path

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


def prepare(source: str, out: str | Path, **options) -> ShardSet:
    """Shards from a source (`folder:PATH`, `cifar10:PATH`, `digits`, ...; see `pipeline prepare --help`);
    `options` are PrepareOptions' fields (image_size, per_class, shard_size, workers, ...)."""
    options.setdefault("progress", False)
    return ShardSet.open(_prepare(source, PrepareOptions(out=out, **options)).out)


def open_shards(path: str | Path) -> ShardSet:
    """A prepared shard set: a folder, or an s3://, gs:// or http(s):// prefix."""
    return ShardSet.open(path)


def loader(shards: ShardSet, subset: Manifest | str | Path | None = None, *, split: str = "train", epoch: int = 0,
           batch_size: int = 256, seed: int = 0, device="cpu", workers: int = 0, use_weights: bool = True,
           shuffle: bool = True, drop_last: bool = False):
    """The batches of one epoch over `split`, or over a subset manifest (its per-sample weights on the batches
    when it has them). The order is a function of (seed, epoch): the same epoch gives the same batches."""
    if subset is not None and not isinstance(subset, Manifest):
        subset = Manifest.load(subset)
    if subset is not None:
        subset.check_against(shards)
    batches = shards.loader(split, subset, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                            device=device, num_workers=workers, use_weights=use_weights)
    batches.set_epoch(epoch)
    return batches


def method_spec(method: str, arch: str, shards: ShardSet, **settings) -> dict:
    """The model spec a method trains on these shards (its heads and batch-norm branches), exactly as
    `pipeline train` builds it; `settings` are dotted settings the method reads (`model.head_width`,
    `advcl.pseudo_labels`, ...), underscores for the dots: model__head_width=256."""
    if shards.image_size is None:
        raise PipelineError(f"{shards.root}: images vary in size; prepare it with --image-size N to build a model")
    cls = TRAINERS.lookup(method)
    cfg = TrainConfig()
    cfg.set("method.name", method)
    cfg.set("model.arch", arch)
    for key, value in settings.items():
        cfg.set(key.replace("__", "."), value)
    cls.complete_config(cfg)
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
    b = budget(shards.channels, eps, step, steps)
    return save_checkpoint(path, {
        "method": method, "model_spec": model.spec, "model": model.state_dict(), "epoch": epoch,
        "dataset_fingerprint": shards.fingerprint, "attack": b.as_dict(),
        "selection_settings": {"attack": b.as_dict(), "method": method, **(settings or {})}})


def select(shards: ShardSet, selector: str, fraction: float, out: str | Path, checkpoint: str | Path | None = None,
           **options) -> Manifest:
    """One selection round (any registered selector: random, rcs, facility, kcg, ...) written to `out` as a
    manifest; `options` as selectors.run.run_selection (params={...}, pool=..., seed=..., device=...)."""
    return run_selection(shards, selector, fraction, out, checkpoint=checkpoint, **options)


__all__ = ["ContrastiveAugment", "Manifest", "Model", "PGD", "ShardSet", "budget", "convert_batchnorm",
           "create_model", "evaluate", "load_model", "loader", "method_spec", "nt_xent", "open_shards", "prepare",
           "save_snapshot", "select", "to_float", "use_branch", "weighted_mean"]
