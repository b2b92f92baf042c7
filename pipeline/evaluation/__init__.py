"""`pipeline eval`: finetune a pre-trained encoder by a protocol, then measure clean and robust accuracy."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.atomic import write_json
from pipeline.attacks import default_budget
from pipeline.checkpoint import load_checkpoint, load_weights
from pipeline.errors import PipelineError
from pipeline.evaluation.protocols import PROTOCOLS, FinetuneSettings, LinearClassifier, finetune
from pipeline.evaluation.robustness import accuracies
from pipeline.models import create_model
from pipeline.shards.shardset import ShardSet


def load_encoder(checkpoint: str | Path, shardset: ShardSet, device) -> tuple[torch.nn.Module, dict]:
    ckpt = load_checkpoint(checkpoint)
    spec = ckpt["model_spec"]
    if spec.get("in_channels") != shardset.channels:
        raise PipelineError(f"{checkpoint}: the model takes {spec.get('in_channels')}-channel images, "
                            f"{shardset.root} has {shardset.channels}-channel ones")
    model = create_model(spec)
    load_weights(model, ckpt["model"], checkpoint)
    return model.encoder.to(device), ckpt


def evaluate(data: str | Path, checkpoint: str | Path, protocol: str = "slf", attack: str = "pgd20",
             settings: FinetuneSettings | None = None, limit: int | None = None, batch_size: int = 256,
             device="cpu", workers: int = 0, eps: float | None = None, step: float | None = None,
             progress: bool = True) -> dict:
    if protocol not in PROTOCOLS:
        raise PipelineError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    device = torch.device(device)
    torch.set_flush_denormal(True)  # denormal floats in trained weights slow CPU math down ~10x
    ss = ShardSet.open(data)
    for split in ("train", "test"):
        if split not in ss.splits:
            raise PipelineError(f"{data}: evaluation needs a train and a test split (it has {', '.join(ss.splits)})")
    encoder, ckpt = load_encoder(checkpoint, ss, device)
    d_eps, d_step = default_budget(ss.channels)
    s = settings or FinetuneSettings()
    s.eps = eps if eps is not None else d_eps
    s.step = step if step is not None else d_step
    torch.manual_seed(s.seed)
    model = LinearClassifier(encoder, encoder.feature_dim, len(ss.classes)).to(device)
    train_loader = ss.loader("train", batch_size=batch_size, seed=s.seed, device=device, num_workers=workers)
    started = time.perf_counter()
    losses = finetune(model, train_loader, protocol, s, device, progress)
    finetune_s = time.perf_counter() - started
    test_ids = ss.ids("test")[:limit] if limit else None
    test_loader = ss.loader("test", test_ids, batch_size=batch_size, shuffle=False, device=device, num_workers=workers)
    started = time.perf_counter()
    acc = accuracies(model, test_loader, attack, s.eps, s.step, len(ss.classes), device, s.seed)
    result = {
        "protocol": protocol, **acc, "attack": attack, "eps": s.eps, "attack_step": s.step, "attack_steps": 20,
        "finetune": asdict(s), "finetune_losses": losses, "finetune_seconds": finetune_s,
        "attack_seconds": time.perf_counter() - started, "checkpoint": str(checkpoint),
        "checkpoint_epoch": ckpt.get("epoch"), "method": ckpt.get("method"), "arch": ckpt["model_spec"]["arch"],
        "data": str(data), "dataset_fingerprint": ss.fingerprint, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results_path = Path(checkpoint).parent / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    previous[f"{protocol}-{attack}"] = result
    write_json(results_path, previous)
    result["results_path"] = str(results_path)
    return result


__all__ = ["evaluate", "FinetuneSettings", "PROTOCOLS"]
