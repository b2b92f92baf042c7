"""Checkpoints: plain dicts of tensors and numbers, saved atomically, loaded with weights_only=True."""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.atomic import atomic_path
from pipeline.errors import DataError
from pipeline.models import arch_choices, create_model, is_known_arch, upgrade_spec, upgrade_state
from pipeline.models.heads import HEADS
from pipeline.validate import Fields

FORMAT = "pipeline.checkpoint"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    # Through a file object: torch names the archive inside after a file name (the temporary one would make
    # every save's bytes differ); a stream gets one fixed name, so the same state gives the same bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save({"format": FORMAT, "tool_version": __version__, **payload}, f)
        except RuntimeError as exc:  # torch's writer reports a full disk or a size limit as RuntimeError
            raise OSError(errno.EIO, f"the write stopped: {(str(exc).splitlines() or ['?'])[0][:120]}") from exc
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint (train one with `pipeline train`, or check the path)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: not a readable checkpoint (an empty file); use another checkpoint of the run")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] in (b"{", b"[") or head.startswith(b"\x93NUMPY"):
        what = "a numpy array" if head.startswith(b"\x93NUMPY") else "a JSON record (a manifest, results?)"
        raise DataError(f"{path}: {what}, not a checkpoint; give a .pt file written by `pipeline train` "
                        "(RUN/last.pt, RUN/epoch-N.pt) or by save_snapshot")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated files and foreign pickles
        # torch's own advice (load with weights_only=False) would run whatever the file holds: never given
        first = (str(exc).strip().splitlines() or [""])[0].split(" In PyTorch 2.6")[0][:200]
        if "weights_only" in first or "Unpickl" in type(exc).__name__:
            first = "it holds objects a checkpoint of this tool never does; it is not loaded"
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}{': ' + first if first else ''}); "
                        "give a checkpoint written by `pipeline train` or save_snapshot") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "model_spec" not in ckpt:
        raise DataError(f"{path}: not a checkpoint written by `pipeline train` (no model spec); cannot rebuild its model")
    return ckpt


def check_fits(path, spec: dict, channels: int, data) -> None:
    """One line when a checkpoint's model cannot take the data's images (the channel count): before any work,
    not a convolution's traceback."""
    if spec.get("in_channels") != channels:
        raise DataError(f"{path}: the model takes {spec.get('in_channels')}-channel images, {data} has "
                        f"{channels}-channel ones; use a checkpoint trained on data like it")


def load_model(path: str | Path, map_location="cpu"):
    """(the model a checkpoint was trained as, with its weights; the checkpoint dict)."""
    ckpt = load_checkpoint(path, map_location)
    bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"{path}: holds non-finite weights (NaN or inf, e.g. {bad[0]}); it cannot be selected or "
                        "evaluated with; use an earlier checkpoint of the run")
    model = create_model(validate_spec(path, ckpt["model_spec"]))
    load_weights(model, ckpt["model"], path)
    return model, ckpt


def validate_spec(path, spec) -> dict:
    """A checkpoint's model spec, checked field by field before a model is built from it (a forged width would
    otherwise allocate without bound)."""
    f = Fields(path, upgrade_spec(spec) if isinstance(spec, dict) else spec, "use a checkpoint `pipeline train` wrote",
               "model_spec.")
    arch = f.text("arch")
    if not is_known_arch(arch):
        f.fail("arch", arch, f"must be one of {arch_choices()}")
    f.int("image_size", 1, 4096, optional=True)
    f.int("in_channels", 1, 3)
    f.text("stem")
    branches = f.list("branches")
    if not branches or not all(isinstance(b, str) for b in branches):
        f.fail("branches", branches, "must be a non-empty list of names")
    roles = f.table("roles")
    if any(b not in branches for b in roles.values()):
        f.fail("roles", roles, f"must name branches of the model ({', '.join(branches)})")
    heads = f.table("heads")
    for name in heads:
        h = f.inner(f"heads.{name}", heads[name])
        kind = h.text("kind")
        if kind not in HEADS:
            h.fail("kind", kind, f"must be one of {HEADS.choices(', ')}")
        h.int("width", 0, 1 << 16)
        h.int("out", 1, 1 << 16)
    return f.record


def load_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict with a message that says which architecture the weights do not fit."""
    arch = getattr(model, "spec", {}).get("arch", "?")
    try:
        result = model.load_state_dict(upgrade_state(state), strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)[:200]
        raise DataError(f"{path}: weights do not fit the model {arch} ({detail.strip()}); "
                        "was it trained with another architecture?") from None
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"{path}: weights do not fit the model {arch} "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected tensors, e.g. "
            f"{(result.missing_keys or result.unexpected_keys)[0]}); was it trained with another architecture?"
        )
