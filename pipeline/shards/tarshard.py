"""Writing one WebDataset shard while recording where each image's bytes land (the `.idx` member table)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from pipeline.atomic import atomic_path, write_npy
from pipeline.shards.layout import MEMBER_DTYPE, member_key


class ShardSample(NamedTuple):
    id: int
    label: int
    source: int
    data: bytes
    ext: str


class _HashingWriter:
    """File wrapper that hashes what tarfile writes, so the digest costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the same samples always give byte-identical shards (and the same fingerprint).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_shard(tar_path: Path, idx_path: Path, samples: Iterable[ShardSample]) -> dict:
    """Write `samples` to `tar_path` and their member table to `idx_path`; return the shard's record."""
    rows = []
    with atomic_path(tar_path) as tmp, open(tmp, "wb") as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                key = member_key(s.id)
                tar.addfile(_tarinfo(f"{key}.{s.ext}", len(s.data)), io.BytesIO(s.data))
                data_offset = tar.offset - _padded(len(s.data))
                label = str(int(s.label)).encode()
                tar.addfile(_tarinfo(f"{key}.cls", len(label)), io.BytesIO(label))
                rows.append((s.id, s.label, data_offset, len(s.data), s.source))
        raw.flush()
        nbytes, digest = raw.tell(), out.sha.hexdigest()
    table = np.array(rows, dtype=MEMBER_DTYPE)
    write_npy(idx_path, table)
    return {
        "tar": tar_path.name,
        "idx": idx_path.name,
        "count": len(table),
        "first_id": int(table["id"][0]) if len(table) else None,
        "last_id": int(table["id"][-1]) if len(table) else None,
        "bytes": nbytes,
        "sha256": digest,
    }


def shard_looks_intact(tar_path: Path, idx_path: Path, record: dict) -> bool:
    """Cheap resume check (sizes and table, no full hash): `pipeline verify` does the thorough one."""
    try:
        if tar_path.stat().st_size != record["bytes"]:
            return False
        table = np.load(idx_path, allow_pickle=False)
    except (OSError, ValueError):
        return False
    if table.dtype != MEMBER_DTYPE or len(table) != record["count"]:
        return False
    return len(table) == 0 or int(table["offset"][-1] + table["size"][-1]) <= record["bytes"]
