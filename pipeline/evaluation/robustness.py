"""Accuracy of a classifier on clean inputs, under PGD, and under AutoAttack (torchattacks, optional extra)."""

from __future__ import annotations

import torch

from pipeline.attacks import PGD
from pipeline.augment import to_float
from pipeline.errors import PipelineError

ATTACKS = ("pgd20", "autoattack", "none")


@torch.no_grad()
def _correct(model, x, y) -> int:
    return int((model(x).argmax(1) == y).sum())


def accuracies(model, loader, attack: str, eps: float, step: float, n_classes: int, device, seed: int = 0) -> dict:
    """{"clean": ..., "pgd20": ...} (or "autoattack") as fractions over every sample of `loader`."""
    if attack not in ATTACKS:
        raise PipelineError(f"--attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    model.eval()
    gen = torch.Generator(device).manual_seed(seed)
    pgd = PGD(model, "ce", eps, step, 20, generator=gen)
    auto = None
    if attack == "autoattack":
        try:
            import torchattacks
        except ImportError as exc:
            raise PipelineError("AutoAttack needs the attacks extra: pip install 'pipeline[attacks]' "
                                "(install it together with torch==2.13.0, or it pulls a CUDA build of torch)") from exc
        auto = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    clean = robust = total = 0
    for batch in loader:
        x, y = to_float(batch.images.to(device)), batch.labels.to(device)
        clean += _correct(model, x, y)
        if attack == "pgd20":
            with torch.enable_grad():
                robust += _correct(model, pgd(x, y), y)
        elif auto is not None:
            robust += _correct(model, auto(x, y), y)
        total += len(y)
    result = {"clean": clean / max(total, 1), "samples": total}
    if attack != "none":
        result[attack] = robust / max(total, 1)
    return result
