"""Where a shard set's bytes live: a local folder, or a URL (s3://, gs://, http(s)://) read through fsspec.

A store reads whole small files (index.json, the .idx member tables) and the members of one shard by byte
range. Members that lie close together are read in one range (`ReadOptions.max_gap`); a remote store sends a
shard's ranges in parallel (fsspec's `cat_ranges`), retries timeouts, 5xx answers and dropped connections with
bounded backoff, checks every member against the digest its .idx records, and keeps verified members in a
bounded local cache (`pipeline.shards.cache`), so nothing unchecked is ever decoded or cached.
Credentials come from each service's own environment and configuration (AWS_* variables and ~/.aws for S3,
GOOGLE_APPLICATION_CREDENTIALS for GCS), never from the project's files.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.redact import redact
from pipeline.shards.cache import ShardCache, default_cache_dir, parse_size
from pipeline.shards.layout import member_digest

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


def _slice_members(order, offsets, sizes, span, starts, blobs, out) -> None:
    for k in range(len(order)):
        s = span[k]
        o = int(offsets[k] - starts[s])
        out[order[k]] = memoryview(blobs[s])[o:o + int(sizes[k])]


def _gap(options: ReadOptions, default: int) -> int:
    return default if options.max_gap == "auto" else parse_size(options.max_gap, "data.read_gap")


class LocalStore:
    """A shard-set folder on this machine. Picklable: descriptors are opened lazily in each process."""

    local = True
    GAP = 16 * 1024  # a read across 16 KiB of page cache is cheaper than another system call

    def __init__(self, root: Path, options: ReadOptions = ReadOptions()):
        self.root, self.options = Path(root), options
        self.max_gap = _gap(options, self.GAP)
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
        _slice_members(order, offs, szs, span, starts, blobs, out)
        return out


class _Transient(Exception):
    """A read worth retrying: the answer was cut short."""


class TooLarge(DataError):
    """An answer longer than what this tool reads of that object."""


class Unreachable(DataError):
    """Reads of a URL still failing after their retries (the server down, the network gone)."""


def _is_permanent(exc: BaseException) -> bool:
    """Missing objects and refused credentials do not heal by retrying; everything else might."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, RedirectRefused)):
        return True
    status = getattr(exc, "status", None)  # aiohttp's answers; s3fs raises the OSError kinds above
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


READ_LIMIT = 256 << 20  # index.json, .idx tables, markers: far above any of ours (a 1.28M-image .idx is 45 MB)
DOWNLOAD_LIMIT = 64 << 30  # a whole object whose size nothing records


