"""`pipeline eval`: finetune a pre-trained encoder by a protocol, then measure clean and robust accuracy.

Settings come from the RobustSSL benchmark's recipe for the checkpoint's method (`--recipe` to choose
another), then the checkpoint's [eval] section, then explicit options. Every setting is written with the
numbers to RUN/results.json (or results.json beside a checkpoint outside a run folder); the finetuned
classifier to RUN/classifiers/ (for `pipeline certify` and for measuring it again without finetuning).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.attacks import budget
from pipeline.checkpoint import load_checkpoint
from pipeline.config import check_value, declare_choices
from pipeline.kv import format_kv, parse_kv
from pipeline.errors import PipelineError, WriteError
from pipeline.evaluation.classifiers import (
    classifier_path,
    finetune_settings_of,
    is_saved_classifier,
    load_classifier,
    load_own_classifier,
    load_saved_classifier,
    save_classifier,
)
from pipeline.evaluation.measures import MEASURES, accuracies, parse_measures
from pipeline.evaluation.protocols import PROTOCOLS, finetune
from pipeline.evaluation.recipes import DEFAULT_RECIPE, RECIPES, FinetuneSettings, recipe_settings
from pipeline.evaluation.records import save_result
from pipeline.evaluation.smoothing import Smoothing
from pipeline.evaluation.transfer import input_record, input_size, pretrained_on
from pipeline.loggers import LOGGERS, RunLoggers
from pipeline.progress import console
from pipeline.redact import redact
from pipeline.runlayout import RunLayout
from pipeline.shards.layout import file_sha256
from pipeline.shards.shardset import ShardSet

declare_choices("eval.protocol", PROTOCOLS.names)
declare_choices("eval.attack", MEASURES.names, many=True)


def results_path(checkpoint: str | Path) -> Path:
    return RunLayout.of_checkpoint(checkpoint).results


def _check_options(limit, workers, **values) -> None:
    for key, value in values.items():
        if value is not None:
            check_value(f"eval.{key}", value)
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit {limit}: must be at least 1 test sample (leave it out for all)")
    if values.get("epochs") is not None and values["epochs"] < 1:
        raise PipelineError(f"--epochs {values['epochs']}: must be at least 1")
    if workers < 0:
        raise PipelineError(f"--workers {workers}: must be >= 0")


def open_shardset(data) -> ShardSet:
    ss = data if isinstance(data, ShardSet) else ShardSet.open(data)
    for split in ("train", "test"):
        if split not in ss.splits:
            raise PipelineError(f"{data}: evaluation needs a train and a test split (it has {', '.join(ss.splits)})")
    return ss


def prepare_classifier(ss: ShardSet, checkpoint: str | Path, protocol: str = "slf", recipe: str | None = None,
                       epochs=None, lr=None, batch_size=None, milestones=None, device="cpu", workers: int = 0,
                       eps=None, step=None, seed: int = 0, progress: bool = True,
                       settings: FinetuneSettings | None = None, branch: str = "eval", noise_sigma: float = 0.0,
                       save: bool = True, reuse: bool = False, resize="auto") -> tuple[torch.nn.Module, dict]:
    """(the classifier to measure, what it is): a classifier `pipeline eval` saved is used as it is; a
    pre-trained checkpoint is finetuned by `protocol` (with Gaussian noise at `noise_sigma` when > 0) and the
    result saved under RUN/classifiers/ (`reuse`: a classifier saved there before with the same settings, data
    and input size is taken instead of finetuning again); `direct` deploys the checkpoint's own classifier.
    `resize` (eval.resize) sets the size the data's images are decoded at (`info["image_size"]`, None: as
    stored; `info["input"]` records the choice)."""
    if protocol not in PROTOCOLS:
        raise PipelineError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if noise_sigma < 0:
        raise PipelineError(f"--noise-sigma {noise_sigma}: must be >= 0")
    device = torch.device(device)
    torch.set_flush_denormal(True)  # denormal floats in trained weights slow CPU math down ~10x
    probe = load_checkpoint(checkpoint)
    info = {"checkpoint": str(checkpoint), "checkpoint_sha256": _digest(checkpoint), "finetune_losses": [],
            "finetune_seconds": 0.0, "classifier_path": None, "reused_classifier": False}
    if is_saved_classifier(probe):
        model, ckpt = load_saved_classifier(checkpoint, ss, device)
        s = finetune_settings_of(ckpt)
        info.update(_input(ckpt, ss, resize))
        return model, {**info, "ckpt": ckpt, "settings": s, "protocol": s.protocol, "recipe": s.recipe,
                       "reused_classifier": True, "classifier_path": str(checkpoint)}
    direct = PROTOCOLS[protocol].own_classifier
    model, ckpt = (load_own_classifier if direct else load_classifier)(checkpoint, ss, device, branch)
    info.update(_input(ckpt, ss, resize))
    method = ckpt.get("method") or DEFAULT_RECIPE
    recipe = recipe or (method if method in RECIPES else DEFAULT_RECIPE)
    if direct:  # nothing is finetuned: the settings only record that
        if noise_sigma:
            raise PipelineError("--noise-sigma: --protocol direct finetunes nothing; choose slf, alf or aff")
        s = FinetuneSettings(recipe="-", protocol=protocol, epochs=0, lr=0.0, batch_size=0, milestones=[], seed=seed)
        return model, {**info, "ckpt": ckpt, "settings": s, "protocol": protocol, "recipe": "-"}
    s = settings or recipe_settings(recipe, protocol, len(ss.classes), epochs, lr, batch_size, milestones, seed,
                                    noise_sigma)
    path = classifier_path(checkpoint, s, info["checkpoint_sha256"], branch, _data_tag(ckpt, ss, info["image_size"]))
    if reuse and path.is_file():
        saved, saved_ckpt = load_saved_classifier(path, ss, device)
        if (saved_ckpt.get("finetune") == asdict(s) and saved_ckpt.get("dataset_fingerprint") == ss.fingerprint
                and saved_ckpt.get("input_size") == info["image_size"]):
            return saved, {**info, "ckpt": saved_ckpt, "settings": s, "protocol": protocol, "recipe": recipe,
                           "reused_classifier": True, "classifier_path": str(path)}
    b = attack_budget(ss, ckpt, eps, step)
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    train_loader = ss.loader("train", batch_size=s.batch_size, seed=s.seed, device=device, num_workers=workers,
                             image_size=info["image_size"])
    losses = finetune(model, train_loader, protocol, s, b.eps, b.step, device, progress)
    info.update(finetune_losses=losses, finetune_seconds=time.perf_counter() - started)
    if save:
        try:
            info["classifier_path"] = str(save_classifier(path, model, ckpt, checkpoint, info["checkpoint_sha256"], s, ss,
                                                          info["image_size"]))
        except WriteError as exc:  # the numbers are measured all the same
            console.print(f"{path}: could not save the finetuned classifier ({exc.reason}); results are kept")
    return model, {**info, "ckpt": ckpt, "settings": s, "protocol": protocol, "recipe": recipe}


def _input(ckpt: dict, ss: ShardSet, resize) -> dict:
    """The size the data is decoded at for this checkpoint and its record: what `auto` means is
    `evaluation.transfer`'s (other data: the pre-training size; its own: as stored; a saved classifier: the size
    it was finetuned at)."""
    spec_size = (ckpt.get("model_spec") or {}).get("image_size")
    if is_saved_classifier(ckpt):
        auto = ckpt.get("input_size")
    else:
        auto = spec_size if ckpt.get("dataset_fingerprint") not in (None, ss.fingerprint) else None
    if auto is None and ss.image_size is None:  # images that vary in size need one
        auto = spec_size
    size = input_size(resize, auto, ss.image_size, ss.root)
    return {"image_size": size, "input": input_record(resize, spec_size, ss.image_size, size)}


def _data_tag(ckpt: dict, ss: ShardSet, size: int | None) -> str:
    """Part of a saved classifier's file name: empty on the pre-training data at its size, else the data's
    fingerprint and the input size, so that a transfer classifier never stands in for the other."""
    tag = "" if ckpt.get("dataset_fingerprint") in (None, ss.fingerprint) else f"-on-{ss.fingerprint[:8]}"
    return tag + (f"-{size}px" if size else "")


def attack_budget(ss: ShardSet, ckpt: dict, eps=None, step=None, steps=None):
    """The evaluation budget: explicit eps/step, else the checkpoint's training eps (its step unless eps is
    given), else the data's default."""
    trained = ckpt.get("attack") or {}
    return budget(ss.channels, eps if eps is not None else trained.get("eps"),
                  step if step is not None else (None if eps is not None else trained.get("step")), steps, use="eval")


