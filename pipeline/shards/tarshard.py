"""Writing one WebDataset shard while recording where each image's bytes land (the `.idx` member table)."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from pipeline.atomic import atomic_path, write_npy
from pipeline.shards.layout import MEMBER_DTYPE, idx_pin, member_digest, member_key


class ShardSample(NamedTuple):
    id: int
    label: int
    source: int
    data: bytes
    ext: str


def _template() -> tuple[bytearray, int]:
    # A USTAR header as tarfile writes it for a regular file with mode 0444, uid/gid 0, mtime 0 and no owner
    # names. Fixed metadata: the same samples always give byte-identical shards (and the same fingerprint).
    h = bytearray(tarfile.BLOCKSIZE)
    h[100:108] = b"0000444\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8  # checksum field counts as spaces
    h[156:157] = tarfile.REGTYPE
    h[257:265] = tarfile.POSIX_MAGIC  # b"ustar\0" + version "00"
    return h, sum(h)


_HEADER, _HEADER_SUM = _template()


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile would write (tarfile costs ~50 us a header; this ~2 us)."""
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"member {name} ({size} bytes) does not fit a USTAR header")
    field = b"%011o\0" % size
    h = bytearray(_HEADER)
    h[0:len(raw)] = raw
    h[124:136] = field
    chksum = _HEADER_SUM + sum(raw) + sum(field) - sum(_HEADER[124:136])
    h[148:155] = b"%06o\0" % chksum
    return bytes(h)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def write_shard(tar_path: Path, idx_path: Path, samples: Iterable[ShardSample]) -> dict:
    """Write `samples` to `tar_path` and their member table to `idx_path`; return the shard's record.

    The bytes are those tarfile writes for the same members (a test holds us to it); each image member's data
    offset and size are recorded as they are written.
    """
    rows = []
    sha = hashlib.sha256()
    with atomic_path(tar_path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        pos = 0

        def put(b: bytes) -> None:
            nonlocal pos
            f.write(b)
            sha.update(b)
            pos += len(b)

        for s in samples:
            key = member_key(s.id)
            put(ustar_header(f"{key}.{s.ext}", len(s.data)))
            rows.append((s.id, s.label, pos, len(s.data), s.source, member_digest(s.data)))
            put(s.data)
            put(_padding(len(s.data)))
            label = str(int(s.label)).encode()
            put(ustar_header(f"{key}.cls", len(label)))
            put(label + _padding(len(label)))
        put(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        put(b"\0" * (-pos % tarfile.RECORDSIZE))  # tarfile pads the archive to whole records
        f.flush()
    table = np.array(rows, dtype=MEMBER_DTYPE)
    write_npy(idx_path, table)
    return {
        "tar": tar_path.name,
        "idx": idx_path.name,
        **idx_pin(idx_path),
        "count": len(table),
        "first_id": int(table["id"][0]) if len(table) else None,
        "last_id": int(table["id"][-1]) if len(table) else None,
        "bytes": pos,
        "sha256": sha.hexdigest(),
    }


def shard_looks_intact(tar_path: Path, idx_path: Path, record: dict) -> bool:
    """Resume check: size, member table and the recorded SHA-256 of the tar (a same-size corruption is redone)."""
    try:
        if tar_path.stat().st_size != record["bytes"]:
            return False
        table = np.load(idx_path, allow_pickle=False)
        if table.dtype != MEMBER_DTYPE or len(table) != record["count"]:
            return False
        if len(table) and int(table["offset"][-1] + table["size"][-1]) > record["bytes"]:
            return False
        sha = hashlib.sha256()
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
        if "idx_sha256" in record and idx_pin(idx_path) != {k: record[k] for k in ("idx_bytes", "idx_sha256")}:
            return False
    except (OSError, ValueError):
        return False
    return record.get("sha256") in (None, sha.hexdigest())
