"""One selection: shard set + model snapshot + selector -> manifest (what `pipeline select` and the trainer's
background selection both call)."""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import budget
from pipeline.checkpoint import check_fits, load_model
from pipeline.dist import barrier, rank_and_world
from pipeline.errors import PipelineError
from pipeline.locks import folder_lock
from pipeline.models import create_model, model_spec
from pipeline.progress import console
from pipeline.selectors.base import SELECTORS, SelectionContext, create_selector, draw_validation
from pipeline.selectors.proxies import ProxyComputer
from pipeline.selectors.recorded import RecordedRows
from pipeline.shards.manifest import Manifest, check_manifest_target
from pipeline.shards.shardset import ShardSet
from pipeline.validate import whole_number


def load_snapshot(checkpoint, shardset: ShardSet, arch: str, seed: int):
    """(model, snapshot digest, what the training step looked like at the snapshot: selection settings)."""
    if checkpoint is None:
        torch.manual_seed(seed)
        console.print(f"no --checkpoint: selecting with a freshly initialised {arch} (seed {seed})")
        return create_model(model_spec(arch, shardset.channels, shardset.image_size)), "fresh-init", {"method": "acl"}
    model, ckpt = load_model(checkpoint)
    check_fits(checkpoint, model.spec, shardset.channels, shardset.root)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    settings = dict(ckpt.get("selection_settings") or {})
    if "attack" not in settings and ckpt.get("attack"):  # checkpoints of `pipeline train` record their attack
        settings["attack"] = ckpt["attack"]
    settings.setdefault("method", ckpt.get("method") or "acl")  # whose loss the proxies take gradients of
    return model, digest, settings


def _ids_of(manifest_or_ids, ss: ShardSet) -> tuple[np.ndarray, str | None]:
    if manifest_or_ids is None:
        return None, None
    if isinstance(manifest_or_ids, (str, Path, Manifest)):
        m = manifest_or_ids if isinstance(manifest_or_ids, Manifest) else Manifest.load(manifest_or_ids)
        m.check_against(ss)
        return m.ids, m.split
    return np.asarray(manifest_or_ids, dtype=np.int64), None


def _check_selection(selector: str, result, pool_ids: np.ndarray, budget_n: int) -> None:
    """What a selector returns is checked before a manifest is written from it: unique ids, all from its pool,
    at most the budget (non-finite proxies, a plugin's bug). Training would refuse such a manifest later, far
    from the cause."""
    ids = np.asarray(result.ids)
    where = f"selector {selector!r}"
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise PipelineError(f"{where} returned ids of shape {ids.shape} and type {ids.dtype}, not a list of sample "
                            "ids; nothing was written")
    repeated = len(ids) - len(np.unique(ids))
    if repeated:
        raise PipelineError(f"{where} chose {repeated} ids more than once (non-finite proxies? try "
                            "select.proxies = fresh); nothing was written")
    outside = int((~np.isin(ids, pool_ids)).sum())
    if outside:
        raise PipelineError(f"{where} chose {outside} ids outside its pool; nothing was written")
    if len(ids) > budget_n:
        raise PipelineError(f"{where} chose {len(ids)} samples for a budget of {budget_n}; nothing was written")


def run_selection(data, selector: str, fraction: float, out, checkpoint=None, split: str = "train", pool=None,
                  seed: int = 0, device="cpu", params: dict | None = None, arch: str = "resnet18",
                  batch_size: int = 256, round_no: int | None = None, epoch: int | None = None,
                  attack_steps: int | None = None, validation=None, validation_fraction: float = 0.01,
                  workers: int = 0, recorded=None) -> Manifest:
    """`recorded`: a rows file training wrote (selectors.recorded; or its RecordedRows), standing in for the proxy pass of the
    candidates it covers. `pool`, `validation`: manifests (or id arrays) of the candidates and of a held-out U; a selector that
    needs U and gets none draws it once from the pool (seeded) and leaves it out of the candidates. The
    manifest's folder is locked for the whole selection: one writer at a time. Under torch.distributed
    (torchrun) every rank calls this: the ranks share the proxy pass, rank 0 writes the manifest, and every
    rank returns it."""
    whole_number(seed, "seed", why="; numpy's generators take no negative seeds")
    check_manifest_target(out)
    rank, world = rank_and_world()
    with folder_lock(Path(out).parent, f"pipeline select --selector {selector}") if rank == 0 else nullcontext():
        manifest = _run_selection(data, selector, fraction, out, checkpoint, split, pool, seed, device, params, arch,
                                  batch_size, round_no, epoch, attack_steps, validation, validation_fraction, workers,
                                  recorded)
    barrier()
    return manifest if rank == 0 else Manifest.load(out)