def evaluate(data: str | Path, checkpoint: str | Path, protocol: str = "slf", attack: str = "pgd20",
             recipe: str | None = None, epochs: int | None = None, lr: float | None = None,
             batch_size: int | None = None, milestones=None, limit: int | None = None, eval_batch_size: int = 256,
             device="cpu", workers: int = 0, eps: float | None = None, step: float | None = None,
             steps: int | None = None, seed: int = 0, progress: bool = True, settings: FinetuneSettings | None = None,
             branch: str = "eval", noise_sigma: float = 0.0, smoothing: Smoothing | str | None = None,
             limits: str | dict | None = None, resize="auto") -> dict:
    """`limits`: per measure, the first N test samples it runs on (`autoattack=1000`); the others run on
    `limit` (all when None). Each measure's count is in the result (`measure_samples`). `resize`: eval.resize
    (transfer to data of another size: see `evaluation.transfer`)."""
    _check_options(limit, workers, eps=eps, step=step, steps=steps, epochs=epochs, lr=lr,
                   batch_size=batch_size)
    names = parse_measures(attack)
    own = parse_kv(limits, "eval.limits") if isinstance(limits, str) else dict(limits or {})
    check_value("eval.limits", format_kv(own))
    unknown = sorted(set(own) - set(names))
    if unknown:
        raise PipelineError(f"eval.limits names {', '.join(unknown)}, which is not measured (--attack "
                            f"{','.join(names[1:]) or 'clean'})")
    if isinstance(smoothing, str):
        smoothing = Smoothing.parse(smoothing) if smoothing.strip() else None
    device = torch.device(device)
    ss = open_shardset(data)
    model, info = prepare_classifier(ss, checkpoint, protocol, recipe, epochs, lr, batch_size, milestones, device,
                                     workers, eps, step, seed, progress, settings, branch, noise_sigma,
                                     resize=resize)
    ckpt, s = info["ckpt"], info["settings"]
    b = attack_budget(ss, ckpt, eps, step, steps)
    if smoothing is not None:  # EOT passes hold m noisy copies of each image: fewer images per batch
        eval_batch_size = max(1, min(eval_batch_size, smoothing.batch // smoothing.eot_draws))
    started = time.perf_counter()
    acc, measure_settings, measure_samples = {}, {}, {}
    groups: dict = {}
    for name in names:  # measures on the same samples share one pass over them
        groups.setdefault(own.get(name, limit), []).append(name)
    for count, group in groups.items():
        test_ids = ss.ids("test")[:count] if count else None
        test_loader = ss.loader("test", test_ids, batch_size=eval_batch_size, shuffle=False, device=device,
                                num_workers=workers, image_size=info["image_size"])
        part, part_settings = accuracies(model, test_loader, group, b, len(ss.classes), device, s.seed, smoothing,
                                         progress)
        acc.setdefault("samples", part["samples"])  # the first group's: the eval.limit measures, clean among them
        acc.update({k: v for k, v in part.items() if k != "samples"})
        measure_settings.update(part_settings)
        measure_samples.update(dict.fromkeys(group, part["samples"]))
    spec = ckpt["model_spec"]
    result = {
        "protocol": info["protocol"], "recipe": info["recipe"], **acc, "measures": names,
        "attack_settings": measure_settings, "measure_samples": measure_samples, "eps": b.eps, "attack_step": b.step, "attack_steps": b.steps,
        "noise_sigma": s.noise_sigma, "smoothing": smoothing.as_dict() if smoothing else None,
        "finetune": asdict(s), "finetune_losses": info["finetune_losses"], "finetune_seconds": info["finetune_seconds"],
        "attack_seconds": time.perf_counter() - started, "checkpoint": redact(str(checkpoint)),
        "checkpoint_epoch": ckpt.get("epoch"), "method": ckpt.get("method"),
        "arch": spec.get("arch", type(model).__name__), "eval_branch": model.branches["eval"],
        "branch_role": branch, "classifier_path": info["classifier_path"],
        "reused_classifier": info["reused_classifier"],
        "data": redact(str(ss.root)), "data_name": ss.name, "dataset_fingerprint": ss.fingerprint,
        "test_samples_limit": limit, "input": info["input"], "pretrained_on": _redacted(pretrained_on(ckpt)),
        "chance": 1 / len(ss.classes),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result["checkpoint_sha256"] = digest = info["checkpoint_sha256"]
    # The numbers are measured: a record that cannot be written anywhere is the caller's to report after
    # printing them (results_path None, save_error the one line), never a reason to lose them.
    try:
        result["results_path"] = str(save_result(results_path(checkpoint), digest, str(checkpoint), names, result))
    except WriteError as exc:
        result["results_path"], result["save_error"] = None, exc.reason
    log_to_run(checkpoint, ckpt, result)
    return result


def _redacted(where: dict) -> dict:
    return {**where, "path": redact(str(where["path"])) if where.get("path") else where.get("path")}


def log_to_run(checkpoint, ckpt: dict, result: dict) -> None:
    """The evaluation into the loggers of the run the checkpoint belongs to (its config's run.loggers)."""
    layout = RunLayout.of_checkpoint(checkpoint)
    config = ckpt.get("config")
    if not isinstance(config, dict) or not layout.is_run():
        return
    names = [n for n in (config.get("run", {}).get("loggers") or []) if isinstance(n, str) and n in LOGGERS]
    if not names:
        return
    # The checkpoint's settings are read from a file (perhaps someone else's): they never send data anywhere.
    # W&B logs offline here unless the invoking user's environment asks (WANDB_MODE).
    run_settings = config.get("run") if isinstance(config.get("run"), dict) else {}
    config = {**config, "run": {**run_settings, "wandb_mode": "offline"}}
    loggers = RunLoggers(layout.root, config, names)
    try:
        loggers.evaluation(result, int(ckpt.get("global_step") or 0))
    finally:
        loggers.close()


def _digest(path) -> str:
    return file_sha256(path)[:16]


__all__ = ["FinetuneSettings", "MEASURES", "PROTOCOLS", "RECIPES", "Smoothing", "evaluate", "load_classifier",
           "load_own_classifier", "prepare_classifier", "recipe_settings"]
