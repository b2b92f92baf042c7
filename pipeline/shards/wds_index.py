"""`pipeline index`: the project's byte-offset index over WebDataset shards that already exist, without a byte of
them rewritten.

A WebDataset shard is a tar whose members of one sample share a key (the name up to the first dot of its base
name) and whose extensions name the fields. A sample here is one image (`.jpg .jpeg .png .webp`) and one label
(`.cls` or `.label`: a class number as text; `.json`: a number, or an object with "label" or "cls"); other
fields (captions, ...) are left alone. Samples without an image or a label, with two of either, or with a label
that is no class number are listed and skipped, as `prepare` lists the files it cannot use.

Only tar headers are read (`wds_scan.py`: Python's `tarfile` over range reads of `WINDOW` bytes, one read a
sample in the common layout); a remote set is read by range requests, and the command says how many bytes and
reads it took. Each read is a round trip: where latency dominates, streaming whole shards (`--digests`) can be
quicker (bench_index.py). `--digests` reads every byte once and records each image's digest and each shard's
SHA-256, so reads are checked as a prepared set's are; without it, reads trust the storage (the shards' sizes
and their headers' digest are kept, and `verify` walks the headers again).

The index (index.json and one `.idx` member table per shard) is written to the shards' own folder (in place, a
local folder) or to `--out`, with `shards_at` naming where the shards are.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.atomic import write_json
from pipeline.errors import DataError, PipelineError
from pipeline.progress import progress_bar
from pipeline.shards import layout
from pipeline.shards.images import CorruptImage, open_fully
from pipeline.shards.shardset import ShardSet
from pipeline.shards.storage import open_store
from pipeline.shards.wds_scan import WINDOW, ShardScan, digests_of, scan_shard

MARK = "pipeline index"  # index.json's recipe says it was made here: only such an index is replaced


def list_shards(store, pattern: str | None) -> list[str]:
    """The .tar names under the store (a folder: recursively; a bucket: its listing), or the brace pattern's
    expansion (`shard-{000000..000099}.tar`, WebDataset's notation: what an HTTP server, which lists nothing,
    needs)."""
    if pattern:
        import braceexpand

        return list(braceexpand.braceexpand(pattern))
    if store.local:
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*.tar") if p.is_file())
    fs, base = store.filesystem()
    try:
        found = fs.find(base)
    except Exception as exc:  # noqa: BLE001 - a server that cannot list
        raise PipelineError(f"{store.url}: cannot list its files ({type(exc).__name__}); name the shards with "
                            "a brace pattern, e.g. URL/train-{000000..000099}.tar") from None
    return sorted(p[len(base):].lstrip("/") for p in found if p.endswith(".tar"))


def assign_splits(names: list[str], rules: list[str]) -> dict[str, list[str]]:
    """Shard names by split: `rules` NAME=GLOB (the first that matches), else by the name: *train* -> train,
    *val* or *test* -> test, anything else -> train."""
    parsed = []
    for rule in rules:
        split, eq, glob = rule.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", split.strip()) or not glob.strip():
            raise PipelineError(f"--split {rule!r}: expected NAME=PATTERN, e.g. --split train='*-train-*.tar'")
        parsed.append((split.strip(), glob.strip()))
    out: dict[str, list[str]] = {}
    for name in names:
        base = name.rsplit("/", 1)[-1]
        split = next((s for s, g in parsed if fnmatch.fnmatch(name, g) or fnmatch.fnmatch(base, g)), None)
        if split is None and parsed:
            continue
        if split is None:
            split = "test" if re.search(r"val|test", base, re.I) and "train" not in base.lower() else "train"
        out.setdefault(split, []).append(name)
    if not out:
        raise PipelineError("no shard matches the --split patterns: "
                            + ", ".join(f"{s}={g}" for s, g in parsed))
    return out


@dataclass
class IndexResult:
    out: Path
    index: dict
    bytes_read: int
    requests: int
    skipped: list


def _source(location: str) -> tuple[str, str | None]:
    """(the folder or URL prefix of the shards, a brace pattern of names in it or None)."""
    text = str(location).rstrip("/")
    if "{" in text or text.endswith(".tar"):
        base, _, pattern = text.rpartition("/")
        return base or ".", pattern
    return text, None


def _classes(path: str | None, n_labels: int) -> list[str]:
    if not path:
        return [str(i) for i in range(n_labels)]
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"--classes {path}: unreadable ({exc}); give a text file with one class name a line") from None
    if len(names) < n_labels or len(set(names)) != len(names):
        raise PipelineError(f"--classes {path}: {len(names)} distinct names for labels up to {n_labels - 1}; give "
                            "one distinct name a line, in label order")
    return names


def index_shards(location: str, out: str | Path | None = None, splits: list[str] = (), classes: str | None = None,
                 name: str | None = None, digests: bool = False, workers: int = 8, overwrite: bool = False,
                 window: int = WINDOW, progress: bool = True) -> IndexResult:
    """Index the WebDataset shards at `location` (a folder, a URL prefix, either with a brace pattern of shard
    names); write index.json and the member tables to `out` (default: the folder itself)."""
    base, pattern = _source(location)
    store = open_store(base)
    remote = not store.local
    out = Path(out) if out else (None if remote else Path(base))
    if out is None:
        raise PipelineError(f"{location}: a remote set's index is written here: give --out DIR")
    index_path = out / layout.INDEX_NAME
    ours: set[str] = set()  # the member tables an earlier `pipeline index` wrote here: the only files replaced
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text())
            mine = old.get("recipe", {}).get("made_by") == MARK
            ours = {sh["idx"] for info in old["splits"].values() for sh in info["shards"]} if mine else set()
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            mine = False
        if not mine:
            raise PipelineError(f"{index_path}: exists and was not written by `pipeline index`; refusing to replace "
                                "it (index into another --out)")
        if not overwrite:
            raise PipelineError(f"{index_path}: already indexed; --overwrite indexes the shards again")
    found = list_shards(store, pattern)
    if not found:
        raise PipelineError(f"{location}: no .tar shards found; give the folder or URL prefix that holds them, or a "
                            "brace pattern of their names (URL/train-{000000..000099}.tar)")
    by_split = assign_splits(found, list(splits))
    moved, lock = {"bytes": 0, "requests": 0}, threading.Lock()

    def one(shard: str) -> ShardScan:
        if remote:
            size = store.size(shard)
            if size is None:
                raise DataError(f"{store.where(shard)}: no such shard")
            read = lambda a, b: store.read_range(shard, a, b)  # noqa: E731
            handle = None
        else:
            try:
                handle = open(store.root / shard, "rb")
            except OSError as exc:
                raise DataError(f"{store.root / shard}: unreadable ({exc.strerror})") from None
            size = os.fstat(handle.fileno()).st_size
            read = lambda a, b: os.pread(handle.fileno(), b - a, a)  # noqa: E731

        def fetch(a: int, b: int) -> bytes:
            data = read(a, b)
            with lock:
                moved["bytes"] += len(data)
                moved["requests"] += 1
            return data
        try:
            if digests:  # every byte once, in one read: the headers are walked in memory
                data = fetch(0, size) if size else b""
                scan = scan_shard(shard, size, lambda a, b: data[a:b], window)
                digests_of(scan, data)
            else:
                scan = scan_shard(shard, size, fetch, window)
        finally:
            if handle is not None:
                handle.close()
        return scan

    names = [s for shards in by_split.values() for s in shards]
    scans = {}
    with ThreadPoolExecutor(max(1, workers)) as pool, progress_bar(progress, unit="shards/s") as bar:
        task = bar.add_task(f"index {len(names)} shards" + (" (every byte: --digests)" if digests else
                                                              " (headers)"), total=len(names))
        for shard, scan in zip(names, pool.map(one, names)):
            scans[shard] = scan
            bar.advance(task)
    out.mkdir(parents=True, exist_ok=True)
    planned = {f"{split}-{n:06d}.idx" for split, shards in by_split.items() for n in range(len(shards))}
    foreign = sorted(name for name in planned - ours if (out / name).exists())
    if foreign:
        raise PipelineError(f"{out / foreign[0]}: exists and is not a member table `pipeline index` wrote; refusing "
                            "to replace it (index into another --out)")
    next_id, records, skipped, shapes = 0, {}, [], set()
    for split, shards in by_split.items():
        info = {"count": 0, "shards": []}
        for n, shard in enumerate(shards):
            scan = scans[shard]
            skipped += scan.skipped
            count = len(scan.offsets)
            table = np.zeros(count, layout.MEMBER_DTYPE)
            table["id"] = np.arange(next_id, next_id + count)
            table["label"], table["offset"], table["size"] = scan.labels, scan.offsets, scan.sizes
            table["source"] = np.arange(count)
            table["digest"] = scan.digests if scan.digests is not None else 0
            idx = f"{split}-{n:06d}.idx"
            buf = io.BytesIO()
            np.save(buf, table, allow_pickle=False)
            (out / idx).write_bytes(buf.getvalue())
            shapes.update(scan.shapes)
            info["shards"].append({"shard": n, "tar": shard, "idx": idx, "count": count,
                                   "first_id": next_id if count else None,
                                   "last_id": next_id + count - 1 if count else None, "bytes": scan.bytes,
                                   "sha256": scan.sha256, "headers_sha256": scan.headers_sha256,
                                   **layout.idx_pin(out / idx)})
            info["count"] += count
            next_id += count
        firsts = [s["first_id"] for s in info["shards"] if s["count"]]
        info["id_range"] = [min(firsts), next_id - 1] if firsts else None
        records[split] = info
    labels = [lab for s in scans.values() for lab in s.labels]
    class_names = _classes(classes, max(labels) + 1 if labels else 0)
    known = {s[:2] for s in shapes if s}
    modes = {s[2] for s in shapes if s}
    image = {"mode": "L" if modes == {"L"} else "RGB", "channels": 1 if modes == {"L"} else 3,
             "size": list(known.pop()) if len(known) == 1 and None not in shapes else None,
             "format": "mixed", "resized_to": None}
    shards_at = None if remote is False and out.resolve() == Path(base).resolve() else (
        base if remote else str(Path(base).resolve()))
    index = {
        "format": layout.FORMAT, "format_version": layout.FORMAT_VERSION,
        "name": name or Path(base.rstrip("/")).name or "shards", "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": {"made_by": MARK, "source": base + (f"/{pattern}" if pattern else ""), "digests": digests},
        "classes": class_names, "image": image, "splits": records, "skipped": skipped,
        **({"shards_at": shards_at} if shards_at else {}),
        "member_digests": digests,
    }
    index["fingerprint"] = layout.fingerprint(class_names, image, records)
    layout.validate_index(index_path, index)
    write_json(index_path, index)
    for stale in ours - planned:  # tables of the earlier index that this one does not use
        (out / stale).unlink(missing_ok=True)
    return IndexResult(out, index, moved["bytes"], moved["requests"], skipped)


def is_indexed(index: dict) -> bool:
    """Whether `pipeline index` made this index (over shards it did not write)."""
    return isinstance(index.get("recipe"), dict) and index["recipe"].get("made_by") == MARK


def verify_indexed(location, progress: bool = True) -> list[str]:
    """`pipeline verify` of an indexed set: every shard's headers walked again and compared with its member table
    (offsets, sizes, labels), the shard's size and headers' digest (and, where --digests recorded them, its
    SHA-256 and each image's digest) against index.json, and every image read and decoded."""
    try:
        ss = ShardSet.open(location)
    except (DataError, PipelineError) as exc:
        return [str(exc)]
    store, problems = ss.store, []
    with progress_bar(progress) as bar:
        task = bar.add_task("verify", total=sum(ss.count(s) for s in ss.splits))
        for split in ss.splits:
            try:
                table = ss.members(split)
            except DataError as exc:
                problems.append(str(exc))
                continue
            for n, rec in enumerate(ss.index["splits"][split]["shards"]):
                where = store.where(rec["tar"])
                try:
                    size = store.size(rec["tar"]) if not store.local else (store.root / rec["tar"]).stat().st_size
                    if size != rec["bytes"]:
                        problems.append(f"{where}: {size} bytes, index.json says {rec['bytes']} (replaced or "
                                        "truncated: index it again)")
                        continue
                    read = ((lambda a, b, t=rec["tar"]: store.read_range(t, a, b)) if not store.local else
                            (lambda a, b, p=store.root / rec["tar"]: _pread(p, a, b)))
                    scan = scan_shard(rec["tar"], size, read)
                    if rec.get("sha256"):
                        digests_of(scan, read(0, size))
                except (DataError, OSError) as exc:
                    problems.append(f"{where}: {getattr(exc, 'strerror', None) or exc}")
                    continue
                rows = np.arange(table.shard_starts[n], table.shard_starts[n + 1])
                if scan.headers_sha256 != rec["headers_sha256"] or (rec.get("sha256") and scan.sha256 != rec["sha256"]):
                    problems.append(f"{where}: its content is not what index.json records (the shard was modified: "
                                    "index it again)")
                elif (list(table.offsets[rows]) != scan.offsets or list(table.sizes[rows]) != scan.sizes
                      or list(table.labels[rows]) != scan.labels):
                    problems.append(f"{ss.meta.where(rec['idx'])}: does not match the headers of {where}")
                for row, blob in zip(rows.tolist(), ss.read_rows(split, rows)):
                    if table.digests[row] and layout.member_digest(blob) != int(table.digests[row]):
                        problems.append(f"{where}: the image at byte {int(table.offsets[row])} does not match its digest")
                    try:
                        open_fully(bytes(blob))
                    except CorruptImage as exc:
                        problems.append(f"{where}: the image at byte {int(table.offsets[row])} does not decode ({exc})")
                    bar.advance(task)
    if layout.fingerprint(ss.classes, ss.index["image"], ss.index["splits"]) != ss.fingerprint:
        problems.append(f"{ss.meta.where(layout.INDEX_NAME)}: fingerprint does not match its own shard list")
    return problems


def _pread(path: Path, a: int, b: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), b - a, a)


__all__ = ["IndexResult", "assign_splits", "index_shards", "is_indexed", "list_shards", "verify_indexed"]
