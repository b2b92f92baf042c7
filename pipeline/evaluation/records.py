"""results.json: every evaluation of a run's checkpoints, kept by what defines each number.

A measured accuracy is defined by everything that makes it: the test data (its fingerprint; the samples are
the first N of the set's fixed order, so the count says which), the protocol and its finetuning settings, the
measure and its parameters (eps, steps, restarts, ...), the branch, noise and smoothing. Each measure of an
evaluation is stored under `READABLE@DIGEST` (`slf-pgd20@3f9c0a1d2b`): the readable part as before (protocol,
noise, smoothing, measure, branch), the digest of the whole definition, so a quick `--limit 200` run, a
transfer evaluation on another data set or another eps sits beside the full one instead of replacing it.
Measuring the same definition again replaces that entry and says so in one line.

    {CHECKPOINT_DIGEST: {"checkpoint": PATH, "checkpoint_epoch": E,
                         "slf-pgd20@3f9c0a1d2b": {...the evaluation's result, "definition": {...}}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from pipeline.atomic import move_aside, write_json
from pipeline.errors import PipelineError, WriteError
from pipeline.locks import record_lock
from pipeline.progress import console
from pipeline.validate import parse_json


def result_key(result: dict, name: str) -> str:
    """The readable part of a measure's key: protocol, noise, smoothing, measure, branch."""
    noise = f"-noise{result['noise_sigma']:g}" if result.get("noise_sigma") else ""
    sm = result.get("smoothing")
    smoothed = f"-smoothed{sm['sigma']:g}-n{sm['n']}" if sm else ""
    branch = "" if result.get("branch_role", "eval") == "eval" else f"-{result['branch_role']}"
    return f"{result['protocol']}{noise}{smoothed}-{name}{branch}"


def definition(result: dict, name: str) -> dict:
    """Everything that defines measure `name`'s number in `result` (an evaluation's result dict)."""
    samples = (result.get("measure_samples") or {}).get(name, result.get("samples"))
    inp = result.get("input") or {}
    resized = {"input_size": inp["size"]} if inp.get("size") and inp.get("size") != inp.get("data_size") else {}
    return {**resized,
        "dataset_fingerprint": result.get("dataset_fingerprint"), "split": "test",
        "samples": samples, "which": "first", "protocol": result.get("protocol"),
        "finetune": result.get("finetune"), "measure": name,
        "measure_settings": (result.get("attack_settings") or {}).get(name, {}),
        "branch": result.get("branch_role", "eval"), "eval_branch": result.get("eval_branch"),
        "noise_sigma": result.get("noise_sigma"), "smoothing": result.get("smoothing"),
    }


def definition_key(result: dict, name: str) -> str:
    d = definition(result, name)
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{result_key(result, name)}@{digest}"


def readable(key: str) -> str:
    """`slf-pgd20@3f9c0a1d2b` -> `slf-pgd20` (a key written before definitions were kept has no digest)."""
    return key.split("@", 1)[0]


def find(entry: dict, name: str) -> list[dict]:
    """The stored results of one checkpoint's entry whose readable key is `name` (`slf-pgd20`), oldest first."""
    found = [v for k, v in entry.items() if isinstance(v, dict) and readable(k) == name]
    return sorted(found, key=lambda v: str(v.get("date", "")))


def samples_text(result: dict) -> str:
    """How many test samples the measures of an evaluation ran on: `10,000`, or `10,000 (autoattack 1,000)` when
    `eval.limits` gave some measure fewer (one number never stands for two sample sets)."""
    counts = result.get("measure_samples") or {}
    base = result.get("samples")
    other = {n: c for n, c in counts.items() if c != base}
    text = f"{base:,}" if isinstance(base, int) else "-" if base is None else str(base)
    return text + (f" ({', '.join(f'{n} {c:,}' for n, c in other.items())})" if other else "")


def _ours(record) -> bool:
    """A results.json of ours: one entry per checkpoint digest, each naming its checkpoint."""
    return (isinstance(record, dict) and bool(record)
            and all(isinstance(v, dict) and "checkpoint" in v for v in record.values()))


def read_results(path: Path) -> dict:
    """The results recorded so far; a damaged file of ours is moved aside (said so), a foreign one refused."""
    if not path.exists():
        return {}
    try:
        record = parse_json(path.read_text())
    except (OSError, ValueError):
        aside = move_aside(path)
        console.print(f"[yellow]{path}: unreadable (a torn or edited file); kept as {aside.name}, starting a new "
                      "one[/]")
        return {}
    if not _ours(record):
        raise PipelineError(f"{path}: exists and is not a results file of this tool; refusing to replace it (move "
                            "it away, or evaluate a checkpoint outside that folder)")
    return record


def _merge(record: dict, digest: str, checkpoint: str, names: list[str], result: dict, path: Path) -> dict:
    stored = {k: v for k, v in result.items() if k != "results_path"}
    entry = record.setdefault(digest, {})
    entry.update(checkpoint=checkpoint, checkpoint_epoch=result.get("checkpoint_epoch"))
    for name in names:
        key = definition_key(result, name)
        if key in entry:
            console.print(f"{path}: {readable(key)} of this checkpoint on the same definition (data, samples, "
                          f"settings) was measured before ({entry[key].get('date', 'undated')}); replaced")
        entry[key] = {**stored, "definition": definition(result, name)}
    return record


def save_result(path: Path, digest: str, checkpoint: str, names: list[str], result: dict) -> Path:
    """Add one evaluation's measures to results.json under their definitions (one entry per checkpoint, by
    content digest). Read, merged and written under a lock of the record: two evaluations at once keep both.
    Where the record cannot be written (a read-only folder, a full disk: its lock included), everything it held
    plus these results go to a fallback file in the temporary folder, named in the message; a WriteError only
    when that fails too (the caller has the numbers and prints them)."""
    try:
        with record_lock(path, "pipeline eval"):
            record = _merge(read_results(path), digest, checkpoint, names, result, path)
            write_json(path, record)
            return path
    except (WriteError, OSError) as exc:
        reason = exc.reason if isinstance(exc, WriteError) else (exc.strerror or str(exc))
    fallback = Path(tempfile.gettempdir()) / f"pipeline-results-{digest}.json"
    try:
        previous = read_results(path) if path.is_file() else {}
    except (PipelineError, OSError):  # foreign, or damaged where it cannot be moved aside: these results only
        previous = {}
    try:
        with record_lock(fallback, "pipeline eval"):
            here = read_results(fallback) if fallback.is_file() else {}
            record = _merge({**previous, **here}, digest, checkpoint, names, result, fallback)
            write_json(fallback, record)
    except (WriteError, OSError) as exc:
        why = exc.reason if isinstance(exc, WriteError) else (exc.strerror or str(exc))
        raise WriteError(path, f"{reason}; the fallback {fallback} failed too: {why}") from None
    console.print(f"{path}: not writable ({reason}); results written to {fallback} instead")
    return fallback


__all__ = ["definition", "definition_key", "find", "read_results", "readable", "result_key", "samples_text",
           "save_result"]
