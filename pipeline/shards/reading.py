"""What every read of a shard set needs, wherever its bytes live: whether a location is a URL, a shard as its
index names it (`ShardFile`), how to read (`ReadOptions`, `DataSource`), and how neighbouring members merge
into one range (`coalesce`). `storage.py` (folders, `open_store`) and `remote.py` (URLs) build on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.shards.cache import parse_size

# scheme -> the extra that reads it
REMOTE_SCHEMES = {"s3": "remote", "http": "remote", "https": "remote", "gs": "gcs", "gcs": "gcs"}


def is_url(location) -> bool:
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


@dataclass(frozen=True)
class ShardFile:
    """One shard's tar as its index.json record names it: what a read needs to locate and check it."""

    name: str
    sha256: str
    bytes: int
    count: int


@dataclass(frozen=True)
class ReadOptions:
    """How a shard set is read. Local folders use only `max_gap`."""

    max_gap: str = "auto"  # read across gaps up to this size; auto: LocalStore.GAP, RemoteStore.GAP
    cache_dir: str = ""  # remote members are cached here ("" the user's cache folder)
    cache_limit: str = "10GB"  # at most this much on disk; 0 turns the cache off
    retries: int = 5  # per failing read, with exponential backoff
    timeout: float = 60.0  # seconds a remote read may take before it counts as failed


@dataclass(frozen=True)
class DataSource:
    """A shard set's location with the options to read it by: what travels to selection processes."""

    location: str
    options: ReadOptions = ReadOptions()

    def __str__(self) -> str:
        return self.location


def coalesce(offsets: np.ndarray, sizes: np.ndarray, max_gap: int):
    """Spans covering members (offsets sorted): (starts, ends, span of each member). Members whose gap to the
    previous member's end is at most `max_gap` share a span."""
    ends = offsets + sizes
    if not len(offsets):
        return offsets, ends, np.zeros(0, np.int64)
    reach = np.maximum.accumulate(ends)
    new = np.ones(len(offsets), bool)
    new[1:] = offsets[1:] - reach[:-1] > max_gap
    span = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(offsets)) - 1
    return offsets[first], reach[last], span


def slice_members(order, offsets, sizes, span, starts, blobs, out) -> None:
    for k in range(len(order)):
        s = span[k]
        o = int(offsets[k] - starts[s])
        out[order[k]] = memoryview(blobs[s])[o:o + int(sizes[k])]


def read_gap(options: ReadOptions, default: int) -> int:
    return default if options.max_gap == "auto" else parse_size(options.max_gap, "data.read_gap")
