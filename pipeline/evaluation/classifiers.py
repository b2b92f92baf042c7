"""The classifiers evaluation deploys, and the files it keeps them in.

A pre-trained checkpoint becomes a classifier by a protocol: its encoder + a finetuned linear layer (SLF, ALF,
AFF), or its own classifier head (direct). `pipeline eval` saves each finetuned classifier as a checkpoint of
kind "classifier" (RUN/classifiers/PROTOCOL[-noiseS]-DIGEST.pt), so `pipeline certify` and later evaluations
use it without finetuning again. It is an ordinary checkpoint (the full model's weights and spec) plus the
linear layer, the deployed branch and the finetuning settings.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.checkpoint import check_fits, load_model, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.evaluation.protocols import LinearClassifier, OwnClassifier
from pipeline.evaluation.recipes import FinetuneSettings
from pipeline.models.multibn import multibn_layers
from pipeline.runlayout import RunLayout
from pipeline.shards.shardset import ShardSet

KIND = "classifier"


def _check(checkpoint, model, ckpt, shardset: ShardSet, role: str) -> None:
    spec = model.spec
    check_fits(checkpoint, spec, shardset.channels, shardset.root)
    if role not in spec["roles"]:
        raise PipelineError(f"--branch {role!r}: the model has branches for {', '.join(spec['roles'])}")


def load_classifier(checkpoint: str | Path, shardset: ShardSet, device, role: str = "eval"):
    """(encoder + a fresh linear layer, checkpoint); `role` picks the branch deployed: the method's eval branch,
    or another role (e.g. "natural", to see what the encoder's natural branch gives for scale)."""
    model, ckpt = load_model(checkpoint)
    _check(checkpoint, model, ckpt, shardset, role)
    roles = {r: model.branch(r) for r in model.spec["roles"]}
    roles["eval"] = roles[role]
    return LinearClassifier(model.encoder, model.feature_dim, len(shardset.classes), roles).to(device), ckpt


def load_own_classifier(checkpoint: str | Path, shardset: ShardSet, device, role: str = "eval"):
    """(the model's own classifier through the `role` branch, checkpoint), for `--protocol direct`."""
    model, ckpt = load_model(checkpoint)
    _check(checkpoint, model, ckpt, shardset, role)
    heads = model.spec["heads"]
    if "logits" not in heads:
        raise PipelineError(f"{checkpoint}: --protocol direct needs a model with its own classifier (a 'logits' "
                            f"head, as ascl trains); this {ckpt.get('method')} model has {', '.join(heads)}: "
                            "use --protocol slf, alf or aff")
    if heads["logits"]["out"] != len(shardset.classes):
        raise PipelineError(f"{checkpoint}: its classifier has {heads['logits']['out']} classes, "
                            f"{shardset.root} has {len(shardset.classes)}")
    return OwnClassifier(model, model.branch(role)).to(device), ckpt


def is_saved_classifier(ckpt: dict) -> bool:
    return ckpt.get("kind") == KIND


def classifier_path(checkpoint: str | Path, s: FinetuneSettings, digest: str, role: str = "eval",
                    data_tag: str = "") -> Path:
    """`data_tag`: "" on the pre-training data, else what tells transfer classifiers apart (data, input size)."""
    noise = f"-noise{s.noise_sigma:g}" if s.noise_sigma else ""
    branch = "" if role == "eval" else f"-{role}"
    return RunLayout.of_checkpoint(checkpoint).classifiers / f"{s.protocol}{noise}{branch}{data_tag}-{digest}.pt"


def save_classifier(path: Path, clf: LinearClassifier, source: dict, source_path, digest: str, s: FinetuneSettings,
                    shardset: ShardSet, input_size: int | None = None) -> Path:
    """The finetuned classifier as a checkpoint: the source model's weights with the (possibly finetuned)
    encoder's in place, the linear layer, the deployed branches, and how it was made."""
    state = dict(source["model"])
    state.update({f"encoder.{k}": v.detach().cpu() for k, v in clf.encoder.state_dict().items()})
    return save_checkpoint(path, {
        "kind": KIND, "model": state, "model_spec": source["model_spec"], "method": source.get("method"),
        "attack": source.get("attack"), "epoch": source.get("epoch"),
        "fc": {k: v.detach().cpu() for k, v in clf.fc.state_dict().items()}, "branches": dict(clf.branches),
        "n_classes": len(shardset.classes), "finetune": asdict(s), "source_checkpoint": str(source_path),
        "source_sha256": digest, "dataset_fingerprint": shardset.fingerprint, "dataset_name": shardset.name,
        "input_size": input_size, "pretrained_on": {"fingerprint": source.get("dataset_fingerprint"),
                                                    "name": source.get("dataset_name")}})


def load_saved_classifier(path: str | Path, shardset: ShardSet, device):
    """(the classifier `pipeline eval` saved, its checkpoint dict)."""
    model, ckpt = load_model(path)
    _check(path, model, ckpt, shardset, "eval")
    if ckpt.get("n_classes") != len(shardset.classes):
        raise PipelineError(f"{path}: a classifier of {ckpt.get('n_classes')} classes; {shardset.root} has "
                            f"{len(shardset.classes)}")
    branches = ckpt.get("branches")
    have = {b for m in multibn_layers(model.encoder) if not m.shared for b in m.bns}
    if (not isinstance(branches, dict) or "eval" not in branches
            or not all(isinstance(v, str) and (not have or v in have) for v in branches.values())):
        raise PipelineError(f"{path}: its branches {str(branches)[:80]} are not batch-norm branches of its encoder "
                            f"({', '.join(sorted(have)) or 'one shared'}); re-run `pipeline eval` on the pre-trained "
                            "checkpoint to make it again")
    clf = LinearClassifier(model.encoder, model.feature_dim, ckpt["n_classes"], branches)
    try:
        clf.fc.load_state_dict(ckpt["fc"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: its linear layer does not fit the model ({exc}); re-run `pipeline eval` "
                            "on the pre-trained checkpoint to make it again") from None
    return clf.to(device).eval(), ckpt


def finetune_settings_of(ckpt: dict) -> FinetuneSettings:
    known = FinetuneSettings.__dataclass_fields__
    return FinetuneSettings(**{k: v for k, v in (ckpt.get("finetune") or {}).items() if k in known})


__all__ = ["is_saved_classifier", "load_classifier", "load_own_classifier", "load_saved_classifier",
           "save_classifier", "classifier_path"]