def _run_selection(data, selector, fraction, out, checkpoint, split, pool, seed, device, params, arch, batch_size,
                   round_no, epoch, attack_steps, validation, validation_fraction, workers,
                   recorded) -> Manifest | None:
    started, cpu_started = time.perf_counter(), time.process_time()
    selector = SELECTORS.canonical(selector)  # recorded under its registered name, whatever alias was typed
    ss = data if isinstance(data, ShardSet) else ShardSet.open(data)
    if not 0 < fraction <= 1:
        raise PipelineError(f"--fraction {fraction}: must be in (0, 1]")
    pool_ids, pool_split = _ids_of(pool, ss)
    split = pool_split or split
    if pool_ids is None:
        pool_ids = ss.ids(split)
    params = dict(params or {})
    sel = create_selector(selector, **params)
    if attack_steps is not None and "attack_steps" in sel.params:  # a model-free selector attacks nothing
        sel = create_selector(selector, **{**params, "attack_steps": attack_steps})
    budget_n = max(1, int(round(fraction * len(pool_ids))))
    val_ids, _ = _ids_of(validation, ss)
    if sel.needs_validation:
        if val_ids is None:
            val_ids = draw_validation(pool_ids, validation_fraction, seed)
        pool_ids = np.setdiff1d(pool_ids, val_ids)
    proxies, digest, settings = None, None, {}
    if sel.needs_model:
        model, digest, settings = load_snapshot(checkpoint, ss, arch, seed)
        a = settings.get("attack") or {}
        b = budget(ss.channels, a.get("eps"), a.get("step"))
        proxies = ProxyComputer(model, ss, split, device, batch_size, b.eps, b.step, sel.params.get("attack_steps", 1),
                                validation_fraction=validation_fraction, seed=seed, validation_ids=val_ids,
                                method=settings["method"], settings=settings, workers=workers,
                                recorded=recorded if recorded is None or isinstance(recorded, RecordedRows)
                                else RecordedRows.load(recorded, ss.fingerprint))
    ctx = SelectionContext(ss, split, np.asarray(pool_ids), budget_n, seed, sel.params, proxies, val_ids)
    result = sel.select(ctx)
    _check_selection(selector, result, np.asarray(pool_ids), budget_n)
    rank, world = rank_and_world()
    if rank != 0:
        return None
    timing = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.timing.items()}
    timing["total"] = round(time.perf_counter() - started, 3)
    timing["device"] = str(device)
    # the round's own CPU seconds (a round in the trainer's process must not count the trainer's); a round
    # process's start and imports are in the round record's wall_s
    timing["process_s"] = round(time.process_time() - cpu_started, 3)
    timing["processes"] = world
    if proxies is not None and proxies.fresh_count is not None and proxies.recorded is not None:
        timing["fresh_rows"] = int(proxies.fresh_count)  # candidates without recorded rows
    manifest = Manifest.for_shardset(
        ss, split, np.sort(result.ids) if result.weights is None else result.ids, weights=result.weights,
        producer={"name": selector, "params": sel.params}, round=round_no, epoch=epoch, fraction=fraction,
        snapshot=digest,
        extra={"seed": seed, "pool_size": int(len(pool_ids)), "budget": budget_n, "objective": result.objective,
               "timing": timing, "selection_settings": settings, **result.extra})
    manifest.save(out)
    return manifest
