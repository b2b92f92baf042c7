"""The shard-set layout on disk: file names, the per-shard member table (`.idx`), `index.json`, fingerprint.

A shard set is a folder:
    index.json              what `prepare` made (see `build_index`), checked when opened
    <split>-000000.tar      WebDataset shard: members <id>.jpg|.png and <id>.cls per sample
    <split>-000000.idx      numpy array of MEMBER_DTYPE: one row per sample, in the shard's order
    <split>.beton           FFCV file (fields image, label, id), rows in id order, when asked for
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

INDEX_NAME = "index.json"
FORMAT = "pipeline.shardset"
FORMAT_VERSION = 1
KEY_DIGITS = 9
# offset/size locate the image member's data inside the tar; source is the item's index in its source reader.
MEMBER_DTYPE = np.dtype([("id", "<i8"), ("label", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("source", "<i8")])


def member_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


def shard_stem(split: str, shard_no: int) -> str:
    return f"{split}-{shard_no:06d}"


def read_member_table(path: Path) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `pipeline prepare` again to rebuild the shard") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable offset index ({exc}); run `pipeline prepare` again") from exc
    if table.dtype != MEMBER_DTYPE or table.ndim != 1:
        raise DataError(f"{path}: not an offset index of this tool (dtype {table.dtype})")
    return table


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
        "splits": {s: [sh["sha256"] for sh in info["shards"]] for s, info in splits.items()},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def load_index(root: Path) -> dict:
    path = root / INDEX_NAME
    if not root.is_dir():
        raise DataError(f"{root}: no such shard-set folder; create one with `pipeline prepare SOURCE --out {root}`")
    if not path.is_file():
        raise DataError(f"{path}: missing; {root} is not a finished shard set (run `pipeline prepare` on it again)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc}); run `pipeline prepare` again to rewrite it") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a shard-set index of this tool (format {index.get('format') if isinstance(index, dict) else '?'})")
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {index.get('format_version')}, this tool reads {FORMAT_VERSION}; "
            "prepare the shard set again with this version"
        )
    for key in ("name", "classes", "image", "splits", "fingerprint"):
        if key not in index:
            raise DataError(f"{path}: malformed index, no {key!r}; run `pipeline prepare` again")
    return index
