"""The shard-set layout on disk: file names, the per-shard member table (`.idx`), `index.json`, fingerprint.

A shard set is a folder:
    index.json              what `prepare` made (see `build_index`), checked when opened; it pins every file it
                            names by size and SHA-256 (the .idx since this version: `idx_bytes`, `idx_sha256`)
    <split>-000000.tar      WebDataset shard: members <id>.jpg|.png and <id>.cls per sample
    <split>-000000.idx      numpy array of MEMBER_DTYPE: one row per sample, in the shard's order
    <split>.beton           FFCV file (fields image, label, id), rows in id order, when asked for
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.validate import Fields, parse_json

INDEX_NAME = "index.json"
FORMAT = "pipeline.shardset"
FORMAT_VERSION = 2  # 2: the member table records each image's digest (remote reads check it)
READABLE_VERSIONS = (1, 2)
KEY_DIGITS = 9
# offset/size locate the image member's data inside the tar; source is the item's index in its source reader;
# digest is `member_digest` of the image's bytes.
MEMBER_DTYPE = np.dtype([("id", "<i8"), ("label", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("source", "<i8"),
                         ("digest", "<u8")])
MEMBER_DTYPE_V1 = np.dtype([("id", "<i8"), ("label", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("source", "<i8")])


def member_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


def shard_stem(split: str, shard_no: int) -> str:
    return f"{split}-{shard_no:06d}"


def member_digest(data) -> int:
    """64-bit BLAKE2b of a member's bytes: what a remote read and the cache check each image against."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def read_member_table(path, data: bytes | None = None) -> np.ndarray:
    """A shard's member table from `path`, or from `data` already read from it (a remote .idx). Tables of
    format 1 (no digests) come back with digest 0."""
    try:
        table = np.load(io.BytesIO(data) if data is not None else path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `pipeline prepare` again to rebuild the shard") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable offset index ({exc}); run `pipeline prepare` again") from exc
    if table.dtype not in (MEMBER_DTYPE, MEMBER_DTYPE_V1) or table.ndim != 1:
        raise DataError(f"{path}: not an offset index of this tool (dtype {table.dtype})")
    if table.dtype == MEMBER_DTYPE_V1:
        full = np.zeros(len(table), MEMBER_DTYPE)
        for name in MEMBER_DTYPE_V1.names:
            full[name] = table[name]
        table = full
    return table


def idx_pin(path: Path) -> dict:
    """What index.json records of a member table: its size and SHA-256."""
    return {"idx_bytes": Path(path).stat().st_size, "idx_sha256": file_sha256(path)}


def check_idx_pin(where, data: bytes, rec: dict, fix: str) -> None:
    """A member table's bytes against the size and SHA-256 its index record pins (sets prepared before the pin
    have none: nothing to check). A consistent .tar + .idx pair from another preparation fails here."""
    if "idx_sha256" not in rec:
        return
    if len(data) != rec["idx_bytes"] or hashlib.sha256(data).hexdigest() != rec["idx_sha256"]:
        raise DataError(f"{where}: not the member table index.json records ({len(data):,} bytes; index.json pins "
                        f"{rec['idx_bytes']:,} bytes and their SHA-256); {fix}")


def file_sha256(path: Path) -> str:
    """The full SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(classes: list[str], image: dict, splits: dict) -> str:
    """Content fingerprint: classes, image format and the digest of every shard, nothing time-dependent."""
    content = {
        "classes": classes,
        "image": image,
        # an indexed set read by headers only (`pipeline index` without --digests): its headers' digest
        "splits": {s: [sh.get("sha256") or sh["headers_sha256"] for sh in info["shards"]] for s, info in splits.items()},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def load_index(root: Path) -> dict:
    path = root / INDEX_NAME
    if not root.is_dir():
        raise DataError(f"{root}: no such shard-set folder; create one with `pipeline prepare SOURCE --out {root}`")
    if not path.is_file():
        raise DataError(f"{path}: missing; {root} is not a finished shard set (run `pipeline prepare` on it again)")
    return parse_index(path, path.read_bytes())


def parse_index(path, data: bytes) -> dict:
    """index.json's content, checked field by field (`path` names it in messages: a file or a URL)."""
    try:
        index = parse_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc}); run `pipeline prepare` again to rewrite it") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a shard-set index of this tool (format {index.get('format') if isinstance(index, dict) else '?'})")
    if index.get("format_version") not in READABLE_VERSIONS:
        raise DataError(
            f"{path}: format version {index.get('format_version')}, this tool reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; prepare the shard set again with this version"
        )
    for key in ("name", "classes", "image", "splits", "fingerprint"):
        if key not in index:
            raise DataError(f"{path}: malformed index, no {key!r}; run `pipeline prepare` again")
    validate_index(path, index)
    return index


_SPLIT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHARD_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,+=@-]*(/[A-Za-z0-9_][A-Za-z0-9_.,+=@-]*)*\.tar$")


