"""`pipeline certify`: Cohen et al.'s CERTIFY over a test split, one TSV row per sample, resumable.

OUT/certify.tsv has a row per sample (id, label, prediction, radius, correct, seconds), appended and flushed
as each is done; OUT/certify.json holds the settings the rows were made with (a rerun with other settings is
refused, the same command continues where an interrupted one stopped) and, once all rows are there, the
summary: certified accuracy at l2 radii 0-1 and the l_inf radius each implies (radius / sqrt(d)).

Every sample's noise comes from its own generator, seeded by (seed, sample id): a resumed run draws exactly
what an uninterrupted one would, so its TSV is the same but for the seconds column.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_json
from pipeline.augment import to_float
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import DataError, PipelineError, WriteError
from pipeline.evaluation import _digest, attack_budget, open_shardset, prepare_classifier
from pipeline.evaluation.classifiers import is_saved_classifier
from pipeline.evaluation.smoothing import certify_sample, linf_radius
from pipeline.locks import folder_lock
from pipeline.progress import console, progress_bar
from pipeline.runlayout import RunLayout
from pipeline.validate import parse_json

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
COLUMNS = ("id", "label", "prediction", "radius", "correct", "seconds")
IDENTITY = ("sigma", "n0", "n", "alpha", "seed", "split", "batch", "classifier_sha256", "dataset_fingerprint")


def _sample_generator(device, seed: int, sample_id: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + int(sample_id))


def cut_torn_row(tsv: Path) -> None:
    """Cut a partial last line (the run was killed while writing it) off the file, so appending continues
    cleanly. Only `certify`, the table's writer, calls this; readers skip the torn line instead."""
    if not tsv.is_file():
        return
    raw = tsv.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(tsv, "r+b") as f:
            f.truncate(end)


def read_rows(tsv: Path) -> list[dict]:
    """The complete rows of a certification TSV (a partial last line is left out, and the file left as it is)."""
    if not tsv.is_file():
        return []
    raw = tsv.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end == 0 and ("\t".join(COLUMNS) + "\n").encode().startswith(raw):
        return []  # empty, or a header cut short (a full disk at the first write): nothing certified yet
    lines = raw[:end].decode().splitlines()
    if not lines or tuple(lines[0].split("\t")) != COLUMNS:
        raise DataError(f"{tsv}: not a certification table (header {lines[0] if lines else 'missing'!r}); "
                        "delete it or give another --out")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        try:
            if len(parts) != len(COLUMNS):
                raise ValueError
            rows.append({"id": int(parts[0]), "label": int(parts[1]), "prediction": int(parts[2]),
                         "radius": float(parts[3]), "correct": int(parts[4]), "seconds": float(parts[5])})
        except ValueError:
            raise DataError(f"{tsv}, line {n}: malformed row {line[:80]!r}; delete the file to certify again") from None
    return rows


def certified_accuracy(rows: list[dict], radii=RADII) -> dict:
    """{radius: fraction of rows correct with a certified radius at least that}."""
    radius = np.array([r["radius"] for r in rows], dtype=np.float64)
    correct = np.array([r["correct"] for r in rows], dtype=bool)
    return {float(r): float((correct & (radius >= r)).mean()) if len(rows) else 0.0 for r in radii}


def summarize(rows: list[dict], settings: dict, dims: int, linf_eps: float) -> dict:
    acc = certified_accuracy(rows)
    cover = linf_eps * math.sqrt(dims)  # the l2 radius whose ball holds the whole l_inf ball of linf_eps
    return {
        "samples": len(rows), "abstained": sum(r["prediction"] < 0 for r in rows),
        "certified_accuracy": {f"{r:g}": a for r, a in acc.items()},
        "linf_radius": {f"{r:g}": linf_radius(r, dims) for r in acc},
        "dims": dims, "linf_eps": linf_eps, "l2_radius_covering_linf_eps": cover,
        "certified_accuracy_at_linf_eps": certified_accuracy(rows, (cover,))[cover],
        "seconds_per_sample": float(np.median([r["seconds"] for r in rows])) if rows else 0.0,
        "settings": settings,
    }


def _check_settings(meta_path: Path, settings: dict) -> None:
    if not meta_path.is_file():
        return
    try:
        before = parse_json(meta_path.read_text())["settings"]
        if not isinstance(before, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{meta_path}: not a certification record of this tool (unreadable, edited or foreign); "
                        "refusing to replace it: give another --out") from None
    differ = [k for k in IDENTITY if before.get(k) != settings.get(k)]
    if differ:
        what = ", ".join(f"{k} {before.get(k)} -> {settings.get(k)}" for k in differ)
        raise PipelineError(f"{meta_path.parent}: holds a certification with other settings ({what}); give another "
                            "--out, or delete that folder to start over")


