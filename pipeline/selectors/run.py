"""One selection: shard set + model snapshot + selector -> manifest (what `pipeline select` and the trainer's
background selection both call)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import default_budget
from pipeline.checkpoint import load_checkpoint, load_weights
from pipeline.errors import PipelineError
from pipeline.models import create_model, model_spec
from pipeline.progress import console
from pipeline.selectors import SelectionContext, create_selector
from pipeline.selectors.proxies import ProxyComputer
from pipeline.shards.manifest import Manifest
from pipeline.shards.shardset import ShardSet


def load_snapshot(checkpoint, shardset: ShardSet, arch: str, seed: int):
    """(model, snapshot digest, the checkpoint's training config or {})."""
    if checkpoint is None:
        torch.manual_seed(seed)
        spec = model_spec(arch, shardset.channels, shardset.image_size)
        console.print(f"no --checkpoint: selecting with a freshly initialised {arch} (seed {seed})")
        return create_model(spec), "fresh-init", {}
    ckpt = load_checkpoint(checkpoint)
    model = create_model(ckpt["model_spec"])
    load_weights(model, ckpt["model"], checkpoint)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    return model, digest, ckpt.get("config") or {}


def run_selection(data, selector: str, fraction: float, out, checkpoint=None, split: str = "train", pool=None,
                  seed: int = 0, device="cpu", params: dict | None = None, arch: str = "resnet18",
                  batch_size: int = 256, round_no: int | None = None, epoch: int | None = None,
                  attack_steps: int = 1, validation_fraction: float = 0.01) -> Manifest:
    started = time.perf_counter()
    ss = data if isinstance(data, ShardSet) else ShardSet.open(data)
    if not 0 < fraction <= 1:
        raise PipelineError(f"--fraction {fraction}: must be in (0, 1]")
    if pool is not None:
        pool_m = pool if isinstance(pool, Manifest) else Manifest.load(pool)
        pool_m.check_against(ss)
        pool_ids, split = pool_m.ids, pool_m.split
    else:
        pool_ids = ss.ids(split)
    budget = max(1, int(round(fraction * len(pool_ids))))
    sel = create_selector(selector, **(params or {}))
    proxies, digest, train_cfg = None, None, {}
    if sel.needs_model:
        model, digest, train_cfg = load_snapshot(checkpoint, ss, arch, seed)
        eps, step = default_budget(ss.channels)
        attack = train_cfg.get("attack", {})
        proxies = ProxyComputer(model, ss, split, device, batch_size, attack.get("eps") or eps,
                                attack.get("step") or step, attack_steps,
                                train_cfg.get("method", {}).get("temperature", 0.5), validation_fraction, seed,
                                train_cfg.get("method", {}).get("min_crop_scale", 0.08))
    ctx = SelectionContext(ss, split, np.asarray(pool_ids), budget, seed, sel.params, proxies)
    result = sel.select(ctx)
    timing = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.timing.items()}
    timing["total"] = round(time.perf_counter() - started, 3)
    manifest = Manifest.for_shardset(
        ss, split, np.sort(result.ids) if result.weights is None else result.ids, weights=result.weights,
        producer={"name": selector, "params": sel.params}, round=round_no, epoch=epoch, fraction=fraction,
        snapshot=digest,
        extra={"seed": seed, "pool_size": int(len(pool_ids)), "budget": budget, "objective": result.objective,
               "timing": timing, **result.extra})
    manifest.save(out)
    return manifest