def validate_index(path: Path, index: dict) -> None:
    """Every field a reader uses, by type and range: one DataError line naming the field."""
    f = Fields(path, index, "prepare the shard set again (`pipeline prepare ... --overwrite`)")
    f.text("name")
    f.text("fingerprint", re.compile(r"^[0-9a-f]{32}$"))
    classes = f.list("classes")
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        f.fail("classes", classes, "must be a non-empty list of distinct names")
    image = f.inner("image")
    mode = image.text("mode", re.compile(r"^(L|RGB)$"))
    image.int("channels", 1 if mode == "L" else 3, 1 if mode == "L" else 3)
    size = image.get("size", optional=True)
    if size is not None and (not isinstance(size, list) or len(size) != 2
                             or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in size)):
        image.fail("size", size, "must be [height, width] in pixels, or null")
    splits = f.table("splits")
    if not splits:
        f.fail("splits", splits, "must name at least one split")
    indexed = (index.get("recipe") or {}).get("made_by") == "pipeline index" if isinstance(index.get("recipe"), dict) else False
    f.text("shards_at", optional=True)
    digests = index.get("member_digests", True)
    if not isinstance(digests, bool):
        f.fail("member_digests", digests, "must be true or false")
    seen_ids: list[tuple[int, int, str]] = []
    for split, info in splits.items():
        if not _SPLIT.fullmatch(split):
            f.fail(f"splits.{split}", split, "must be a split name of letters, digits, '-' or '_'")
        s = f.inner(f"splits.{split}", info)
        count = s.int("count")
        if "labelled" in info and info["labelled"] is not False:
            s.fail("labelled", info["labelled"], "must be false where present (a split without labels)")
        shards = s.list("shards")
        total, last = 0, -1
        for n, rec in enumerate(shards):
            r = s.inner(f"shards.{n}", rec)
            tar, idx = (r.text("tar", _SHARD_PATH) if indexed else r.name("tar")), r.name("idx")
            if not (idx.startswith(f"{split}-") and idx.endswith(".idx")
                    and (indexed or (tar.startswith(f"{split}-") and tar.endswith(".tar")))):
                r.fail("tar", tar, f"must be {split}-NNNNNN.tar beside {split}-NNNNNN.idx")
            if indexed and ".." in tar.split("/"):
                r.fail("tar", tar, "must be a path inside the shards' folder")
            n_rec = r.int("count")
            first, last_id = r.int("first_id", optional=not n_rec), r.int("last_id", optional=not n_rec)
            if n_rec and (last_id < first or first <= last or last_id - first + 1 < n_rec):
                r.fail("first_id", first, f"must start after id {last} and span at least its {n_rec} samples")
            r.int("bytes")
            if digests or rec.get("sha256") is not None:
                r.text("sha256", _HEX64)
            else:  # headers only: the shard is known by its size and its headers' digest
                r.text("headers_sha256", _HEX64)
            if r.int("idx_bytes", optional=True) is not None or "idx_sha256" in rec:
                r.int("idx_bytes")
                r.text("idx_sha256", _HEX64)
            total += n_rec
            last = last_id if n_rec else last
        if total != count:
            s.fail("count", count, f"must be the sum of its shards' counts ({total})")
        id_range = s.get("id_range", optional=True)
        if id_range is not None and count:
            firsts = [sh["first_id"] for sh in shards if sh["count"]]
            if (not isinstance(id_range, list) or len(id_range) != 2 or id_range[0] != min(firsts)
                    or id_range[1] != last):
                s.fail("id_range", id_range, f"must be [{min(firsts)}, {last}], its shards' first and last ids")
            seen_ids.append((id_range[0], id_range[1], split))
        beton = s.table("beton", optional=True)
        if beton is not None:
            b = s.inner("beton", beton)
            b.name("file")
            b.int("count")
            b.int("bytes")
            b.text("sha256", _HEX64, optional=True)
    seen_ids.sort()
    for (lo, hi, a), (lo2, hi2, b) in zip(seen_ids, seen_ids[1:]):
        if lo2 <= hi:
            f.fail(f"splits.{b}.id_range", [lo2, hi2], f"overlaps split {a}'s ids [{lo}, {hi}]")


def validate_member_table(path: Path, table: np.ndarray, rec: dict, n_classes: int, labelled: bool = True) -> None:
    """A shard's .idx against its index record: the row count, ids in the shard's range and increasing, labels
    of known classes (-1, none, in a split without labels), every member inside the tar's recorded size."""
    fix = "the shard set is damaged: run `pipeline verify`, then prepare it again"
    if len(table) != rec["count"]:
        raise DataError(f"{path}: {len(table)} rows, index.json says {rec['count']}; {fix}")
    if not len(table):
        return
    ids, labels = table["id"], table["label"]
    if ids[0] < rec["first_id"] or ids[-1] > rec["last_id"] or (len(ids) > 1 and np.any(np.diff(ids) <= 0)):
        raise DataError(f"{path}: ids must increase within [{rec['first_id']}, {rec['last_id']}] as index.json "
                        f"says (found {int(ids.min())}..{int(ids.max())}); {fix}")
    if not labelled:
        if labels.min() != -1 or labels.max() != -1:
            raise DataError(f"{path}: a split without labels must label every sample -1 (found "
                            f"{int(labels.min())}..{int(labels.max())}); {fix}")
    elif labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"{path}: labels must be class numbers in [0, {n_classes}) (found {int(labels.min())}.."
                        f"{int(labels.max())}); {fix}")
    offsets, sizes = table["offset"].astype(np.int64), table["size"].astype(np.int64)
    if offsets.min() < 0 or sizes.min() < 0 or int((offsets + sizes).max()) > rec["bytes"]:
        raise DataError(f"{path}: member offsets and sizes must lie inside the {rec['bytes']:,}-byte tar; {fix}")