def _certify_into(tsv: Path, new_file: bool, todo, model, ss, split, sigma, n0, n, alpha, n_classes, seed, batch,
                  device, workers, progress, image_size: int | None = None) -> None:
    """Certify the samples `todo`, a row each appended to `tsv` and flushed (the header first in a new file). A
    write that fails (a full disk) is one line naming the table; the rows written before it are kept and the
    same command continues from them."""

    def put(f, line: str) -> None:
        try:
            f.write(line + "\n")
            f.flush()
        except OSError as exc:
            raise WriteError(tsv, f"{exc.strerror or exc}; the rows already written are kept, run the same "
                                  "command again to continue") from None

    try:
        f = open(tsv, "a")
    except OSError as exc:
        raise WriteError(tsv, exc.strerror or str(exc)) from None
    with f, progress_bar(progress, unit="samples/s") as bar:
        if new_file:
            put(f, "\t".join(COLUMNS))
        task = bar.add_task(f"certify sigma {sigma:g}, n {n:,}", total=len(todo))
        for b in ss.loader(split, todo, batch_size=64, shuffle=False, device=device, num_workers=workers,
                           image_size=image_size):
            images = to_float(b.images.to(device))
            for x, sample_id, label in zip(images, b.ids.tolist(), b.labels.tolist()):
                started = time.perf_counter()
                pred, radius, _ = certify_sample(model, x, sigma, n0, n, alpha, n_classes,
                                                 _sample_generator(device, seed, sample_id), batch)
                row = (sample_id, label, pred, f"{radius:.6f}", int(pred == label),
                       f"{time.perf_counter() - started:.3f}")
                put(f, "\t".join(map(str, row)))
                bar.advance(task)


def certify(data, checkpoint, sigma: float, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
            limit: int | None = None, out=None, protocol: str = "slf", batch: int = 4096, seed: int = 0,
            device="cpu", split: str = "test", progress: bool = True, recipe=None, epochs=None, lr=None,
            batch_size=None, workers: int = 0, eps: float | None = None) -> dict:
    """Certify the first `limit` samples of `split`; returns the summary (also in OUT/certify.json)."""
    if not sigma > 0:
        raise PipelineError(f"--sigma {sigma}: must be > 0")
    if n0 < 1 or n < 1 or batch < 1:
        raise PipelineError("--n0, --n and --batch must be at least 1")
    if not 0 < alpha < 1:
        raise PipelineError(f"--alpha {alpha}: must be in (0, 1)")
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit {limit}: must be at least 1 sample (leave it out for all)")
    device = torch.device(device)
    ss = open_shardset(data)
    if split not in ss.splits:
        raise PipelineError(f"{data}: no {split!r} split (it has {', '.join(ss.splits)})")
    probe = load_checkpoint(checkpoint)
    if not is_saved_classifier(probe) and protocol != "direct":
        console.print(f"{checkpoint} is a pre-trained encoder: finetuning a classifier on it first, by {protocol} "
                      f"with Gaussian noise at sigma {sigma:g} (as `pipeline eval --noise-sigma {sigma:g}` does; a "
                      "classifier saved before with these settings is used instead)")
    model, info = prepare_classifier(ss, checkpoint, protocol, recipe, epochs, lr, batch_size, device=device,
                                     workers=workers, seed=seed, progress=progress, noise_sigma=0.0 if protocol == "direct"
                                     else sigma, reuse=True)
    trained_sigma = info["settings"].noise_sigma
    if protocol != "direct" and abs(trained_sigma - sigma) > 1e-12:
        console.print(f"note: the classifier was finetuned with noise sigma {trained_sigma:g}, certified at {sigma:g}: "
                      "the certificates hold, but a base classifier trained at the same sigma certifies more")
    classifier_file = info["classifier_path"] or str(checkpoint)
    if info["classifier_path"] and not info["reused_classifier"]:
        console.print(f"finetuned classifier saved to {classifier_file}")
    model.eval()
    stem = Path(classifier_file).stem if info["classifier_path"] else f"direct-{info['checkpoint_sha256']}"
    out = Path(out) if out else RunLayout.of_checkpoint(classifier_file).certify / f"{stem}-sigma{sigma:g}-n{n}"
    settings = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "split": split, "batch": batch,
                "classifier_sha256": _digest(classifier_file), "dataset_fingerprint": ss.fingerprint,
                "classifier": classifier_file, "checkpoint": str(checkpoint), "data": str(data),
                "trained_noise_sigma": trained_sigma, "limit": limit,
                **({"input_size": info["image_size"]} if info["image_size"] else {})}  # resized: transfer
    with folder_lock(out, "pipeline certify"):  # one certification at a time appends to the table
        out.mkdir(parents=True, exist_ok=True)
        tsv, meta = out / "certify.tsv", out / "certify.json"
        _check_settings(meta, settings)
        write_json(meta, {"settings": settings})
        ids = ss.ids(split)[:limit] if limit else ss.ids(split)
        cut_torn_row(tsv)
        rows = read_rows(tsv)
        wanted = set(int(i) for i in ids)
        stale = [r["id"] for r in rows if r["id"] not in wanted and limit is None]
        if stale:
            raise DataError(f"{tsv}: has sample {stale[0]}, which {data} ({split}) does not; delete the folder to start over")
        done = {r["id"] for r in rows}
        todo = np.array([i for i in ids if int(i) not in done], dtype=np.int64)
        if rows:
            console.print(f"{tsv}: {len(done):,} samples already certified; continuing with {len(todo):,}")
        n_classes = len(ss.classes)
        if len(todo):
            new_file = not tsv.is_file() or tsv.stat().st_size == 0  # (cut_torn_row empties a torn header)
            _certify_into(tsv, new_file, todo, model, ss, split, sigma, n0, n, alpha, n_classes, seed, batch,
                          device, workers, progress, info["image_size"])
        rows = [r for r in read_rows(tsv) if r["id"] in wanted]
        b = attack_budget(ss, info["ckpt"], eps)
        summary = summarize(rows, settings, ss.channels * (info["image_size"] or ss.image_size) ** 2, b.eps)
        write_json(meta, summary)
    summary["tsv"], summary["json"], summary["out"], summary["name"] = str(tsv), str(meta), str(out), stem
    return summary
