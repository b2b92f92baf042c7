"""Transfer evaluation: a checkpoint pre-trained on data A, finetuned and measured on data B.

RCS's headline claim is robustness transferability (pre-train on ImageNet or CIFAR-10, then SLF/ALF/AFF on
CIFAR-10, CIFAR-100, STL-10), AdvCL's cross-task transfer. B may have other classes (the linear layer is B's),
another image size and the same channel count (another count is refused before any work). What size the encoder
sees is explicit (`eval.resize`):

    auto  B's images resized to the size the encoder was pre-trained at, when they differ (the papers' protocol:
          STL-10's 96 px go in at 32 px for a CIFAR-10 encoder); the pre-training data itself as stored (as
          before: a 224-px crop model on 256-px images sees them whole), a saved classifier at the size it was
          finetuned at, and images that vary in size at the pre-training size
    none  B's images as stored (the encoder's pooling takes any size)
    N     every image resized to N x N

Resizing is the decoder's (shorter side to N, centre crop), done per image while reading. The choice, both sizes
and the one used are recorded in results.json (`input`), and a resized measure is defined by its size.
"""

from __future__ import annotations

from pipeline.config import parse_resize
from pipeline.errors import PipelineError

def input_size(resize, auto_size: int | None, data_size: int | None, data) -> int | None:
    """The size the evaluation decodes `data`'s images at: None keeps them as stored. `auto_size` is what `auto`
    means here (see the module's text; None: as stored), `data_size` the shard set's (None where its images vary
    in size)."""
    choice = parse_resize(resize)
    size = auto_size if choice == "auto" else None if choice == "none" else choice
    if size is None and data_size is None:
        raise PipelineError(f"{data}: its images vary in size and the checkpoint records no pre-training size; "
                            "give --resize N (the encoder's input size)")
    return None if size == data_size else size


def input_record(resize, model_size: int | None, data_size: int | None, used: int | None) -> dict:
    """results.json's `input`: the choice, the checkpoint's and the data's sizes, the size measured at."""
    return {"resize": parse_resize(resize), "pretrained_size": model_size, "data_size": data_size,
            "size": used or data_size}


def pretrained_on(ckpt: dict) -> dict:
    """What a checkpoint was pre-trained on, as far as it records: the shard set's name, path and fingerprint."""
    if isinstance(ckpt.get("pretrained_on"), dict):  # a classifier `pipeline eval` saved: its encoder's data
        return {"path": None, **ckpt["pretrained_on"]}
    path = ((ckpt.get("config") or {}).get("data") or {}).get("path")
    name = ckpt.get("dataset_name") or (str(path).rstrip("/").rsplit("/", 1)[-1] if path else None)
    return {"name": name, "path": path, "fingerprint": ckpt.get("dataset_fingerprint")}


def is_transfer(result: dict) -> bool:
    """Evaluated on other data than the checkpoint was pre-trained on (a checkpoint that records no data: no)."""
    source = (result.get("pretrained_on") or {}).get("fingerprint")
    return bool(source) and source != result.get("dataset_fingerprint")


def transfer_text(result: dict) -> str:
    """"pre-trained on A, evaluated on B (resized 96 -> 32 px)", or "" for an evaluation on the training data."""
    if not is_transfer(result):
        return ""
    a = result["pretrained_on"].get("name") or result["pretrained_on"].get("fingerprint")
    b = result.get("data_name") or result.get("data")
    inp = result.get("input") or {}
    size = ""
    if inp.get("size") and inp.get("size") != inp.get("data_size"):
        size = f" (resized {inp.get('data_size') or 'varying'} -> {inp['size']} px)"
    return f"pre-trained on {a}, evaluated on {b}{size}"


__all__ = ["input_record", "input_size", "is_transfer", "parse_resize", "pretrained_on",
           "transfer_text"]
