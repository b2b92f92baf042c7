"""Where a shard set's bytes live: a local folder (`LocalStore`, here), or a URL (s3://, gs://, http(s)://) read
through fsspec (`RemoteStore`, in `remote.py`). `open_store` gives the one a location needs.

A store reads whole small files (index.json, the .idx member tables) and the members of one shard by byte
range. Members that lie close together are read in one range (`ReadOptions.max_gap`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.reading import (REMOTE_SCHEMES, DataSource, ReadOptions, ShardFile, coalesce, is_url, read_gap,
                                     slice_members)
from pipeline.shards.remote import RemoteStore

__all__ = ["DataSource", "LocalStore", "ReadOptions", "RemoteStore", "ShardFile", "coalesce", "is_url", "open_store"]

class LocalStore:
    """A shard-set folder on this machine. Picklable: descriptors are opened lazily in each process."""

    local = True
    GAP = 16 * 1024  # a read across 16 KiB of page cache is cheaper than another system call

    def __init__(self, root: Path, options: ReadOptions = ReadOptions()):
        self.root, self.options = Path(root), options
        self.max_gap = read_gap(options, self.GAP)
        self._fds: dict[str, int] = {}
        self._pid = None

    @property
    def label(self) -> Path:
        return self.root

    def where(self, name: str) -> Path:
        return self.root / name

    def read_file(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def _fd(self, name: str) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if name not in self._fds:
            self._fds[name] = os.open(self.root / name, os.O_RDONLY)
        return self._fds[name]

    def read_members(self, shard: ShardFile, rows, offsets, sizes, digests, whole: bool = False,
                     in_process: bool = False) -> list:
        """Bytes of each member, in the order given (rows are positions in the shard; digests unused here:
        `pipeline verify` checks local shards; the page cache makes whole-shard reads moot)."""
        order = np.argsort(offsets, kind="stable")
        offs, szs = offsets[order], sizes[order]
        starts, ends, span = coalesce(offs, szs, self.max_gap)
        fd = self._fd(shard.name)
        blobs = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            buf = os.pread(fd, b - a, a)
            if len(buf) != b - a:
                raise PipelineError(f"{self.root / shard.name}: truncated shard (short read at byte {a}); "
                                    "run `pipeline verify` and prepare the shard set again")
            blobs.append(buf)
        out: list = [b""] * len(order)
        slice_members(order, offs, szs, span, starts, blobs, out)
        return out


def open_store(location, options: ReadOptions = ReadOptions()):
    """The store of a local folder or a URL (or of a `DataSource`, with its own options)."""
    if isinstance(location, DataSource):
        location, options = location.location, location.options
    if is_url(location):
        return RemoteStore(str(location), options)
    if "://" in str(location):
        raise PipelineError(f"{location}: unknown URL scheme; shard sets are read from a folder or from "
                            f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    return LocalStore(Path(location), options)
