"""`pipeline eval`: finetune a pre-trained encoder by a protocol, then measure clean and robust accuracy.

Settings come from the RobustSSL benchmark's recipe for the checkpoint's method (`--recipe` to choose
another), then the checkpoint's [eval] section, then explicit options. Every setting is written with the
numbers to RUN/results.json (or results.json beside a checkpoint outside a run folder).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.atomic import write_json
from pipeline.attacks import budget
from pipeline.checkpoint import load_model
from pipeline.errors import PipelineError
from pipeline.evaluation.measures import MEASURES, accuracies, parse_measures
from pipeline.evaluation.protocols import PROTOCOLS, LinearClassifier, OwnClassifier, finetune
from pipeline.evaluation.recipes import DEFAULT_RECIPE, RECIPES, FinetuneSettings, recipe_settings
from pipeline.shards.shardset import ShardSet


def _load_checked(checkpoint: str | Path, shardset: ShardSet, role: str):
    """(model, checkpoint) after checking it takes this data's images and has the `role` branch."""
    model, ckpt = load_model(checkpoint)
    spec = model.spec
    if spec.get("in_channels") != shardset.channels:
        raise PipelineError(f"{checkpoint}: the model takes {spec.get('in_channels')}-channel images, "
                            f"{shardset.root} has {shardset.channels}-channel ones")
    if role not in spec["roles"]:
        raise PipelineError(f"--branch {role!r}: the model has branches for {', '.join(spec['roles'])}")
    return model, ckpt


def load_classifier(checkpoint: str | Path, shardset: ShardSet, device, role: str = "eval"):
    """(encoder + linear layer, checkpoint); `role` picks the branch deployed: the method's eval branch, or
    another role (e.g. "natural", to see what the encoder's natural branch gives for scale)."""
    model, ckpt = _load_checked(checkpoint, shardset, role)
    roles = {r: model.branch(r) for r in model.spec["roles"]}
    roles["eval"] = roles[role]
    return LinearClassifier(model.encoder, model.feature_dim, len(shardset.classes), roles).to(device), ckpt


def load_own_classifier(checkpoint: str | Path, shardset: ShardSet, device, role: str = "eval"):
    """(the model's own classifier through the `role` branch, checkpoint), for `--protocol direct`."""
    model, ckpt = _load_checked(checkpoint, shardset, role)
    heads = model.spec["heads"]
    if "logits" not in heads:
        raise PipelineError(f"{checkpoint}: --protocol direct needs a model with its own classifier (a 'logits' "
                            f"head, as ascl trains); this {ckpt.get('method')} model has {', '.join(heads)}: "
                            "use --protocol slf, alf or aff")
    if heads["logits"]["out"] != len(shardset.classes):
        raise PipelineError(f"{checkpoint}: its classifier has {heads['logits']['out']} classes, "
                            f"{shardset.root} has {len(shardset.classes)}")
    return OwnClassifier(model, model.branch(role)).to(device), ckpt


def results_path(checkpoint: str | Path) -> Path:
    ckpt = Path(checkpoint)
    return ckpt.parent.parent / "results.json" if ckpt.parent.name == "checkpoints" else ckpt.parent / "results.json"