class RemoteStore:
    """A shard set under a URL prefix. Picklable: the fsspec filesystem is made lazily in each process (an
    async filesystem's event loop does not survive a fork)."""

    local = False
    # Bytes, not calls, are what a remote read costs once requests run in parallel: merge only close neighbours.
    # (A 10% random subset of 2 KB samples: 16 KiB reads 23% of the set, 4 KiB about 10%.)
    GAP = 4 * 1024
    WHOLE_KEEP = 512 << 20  # bytes of whole shards kept in memory from a server that ignores Range

    def __init__(self, url: str, options: ReadOptions = ReadOptions()):
        self.url, self.options = url.rstrip("/"), options
        self.max_gap = _gap(options, self.GAP)
        limit = parse_size(options.cache_limit, "data.cache_limit")
        self.cache = ShardCache(Path(options.cache_dir or default_cache_dir()), limit) if limit else None
        self.bytes_read = 0  # over the wire, by this process
        self.requests = 0
        self._fs = self._base = self._pid = None
        self.whole_objects = False  # the server ignores Range: shards are read whole and kept (WHOLE_KEEP)
        self._whole: dict[str, bytes] = {}  # the whole shards read last, newest last
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_base": None, "_pid": None, "_whole": {}, "_locks": {},
                "_locks_lock": None}  # made again where it lands

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _locks_lock=threading.Lock())

    @property
    def label(self) -> str:
        return self.url

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def filesystem(self):
        """(fsspec filesystem, path of the prefix in it), made once per process."""
        if self._pid != os.getpid():
            self._fs, self._base = _open_filesystem(self.url, self.options.timeout)
            self._pid = os.getpid()
        return self._fs, self._base

    def _path(self, name: str) -> str:
        return f"{self.filesystem()[1]}/{name}"

    def _stream(self, name: str, limit: int, sink) -> int:
        """The object's bytes into `sink(chunk)` as they arrive, never more than `limit`: a server that sends
        more (an endless answer) is stopped at the limit, whatever its headers said. Returns the byte count."""
        fs, _ = self.filesystem()
        got = 0

        def take(chunk: bytes) -> None:
            nonlocal got
            got += len(chunk)
            if got > limit:
                raise TooLarge(f"{self.where(name)}: larger than the {limit:,} bytes this tool reads for it "
                               "(a damaged or hostile server?); check the URL")
            sink(chunk)

        if self.url.partition("://")[0].lower() in ("http", "https"):
            # the answer streamed from fsspec's own session: its status errors keep their types (a 503 is
            # retried, a 404 is missing), and no more than the limit is ever read
            from fsspec.asyn import sync

            async def stream():
                session = await fs.set_session()
                async with session.get(fs.encode_url(self._path(name))) as r:
                    fs._raise_not_found_for_status(r, self._path(name))
                    async for chunk in r.content.iter_chunked(1 << 20):
                        take(chunk)

            sync(fs.loop, stream)
            return got
        if getattr(fs, "async_impl", False) and hasattr(fs, "open_async"):
            # s3fs, gcsfs: one GET whose body is streamed (a buffered file would send a HEAD, then a GET per block)
            from fsspec.asyn import sync

            async def stream_body():
                f = await fs.open_async(self._path(name), "rb")
                try:
                    while chunk := await f.read(min(1 << 20, limit + 1 - got)):
                        take(chunk)
                finally:
                    body = getattr(f, "r", None)
                    if body is not None and hasattr(body, "close"):
                        body.close()

            sync(fs.loop, stream_body)
            return got
        with fs.open(self._path(name), "rb") as f:
            while True:
                chunk = f.read(min(1 << 20, limit + 1 - got))
                if not chunk:
                    return got
                take(chunk)

    def read_file(self, name: str, limit: int | None = None) -> bytes:
        """A whole (small) object: index.json, an .idx table, a marker; at most `limit` (READ_LIMIT) bytes."""
        limit = READ_LIMIT if limit is None else limit
        parts: list[bytes] = []

        def attempt():
            parts.clear()
            return [self._stream(name, limit, parts.append)]

        self._with_retries(name, attempt, [None])
        data = b"".join(parts)
        self.bytes_read += len(data)
        return data

    def download(self, name: str, path: Path, limit: int | None = None) -> None:
        """A whole object into a local file, at most `limit` bytes (a shard's recorded size, when known)."""
        limit = DOWNLOAD_LIMIT if limit is None else limit

        def attempt():
            with open(path, "wb") as f:
                return [self._stream(name, limit, f.write)]

        try:
            self._with_retries(name, attempt, [None])
        except DataError:
            path.unlink(missing_ok=True)
            raise
        self.bytes_read += path.stat().st_size

    def size(self, name: str) -> int | None:
        """The object's size, or None when there is none."""
        fs, _ = self.filesystem()
        try:
            return self._with_retries(name, lambda: fs.size(self._path(name)), [None])
        except DataError:
            if not fs.exists(self._path(name)):
                return None
            raise

    def holds_copy_of(self, name: str, path: Path) -> bool:
        """Whether the object `name` has the bytes of the local file `path`, not merely its size: by the MD5 the
        service keeps of a single-part object (S3's ETag, GCS's md5Hash), else by reading it back and hashing."""
        size = path.stat().st_size
        if self.size(name) != size:
            return False
        fs, _ = self.filesystem()
        info = self._with_retries(name, lambda: fs.info(self._path(name)), [None])
        md5 = _service_md5(info)
        if md5 is not None:
            return md5 == _file_digest(path, hashlib.md5())
        def read_back() -> str:
            h = hashlib.sha256()
            self._stream(name, size, h.update)
            return h.hexdigest()

        try:
            theirs = self._with_retries(name, read_back, [None])
        except DataError:  # longer than the file, or gone
            return False
        return theirs == _file_digest(path, hashlib.sha256())

    def upload(self, path: Path, name: str) -> None:
        """A local file to the object `name` (replacing it: callers decide what may be replaced)."""
        if self.url.partition("://")[0].lower() in ("http", "https"):
            raise PipelineError(f"{self.url}: HTTP is read-only here; upload to s3:// or gs:// and serve that")
        fs, _ = self.filesystem()
        self._with_retries(name, lambda: fs.put_file(str(path), self._path(name)), [None])

    def remove(self, name: str) -> None:
        fs, _ = self.filesystem()
        try:
            fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def _ignores_range(self) -> None:
        if not self.whole_objects:
            self.whole_objects = True
            print(f"note: {self.url}: the server ignores Range requests (it answers with whole files); reading "
                  "whole shards from it. A server that answers Range (nginx, caddy, S3, GCS) reads subsets at "
                  "their own cost", file=sys.stderr)

    def _ranges(self, name: str, starts: list[int], ends: list[int]) -> list[bytes]:
        fs, _ = self.filesystem()
        path = self._path(name)
        if self.whole_objects:  # one request for the whole shard, kept for the next reads, sliced here
            whole = self._whole.pop(name, None)
            if whole is None:
                whole = self._with_retries(name, lambda: [fs.cat_file(path)], [None])[0]
                self.requests += 1
                self.bytes_read += len(whole)
            self._whole[name] = whole
            while sum(map(len, self._whole.values())) > self.WHOLE_KEEP and len(self._whole) > 1:
                self._whole.pop(next(iter(self._whole)))
            if len(whole) < max(ends, default=0):
                raise DataError(f"{self.where(name)}: {len(whole):,} bytes, shorter than its .idx records; upload "
                                "the shard set again (`pipeline upload DIR URL`)")
            return [whole[a:b] for a, b in zip(starts, ends)]
        out: list = [None] * len(starts)
        todo = list(range(len(starts)))

        def attempt():
            got = fs.cat_ranges([path] * len(todo), [starts[i] for i in todo], [ends[i] for i in todo],
                                on_error="return")
            self.requests += len(todo)
            failed = []
            for i, data in zip(todo, got):
                if isinstance(data, BaseException):
                    if _is_permanent(data):
                        raise data
                    failed.append((i, data))
                elif len(data) > ends[i] - starts[i] and len(data) >= ends[i]:
                    # a server that ignores Range sends the whole object (200): use it, and read whole from now on
                    self._ignores_range()
                    out[i] = data[starts[i]:ends[i]]
                    self.bytes_read += len(data)
                    self._whole[name] = data
                elif len(data) != ends[i] - starts[i]:
                    failed.append((i, _Transient(f"{len(data)} bytes for a {ends[i] - starts[i]}-byte range")))
                else:
                    out[i] = data
                    self.bytes_read += len(data)
            todo[:] = [i for i, _ in failed]
            if failed:
                raise failed[0][1]
            return out

        return self._with_retries(name, attempt, todo)

    def _with_retries(self, name: str, attempt, pending: list):
        """`attempt()` until it succeeds, at most `retries` more times, sleeping 0.1 s, 0.2 s, ... (at most 5 s,
        jittered) between tries; a permanent failure or the last one is one DataError naming the URL."""
        url = self.where(name)
        for k in range(self.options.retries + 1):
            try:
                return attempt()
            except Exception as exc:  # fsspec backends raise their own types
                if isinstance(exc, DataError):  # our own verdict on what arrived: retrying does not change it
                    raise
                if isinstance(exc, RedirectRefused):
                    raise DataError(f"{url}: the server redirects it to another address ({redact(exc.target)}), "
                                    "which is not followed; give the shard set's final URL") from None
                if _is_permanent(exc):
                    raise DataError(self._permanent_message(url, exc)) from None
                if k == self.options.retries:
                    raise Unreachable(f"{url}: {len(pending) or 1} read(s) still failing after {k} retries "
                                      f"({type(exc).__name__}: {_short(exc)}); check the connection and try "
                                      "again") from None
                time.sleep(min(5.0, 0.1 * 2 ** k) * (0.5 + random.random()))

    def _permanent_message(self, url: str, exc: BaseException) -> str:
        """What a failure that retrying does not heal means, in the words of the fix."""
        text = str(exc)
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            bucket = self.url.partition("://")[2].split("/", 1)[0]
            return (f"{url}: the bucket {bucket!r} does not exist (or these credentials cannot see it); check the "
                    "URL's bucket name and the endpoint (AWS_ENDPOINT_URL)")
        if isinstance(exc, FileNotFoundError) or getattr(exc, "status", None) == 404:
            return (f"{url}: missing; check the URL, and that the shard set was uploaded there completely "
                    "(`pipeline upload DIR URL`)")
        if isinstance(exc, PermissionError) or getattr(exc, "status", None) in (401, 403):
            return (f"{url}: access refused ({_short(exc)}); check the credentials (AWS_* variables, "
                    "~/.aws, GOOGLE_APPLICATION_CREDENTIALS) and the object's permissions")
        return f"{url}: refused ({_short(exc)}); check the URL"

    def read_index(self, name: str) -> bytes:
        """index.json: from the server, a copy kept in the cache; when the server cannot be reached, that copy,
        said in one line (a set whose shards are all cached then trains offline: the .idx tables and members
        are pinned and checked, the copy of index.json is the last one read)."""
        key = hashlib.sha256(f"index of {redact(self.url)}".encode()).hexdigest()
        try:
            data = self.read_file(name)
        except Unreachable as exc:
            kept = self.cache.kept_file(key) if self.cache else None
            if kept is None:
                raise
            print(f"note: {exc}. Using the copy of {name} cached when it was last read ({self.cache.folder}); the "
                  "shards must be in the cache too", file=sys.stderr)
            return kept
        if self.cache:
            self._keep(key, data)
        return data

    def read_pinned(self, name: str, size: int | None, sha256: str | None) -> bytes:
        """A small object that index.json pins (an .idx table): from the cache when it holds those bytes, else
        read (no further than `size`) and kept there. The caller checks the pin either way."""
        if sha256 and self.cache:
            kept = self.cache.kept_file(sha256)
            if kept is not None and hashlib.sha256(kept).hexdigest() == sha256:
                return kept
        data = self.read_file(name, limit=size)
        if sha256 and self.cache and hashlib.sha256(data).hexdigest() == sha256:
            self._keep(sha256, data)
        return data

    def _keep(self, key: str, data: bytes) -> None:
        try:
            self.cache.keep_file(key, data)
        except (OSError, PipelineError):
            pass  # the cache is a convenience here; the member reads say so when it cannot be written

    def read_members(self, shard: ShardFile, rows, offsets, sizes, digests, whole: bool = False,
                     in_process: bool = False) -> list:
        """Bytes of each member, in the order given, every one checked against its digest: from the cache
        where it holds them, else fetched (and then cached). `whole`: the epoch reads (nearly) all of this
        shard, so it is fetched whole in one request, once for all the workers (`_whole_shard`); `in_process`:
        the loader's workers are threads of this process, which can share a shard in memory."""
        if whole:
            found = self._whole_shard(shard, rows, offsets, sizes, digests, in_process)
            if found is not None:
                return found
        out: list = [None] * len(rows)
        cached = self.cache.lookup(shard, rows, offsets, sizes, digests) if self.cache else {}
        for k, blob in cached.items():
            out[k] = blob
        need = np.array([k for k in range(len(rows)) if out[k] is None], dtype=np.int64)
        if not len(need):
            return out
        order = need[np.argsort(offsets[need], kind="stable")]
        offs, szs = offsets[order], sizes[order]
        starts, ends, span = coalesce(offs, szs, self.max_gap)
        blobs = self._ranges(shard.name, starts.tolist(), ends.tolist())
        _slice_members(order, offs, szs, span, starts, blobs, out)
        bad = [k for k in order.tolist() if member_digest(out[k]) != int(digests[k])]
        if bad:
            # once more: a proxy or a disk may have flipped bits in flight; a second mismatch is the object itself
            again = self._ranges(shard.name, [int(offsets[k]) for k in bad],
                                 [int(offsets[k] + sizes[k]) for k in bad])
            for k, data in zip(bad, again):
                if member_digest(data) != int(digests[k]):
                    raise DataError(f"{self.where(shard.name)}: the member at byte {int(offsets[k])} does not match "
                                    "the digest its .idx records; the remote copy is damaged: upload the shard "
                                    "set again (`pipeline upload DIR URL`)")
                out[k] = data
        if self.cache:
            try:
                self.cache.store(shard, rows[order], offsets[order], [out[k] for k in order.tolist()])
            except (OSError, PipelineError) as exc:  # a full or read-only disk: go on reading, uncached
                print(f"warning: {self.cache.folder}: the shard cache stops here ({exc}); reading "
                      f"{self.url} uncached in this process", file=sys.stderr)
                self.cache = None
        return out


    def _whole_shard(self, shard: ShardFile, rows, offsets, sizes, digests, in_process: bool) -> list | None:
        """The members from the whole shard, fetched in one request by whichever worker asks first: into the
        cache, where the other processes find it, or (no cache) kept in this process's memory for its threads.
        None when neither can share it (worker processes without a cache read ranges instead)."""
        if self.cache is not None:
            with self.cache.fetching(shard):
                if not self.cache.holds_whole(shard):
                    self._fetch_whole(shard, lambda fetch: self.cache.fill_whole(shard, fetch))
            got = self.cache.lookup(shard, rows, offsets, sizes, digests)
            if len(got) == len(rows):
                return [got[k] for k in range(len(rows))]
            return None  # evicted meanwhile or damaged on disk: read the rest by range, checked
        if not in_process:
            return None
        with self._whole_lock(shard.name):
            whole = self._whole.pop(shard.name, None)
            if whole is None:
                parts: list[bytes] = []

                def keep(fetch) -> bool:
                    parts.clear()
                    fetch(parts.append)
                    data = b"".join(parts)
                    if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
                        return False
                    parts[:] = [data]
                    return True

                self._fetch_whole(shard, keep)
                whole = parts[0]
            self._whole[shard.name] = whole
            while sum(map(len, self._whole.values())) > self.WHOLE_KEEP and len(self._whole) > 1:
                self._whole.pop(next(iter(self._whole)))
        return [memoryview(whole)[int(o):int(o) + int(n)] for o, n in zip(offsets, sizes)]

    def _fetch_whole(self, shard: ShardFile, enter) -> None:
        """One request for the whole shard, bounded by its recorded size; `enter(fetch)` takes the bytes and
        says whether they are the shard the index pins (size and sha256). Once more on a mismatch (bits flipped
        in flight); a second one is the object itself."""
        for attempt in range(2):
            if self._with_retries(shard.name, lambda: enter(self._fetch_stream(shard)), [None]):
                return
        raise DataError(f"{self.where(shard.name)}: not the shard its index.json records (size or sha256 differ); "
                        "the remote copy is damaged or from another preparation: upload the shard set again "
                        "(`pipeline upload DIR URL`)")

    def _fetch_stream(self, shard: ShardFile):
        def fetch(sink) -> None:
            self.requests += 1
            self.bytes_read += self._stream(shard.name, shard.bytes, sink)
        return fetch

    def _whole_lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _file_digest(path: Path, h) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _service_md5(info: dict) -> str | None:
    """The hex MD5 of an object's bytes as its service records it, or None where it does not (an S3 multipart
    upload's ETag is not an MD5 of the bytes)."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
        return etag
    b64 = info.get("md5Hash")
    if isinstance(b64, str):
        import base64
        import binascii

        try:
            return base64.b64decode(b64, validate=True).hex()
        except (binascii.Error, ValueError):
            return None
    return None


class RedirectRefused(Exception):
    """A server redirected a read to another origin (scheme, host, port): not followed."""

    status = None  # not an HTTP error status: `_is_permanent` knows this type

    def __init__(self, target: str):
        super().__init__(target)
        self.target = target


def _same_origin_redirects():
    """An aiohttp trace that stops a redirect to another origin before it is followed: a shard server could
    otherwise point the tool at any address (a private one included). Redirects on the set's own origin are
    followed as before."""
    import aiohttp
    from yarl import URL

    async def on_redirect(session, context, params) -> None:
        location = params.response.headers.get("Location", "")
        target = params.url.join(URL(location))
        if (target.scheme, target.host, target.port) != (params.url.scheme, params.url.host, params.url.port):
            raise RedirectRefused(str(target.with_query(None)))

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    return trace


def _open_filesystem(url: str, timeout: float):
    scheme = url.partition("://")[0].lower()
    extra = REMOTE_SCHEMES[scheme]
    try:
        import fsspec

        if scheme in ("http", "https"):
            import aiohttp

            fs = fsspec.filesystem("http", client_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout),
                                                          "trace_configs": [_same_origin_redirects()]},
                                   skip_instance_cache=True)
            return fs, url
        kwargs = {}
        if scheme == "s3":
            kwargs = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **kwargs)
        return fs, path.rstrip("/")
    except ImportError as exc:
        raise PipelineError(f"{url}: reading {scheme}:// URLs needs the `{extra}` extra "
                            f"(pip install 'pipeline[{extra}]'; missing: {exc.name})") from None


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
