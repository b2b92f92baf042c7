"""`pipeline prepare`: a source -> a shard set (WebDataset tar shards + offset indexes, optionally FFCV).

Work is cut into shards, written in parallel; each finished shard is appended to a journal, so an
interrupted run resumes where it stopped: shards on disk that match their journal record are kept, anything
else is written again. `index.json` is written last; its presence means the shard set is complete.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.atomic import is_temporary, write_json
from pipeline.errors import PipelineError, WriteError
from pipeline.kv import parse_kv
from pipeline.locks import LOCK_NAME, folder_lock
from pipeline.progress import console, progress_bar
from pipeline.runtime import become_worker
from pipeline.shards import ffcv_io, layout
from pipeline.shards.ffcv_write import write_betons
from pipeline.shards.images import DEFAULT_JPEG_QUALITY, CorruptImage, Encoding
from pipeline.shards.sources import Source, open_source
from pipeline.shards.tarshard import ShardSample, shard_looks_intact, write_shard
from pipeline.validate import parse_json

JOURNAL_NAME = ".prepare-journal.jsonl"
SPLIT_ORDER = ("train", "val", "test")
FORMATS = ("wds", "ffcv")


@dataclass
class PrepareOptions:
    out: Path | None = None
    formats: tuple[str, ...] = ("wds",)
    image_size: int | None = None
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # of the JPEGs re-encoded when resizing
    shard_size: int = 5000
    workers: int = 1
    test_fraction: float = 0.2
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    follow_symlinks: bool = False  # folder sources: read links that leave the source folder
    per_class: dict[str, int] = field(default_factory=dict)  # split -> keep N samples of each class (seeded)
    splits: tuple[str, ...] = ()  # keep only these splits (STL-10's train and test for evaluation); () all

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.image_size, self.jpeg_quality)

    def check(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or "wds" not in self.formats:
            raise PipelineError(f"--formats {','.join(self.formats)}: choose from wds,ffcv (wds is always written)")
        if self.image_size is not None and self.image_size < 1:
            raise PipelineError(f"--image-size {self.image_size}: must be a positive number of pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise PipelineError(f"--jpeg-quality {self.jpeg_quality}: must be in 1..100 (90 by default)")
        if self.shard_size < 1:
            raise PipelineError(f"--shard-size {self.shard_size}: must be at least 1 sample per shard")
        if self.workers < 1:
            raise PipelineError(f"--workers {self.workers}: must be at least 1")
        if not 0.0 <= self.test_fraction < 1.0:
            raise PipelineError(f"--test-fraction {self.test_fraction}: must be in [0, 1)")
        if not all(isinstance(s, str) and s.strip() for s in self.splits):
            raise PipelineError(f"--splits {self.splits!r}: split names, comma-separated, e.g. --splits train,test")
        for split, n in self.per_class.items():
            if not isinstance(n, int) or n < 1:
                raise PipelineError(f"--per-class {split}={n}: must be a whole number of samples >= 1")


def parse_per_class(text: str | dict | None) -> dict[str, int]:
    """'train=1000,test=200' (or {train = 1000}) -> {'train': 1000, 'test': 200}."""
    try:
        out = parse_kv(text, "--per-class")
    except PipelineError:
        out = None
    bad = None if out is None else next((k for k, n in out.items() if isinstance(n, bool) or not isinstance(n, int)
                                         or n < 0), None)
    if out is None or bad is not None:
        shown = text if out is None else f"{bad}={out[bad]!r}"
        raise PipelineError(f"--per-class {shown!r}: expected SPLIT=N with N a whole number, e.g. train=1000")
    return out


@dataclass
class ShardTask:
    split: str
    shard_no: int
    ids: np.ndarray
    labels: np.ndarray
    src_split: list[str]
    src_index: np.ndarray
    out: Path = field(repr=False, default=None)


def plan_splits(source: Source, test_fraction: float, seed: int, per_class: dict[str, int] | None = None,
                only: tuple[str, ...] = ()) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """split -> (source split of each item, source index, label), shuffled with `seed`.

    Shuffling before sharding makes neighbouring samples unrelated, which is what lets the streaming loader
    read long contiguous runs and still build well-mixed batches. A data set without its own test split gets
    a per-class held-out test split of `test_fraction`. `per_class` keeps, in the splits it names, a seeded
    random `n` samples of each class (a fixed, class-balanced subset: the same for the same seed). `only` keeps
    those splits alone.
    """
    rng = np.random.default_rng(seed)
    refs: dict[str, list[tuple[str, np.ndarray]]] = {}
    if source.native_splits:
        for s in source.splits():
            refs[s] = [(s, np.arange(len(source.labels(s))))]
    else:
        (pool,) = source.splits()
        labels = source.labels(pool)
        train, test = [], []
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            n_test = int(round(len(members) * test_fraction))
            test.append(members[:n_test])
            train.append(members[n_test:])
        refs["train"] = [(pool, np.sort(np.concatenate(train)))]
        if test_fraction > 0:
            refs["test"] = [(pool, np.sort(np.concatenate(test)))]
    missing = sorted(set(only) - set(refs))
    if missing:
        raise PipelineError(f"--splits {','.join(only)}: the data has no {missing[0]!r} split (it has "
                            f"{', '.join(refs)})")
    refs = {s: r for s, r in refs.items() if not only or s in only}
    unknown = sorted(set(per_class or {}) - set(refs))
    if unknown:
        raise PipelineError(f"--per-class {unknown[0]}=...: the data has no {unknown[0]!r} split "
                            f"(it has {', '.join(refs)})")
    unlabeled = sorted(set(per_class or {}) & set(source.unlabeled_splits))
    if unlabeled:
        raise PipelineError(f"--per-class {unlabeled[0]}=...: split {unlabeled[0]!r} has no labels, so no classes to "
                            "balance; leave it out of --per-class")
    picker = np.random.default_rng([seed, 1])  # its own stream: the sample order of full splits is unchanged
    for split, n in sorted((per_class or {}).items()):
        (name, idx), = refs[split]  # every split is one part of one source split
        labels = source.labels(name)[idx]
        keep = [picker.permutation(idx[labels == c])[:n] for c in np.unique(labels)]
        refs[split] = [(name, np.sort(np.concatenate(keep)))]
    plan = {}
    for split in sorted(refs, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s)):
        src_split = [name for name, idx in refs[split] for _ in range(len(idx))]
        src_index = np.concatenate([idx for _, idx in refs[split]])
        if len(src_index) == 0:
            continue
        perm = rng.permutation(len(src_index))
        src_split = [src_split[i] for i in perm]
        src_index = src_index[perm]
        labels = np.array([source.labels(s)[i] for s, i in zip(src_split, src_index)], dtype=np.int64)
        plan[split] = (src_split, src_index, labels)
    return plan


# --- worker side -------------------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(spec: str, encoding: Encoding, progress_queue, follow_symlinks: bool = False) -> None:
    become_worker()  # Ctrl-C reaches the whole group: the parent stops the work
    _worker.update(source=open_source(spec, follow_symlinks), encoding=encoding, queue=progress_queue)


def _run_task(task: ShardTask) -> dict:
    source, encoding, q = _worker["source"], _worker["encoding"], _worker.get("queue")
    skipped, shapes, exts = [], set(), set()

    def samples():
        pending = 0
        src = np.asarray(task.src_split)
        for split in dict.fromkeys(task.src_split):  # a source read by blocks reads each once for the shard
            source.prefetch(split, np.asarray(task.src_index)[src == split])
        for k in range(len(task.ids)):
            split, index = task.src_split[k], int(task.src_index[k])
            try:
                enc = source.load(split, index, encoding)
            except CorruptImage as exc:
                skipped.append({"split": task.split, "shard": task.shard_no, "source": source.describe(split, index),
                                "reason": str(exc)})
            else:
                shapes.add(enc.shape)
                exts.add(enc.ext)
                yield ShardSample(int(task.ids[k]), int(task.labels[k]), index, enc.data, enc.ext)
            pending += 1
            if q is not None and pending == 64:
                q.put(pending)
                pending = 0
        if q is not None and pending:
            q.put(pending)

    stem = layout.shard_stem(task.split, task.shard_no)
    record = write_shard(task.out / f"{stem}.tar", task.out / f"{stem}.idx", samples())
    # Two shapes are enough to know the set is not fixed-size; keep the record small.
    record.update(split=task.split, shard=task.shard_no, skipped=skipped, shapes=sorted(shapes)[:2], exts=sorted(exts))
    return record


# --- parent side -------------------------------------------------------------------------------------------
def _recipe(spec: str, opts: PrepareOptions, source: Source) -> dict:
    return {
        "source": spec,
        "image_size": opts.image_size,
        "shard_size": opts.shard_size,
        "test_fraction": None if source.native_splits else opts.test_fraction,
        "seed": opts.seed,
        "format_version": layout.FORMAT_VERSION,
    } | ({"per_class": dict(sorted(opts.per_class.items()))} if opts.per_class else {}) | (
        {"splits": sorted(opts.splits)} if opts.splits else {}) | (
        {"jpeg_quality": opts.jpeg_quality} if opts.jpeg_quality != DEFAULT_JPEG_QUALITY else {})


def _previous_records(out: Path, recipe: dict, overwrite: bool) -> tuple[dict[tuple[str, int], dict], set[str]]:
    """(shard records of an earlier run into `out` with the same recipe, names of every file our records say
    we wrote there). With --overwrite and another recipe, those files (and only those) are deleted first."""
    index_path, journal = out / layout.INDEX_NAME, out / JOURNAL_NAME
    found: dict[tuple[str, int], dict] = {}
    ours: set[str] = set()
    old_recipe = None
    if index_path.is_file():
        try:
            index = parse_json(index_path.read_text())
            if not isinstance(index, dict) or index.get("format") != layout.FORMAT:
                raise ValueError
            old_recipe = index.get("recipe")
            for split, info in index.get("splits", {}).items():
                for rec in info.get("shards", []):
                    found[(split, rec["shard"])] = dict(rec, split=split, skipped=[])
                if info.get("beton"):
                    ours.add(Path(info["beton"]["file"]).name)
            for entry in index.get("skipped", []):
                if (entry.get("split"), entry.get("shard")) in found:
                    found[(entry["split"], entry["shard"])]["skipped"].append(entry)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise PipelineError(f"{index_path}: not a shard-set index written by this tool; refusing to replace "
                                "it (move it away, or choose another --out)") from None
        ours.add(index_path.name)
    if journal.is_file():
        ours.add(journal.name)
        for line in journal.read_text().splitlines():
            try:
                entry = parse_json(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if "recipe" in entry:
                old_recipe = entry["recipe"]
            elif "shard" in entry:
                found[(entry["split"], entry["shard"])] = entry
    for rec in found.values():
        ours.update(Path(rec[k]).name for k in ("tar", "idx") if rec.get(k))
    if old_recipe is None or (old_recipe == recipe and not overwrite):
        return found, ours  # a new folder, or a run to resume
    if not overwrite:
        diff = ", ".join(
            f"{k} {old_recipe.get(k)!r} -> {recipe[k]!r}" for k in recipe
            if isinstance(old_recipe, dict) and old_recipe.get(k) != recipe[k]
        ) or "unreadable recipe"
        raise PipelineError(
            f"{out}: holds a shard set prepared with other settings ({diff}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    _refuse_foreign(out, ours, what="replace the shard set")
    for name in ours:  # only what our own records say we wrote
        (out / name).unlink(missing_ok=True)
    return {}, set()


_OLD_TEMP = re.compile(r"^\..+\.tmp-\d+$")  # an atomic write cut short by an older version


def _refuse_foreign(out: Path, ours: set[str], what: str) -> None:
    """Refuse to work in a folder that holds anything our records do not account for."""
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in ours and p.name != LOCK_NAME and not is_temporary(p.name)
                     and not _OLD_TEMP.match(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PipelineError(f"{out}: holds files this tool did not write ({shown}); refusing to {what} there "
                            "(choose an empty or new --out)")


def _tasks(plan: dict, shard_size: int, out: Path) -> list[ShardTask]:
    tasks, next_id = [], 0
    for split, (src_split, src_index, labels) in plan.items():
        ids = np.arange(next_id, next_id + len(src_index), dtype=np.int64)
        next_id += len(src_index)
        for shard_no, start in enumerate(range(0, len(ids), shard_size)):
            sl = slice(start, start + shard_size)
            tasks.append(ShardTask(split, shard_no, ids[sl], labels[sl], src_split[sl], src_index[sl], out))
    return tasks


def _execute(tasks: list[ShardTask], spec: str, opts: PrepareOptions, journal, total: int, done_count: int):
    """Run shard tasks (in a process pool when workers > 1); journal each record as it arrives."""

    def finish(record):
        try:
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        except OSError as exc:
            raise WriteError(journal.name, exc.strerror or str(exc), appending=True) from None

    with progress_bar(opts.progress) as bar:
        bar_task = bar.add_task("prepare", total=total, completed=done_count)
        if opts.workers == 1 or len(tasks) <= 1:
            q = queue_mod.SimpleQueue()
            _worker.update(source=open_source(spec, opts.follow_symlinks), encoding=opts.encoding, queue=q)
            for t in tasks:
                finish(_run_task(t))
                while not q.empty():
                    bar.advance(bar_task, q.get())
            return
        ctx = get_context("fork")
        q = ctx.Queue()  # inherited by the forked workers (a Manager would add a process that outlives a kill)
        pool = ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(spec, opts.encoding, q, opts.follow_symlinks))
        try:
            pending = {pool.submit(_run_task, t) for t in tasks}
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in finished:
                    finish(fut.result())
                while not q.empty():
                    bar.advance(bar_task, q.get())
        except BaseException:  # interrupted or failed: stop now, the journal keeps the finished shards
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            # Let the pool's manager thread finish closing its wake-up pipe before the interpreter exits: at
            # exit concurrent.futures writes to that pipe without a lock, and a close racing it printed an
            # OSError traceback under the "interrupted" message (seen once in the suite). Bounded: never hang.
            manager = getattr(pool, "_executor_manager_thread", None)
            if manager is not None:
                manager.join(timeout=10)
            raise
        pool.shutdown()


def _image_info(source: Source, records: list[dict], image_size: int | None) -> dict:
    shapes = {tuple(s) for r in records for s in r["shapes"]}
    exts = {e for r in records for e in r["exts"]}
    size = list(next(iter(shapes))) if len(shapes) == 1 else None
    return {
        "mode": source.mode,
        "channels": 1 if source.mode == "L" else 3,
        "size": size,  # [height, width], or null when images vary in size
        "format": exts.pop() if len(exts) == 1 else "mixed",
        "resized_to": image_size,
    }


def build_index(source: Source, spec: str, recipe: dict, records: list[dict], image_size: int | None) -> dict:
    splits: dict[str, dict] = {}
    skipped = list(source.skipped())
    for rec in sorted(records, key=lambda r: (r["split"], r["shard"])):
        info = splits.setdefault(rec["split"], {"count": 0, "shards": []})
        info["count"] += rec["count"]
        info["shards"].append({k: rec[k] for k in ("shard", "tar", "idx", "count", "first_id", "last_id", "bytes",
                                                    "sha256", "idx_bytes", "idx_sha256", "shapes", "exts")})
        skipped.extend(rec["skipped"])
    order = [s for s in SPLIT_ORDER if s in splits] + sorted(s for s in splits if s not in SPLIT_ORDER)
    splits = {s: splits[s] for s in order}
    for s, info in splits.items():
        if s in source.unlabeled_splits:
            info["labelled"] = False  # labels are -1: methods and selectors that need labels refuse the split
        firsts = [sh["first_id"] for sh in info["shards"] if sh["count"]]
        lasts = [sh["last_id"] for sh in info["shards"] if sh["count"]]
        info["id_range"] = [min(firsts), max(lasts)] if firsts else None
    image = _image_info(source, records, image_size)
    return {
        "format": layout.FORMAT,
        "format_version": layout.FORMAT_VERSION,
        "name": source.name,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": recipe,
        "classes": list(source.classes),
        "image": image,
        "splits": splits,
        "skipped": skipped,
        "fingerprint": layout.fingerprint(list(source.classes), image, splits),
    }


def _check_classes(out: Path, source: Source, split: str, info: dict, planned_labels: np.ndarray) -> None:
    """A class with source files of which none decoded is an error, like an empty class folder."""
    decoded = np.zeros(len(source.classes), dtype=np.int64)
    for rec in info["shards"]:
        table = layout.read_member_table(out / rec["idx"])
        decoded += np.bincount(table["label"], minlength=len(source.classes))[: len(source.classes)]
    planned = np.bincount(planned_labels, minlength=len(source.classes))
    lost = [source.classes[c] for c in np.flatnonzero((planned > 0) & (decoded == 0))]
    if lost:
        raise PipelineError(f"{source.name}: every image of class {lost[0]!r} in split {split!r} failed to decode "
                            f"(skipped files are listed in {out / JOURNAL_NAME}); fix or remove that class")


@dataclass
class PrepareResult:
    out: Path
    index: dict
    written: int  # images encoded in this run (0 when everything was already done)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def prepare(spec: str, opts: PrepareOptions) -> PrepareResult:
    """Build (or finish) the shard set for `spec`."""
    opts.check()
    if "ffcv" in opts.formats:
        if not ffcv_io.available():
            raise PipelineError(ffcv_io.INSTALL_HINT)
    source = open_source(spec, opts.follow_symlinks)
    out = Path(opts.out) if opts.out else Path("shards") / source.name
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out}: exists and is not a folder")
    with folder_lock(out, f"pipeline prepare {spec}"):
        return _prepare_locked(spec, opts, source, out)


def _prepare_locked(spec: str, opts: PrepareOptions, source: Source, out: Path) -> PrepareResult:
    recipe = _recipe(spec, opts, source)
    previous, ours = _previous_records(out, recipe, opts.overwrite)

    plan = plan_splits(source, opts.test_fraction, opts.seed, opts.per_class, tuple(opts.splits))
    tasks = _tasks(plan, opts.shard_size, out)
    if ours:  # resuming our own run: the shards it was writing carry the planned names
        ours |= {f"{layout.shard_stem(t.split, t.shard_no)}.{ext}" for t in tasks for ext in ("tar", "idx")}
        ours |= {f"{s}.beton" for s in plan}
    _refuse_foreign(out, ours, what="write a shard set")
    kept, todo = [], []
    for t in tasks:
        stem = layout.shard_stem(t.split, t.shard_no)
        rec = previous.get((t.split, t.shard_no))
        if rec is not None and "skipped" in rec and shard_looks_intact(out / f"{stem}.tar", out / f"{stem}.idx", rec):
            kept.append(rec)
        else:
            todo.append(t)
    total = sum(len(t.ids) for t in tasks)
    if kept:
        console.print(f"resuming {out}: {len(kept)} of {len(tasks)} shards already done")

    index_path = out / layout.INDEX_NAME
    started = time.perf_counter()
    if todo or not index_path.is_file():
        if index_path.exists():
            index_path.unlink()  # the set is incomplete until the new index is written
        with open(out / JOURNAL_NAME, "w") as journal:
            journal.write(json.dumps({"recipe": recipe}) + "\n")
            for rec in kept:
                journal.write(json.dumps(rec) + "\n")
            _execute(todo, spec, opts, journal, total, total - sum(len(t.ids) for t in todo))
        records = [parse_json(ln) for ln in (out / JOURNAL_NAME).read_text().splitlines()[1:]]
        for rec in records:  # a shard journaled by a version before the .idx pin
            if "idx_sha256" not in rec:
                rec.update(layout.idx_pin(out / rec["idx"]))
        index = build_index(source, spec, recipe, records, opts.image_size)
        for split, info in index["splits"].items():
            if info["count"] == 0:
                raise PipelineError(f"{spec}: every image of split {split!r} failed to decode; see {out / JOURNAL_NAME}")
            if split not in source.unlabeled_splits:
                _check_classes(out, source, split, info, plan[split][2])
        write_json(index_path, index)
        (out / JOURNAL_NAME).unlink()
    else:
        index = parse_json(index_path.read_text())
    result = PrepareResult(out, index, sum(len(t.ids) for t in todo), time.perf_counter() - started)
    if "ffcv" in opts.formats:
        result.index = write_betons(out, workers=opts.workers, progress=opts.progress)
    return result