def evaluate(data: str | Path, checkpoint: str | Path, protocol: str = "slf", attack: str = "pgd20",
             recipe: str | None = None, epochs: int | None = None, lr: float | None = None,
             batch_size: int | None = None, milestones=None, limit: int | None = None, eval_batch_size: int = 256,
             device="cpu", workers: int = 0, eps: float | None = None, step: float | None = None,
             steps: int | None = None, seed: int = 0, progress: bool = True, settings: FinetuneSettings | None = None,
             branch: str = "eval") -> dict:
    if protocol not in PROTOCOLS:
        raise PipelineError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    from pipeline.trainers.config import check_value

    for key, value in {"eval.eps": eps, "eval.step": step, "eval.steps": steps, "eval.epochs": epochs,
                       "eval.lr": lr, "eval.batch_size": batch_size}.items():
        if value is not None:
            check_value(key, value)
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit {limit}: must be at least 1 test sample (leave it out for all)")
    if epochs is not None and epochs < 1:
        raise PipelineError(f"--epochs {epochs}: must be at least 1")
    if workers < 0:
        raise PipelineError(f"--workers {workers}: must be >= 0")
    names = parse_measures(attack)
    device = torch.device(device)
    torch.set_flush_denormal(True)  # denormal floats in trained weights slow CPU math down ~10x
    ss = ShardSet.open(data)
    for split in ("train", "test"):
        if split not in ss.splits:
            raise PipelineError(f"{data}: evaluation needs a train and a test split (it has {', '.join(ss.splits)})")
    direct = PROTOCOLS[protocol].own_classifier
    model, ckpt = (load_own_classifier if direct else load_classifier)(checkpoint, ss, device, branch)
    method = ckpt.get("method") or DEFAULT_RECIPE
    recipe = recipe or (method if method in RECIPES else DEFAULT_RECIPE)
    if direct:  # nothing is finetuned: the settings only record that
        recipe = "-"
        s = FinetuneSettings(recipe=recipe, protocol=protocol, epochs=0, lr=0.0, batch_size=0, milestones=[],
                             seed=seed)
    else:
        s = settings or recipe_settings(recipe, protocol, len(ss.classes), epochs, lr, batch_size, milestones, seed)
    trained = ckpt.get("attack") or {}
    b = budget(ss.channels, eps if eps is not None else trained.get("eps"),
               step if step is not None else (None if eps is not None else trained.get("step")), steps, use="eval")
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    losses = []
    if not direct:
        train_loader = ss.loader("train", batch_size=s.batch_size, seed=s.seed, device=device, num_workers=workers)
        losses = finetune(model, train_loader, protocol, s, b.eps, b.step, device, progress)
    finetune_s = time.perf_counter() - started
    test_ids = ss.ids("test")[:limit] if limit else None
    test_loader = ss.loader("test", test_ids, batch_size=eval_batch_size, shuffle=False, device=device,
                            num_workers=workers)
    started = time.perf_counter()
    acc, measure_settings = accuracies(model, test_loader, names, b, len(ss.classes), device, s.seed)
    result = {
        "protocol": protocol, "recipe": recipe, **acc, "measures": names, "attack_settings": measure_settings,
        "eps": b.eps, "attack_step": b.step, "attack_steps": b.steps,
        "finetune": asdict(s), "finetune_losses": losses, "finetune_seconds": finetune_s,
        "attack_seconds": time.perf_counter() - started, "checkpoint": str(checkpoint),
        "checkpoint_epoch": ckpt.get("epoch"), "method": ckpt.get("method"), "arch": model.encoder.__class__.__name__
        if "arch" not in ckpt["model_spec"] else ckpt["model_spec"]["arch"], "eval_branch": model.branches["eval"],
        "branch_role": branch,
        "data": str(data), "dataset_fingerprint": ss.fingerprint, "test_samples_limit": limit,
        "chance": 1 / len(ss.classes),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result["checkpoint_sha256"] = digest = _digest(checkpoint)
    result["results_path"] = str(save_result(results_path(checkpoint), digest, str(checkpoint), names, result))
    return result


def _digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_result(path: Path, digest: str, checkpoint: str, names: list[str], result: dict) -> Path:
    """results.json holds one entry per checkpoint (by content digest), each keyed by protocol and measure, so
    evaluating another checkpoint of the same run never replaces these numbers. An unwritable folder gets the
    results written to a fallback file in the temporary folder, named in the message."""
    try:
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(previous, dict):
            previous = {}
    except (OSError, ValueError):
        previous = {}
    entry = previous.setdefault(digest, {})
    entry.update(checkpoint=checkpoint, checkpoint_epoch=result.get("checkpoint_epoch"))
    suffix = "" if result.get("branch_role", "eval") == "eval" else f"-{result['branch_role']}"
    for name in names[1:] or ["clean"]:
        entry[f"{result['protocol']}-{name}{suffix}"] = {k: v for k, v in result.items() if k != "results_path"}
    try:
        write_json(path, previous)
        return path
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"pipeline-results-{digest}.json"
        write_json(fallback, previous)
        from pipeline.progress import console

        console.print(f"{path}: not writable ({exc.strerror}); results written to {fallback} instead")
        return fallback


__all__ = ["FinetuneSettings", "MEASURES", "PROTOCOLS", "RECIPES", "evaluate", "load_classifier", "recipe_settings"]
