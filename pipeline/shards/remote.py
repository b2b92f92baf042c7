"""A shard set under a URL (s3://, gs://, http(s)://), read through fsspec.

A remote store sends a shard's ranges in parallel (fsspec's `cat_ranges`), fetches a shard that an epoch reads
mostly whole in one request, once for all workers, retries timeouts, 5xx answers and dropped connections with
bounded backoff, checks every member against the digest its .idx records (a whole shard against its SHA-256),
and keeps verified bytes in a bounded local cache (`pipeline.shards.cache`), so nothing unchecked is ever
decoded or cached. Every read is bounded (READ_LIMIT, a file's recorded size), and redirects stay on the set's
own origin. Credentials come from each service's own environment and configuration (AWS_* variables and ~/.aws
for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS), never from the project's files.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.redact import redact
from pipeline.shards.cache import ShardCache, default_cache_dir, parse_size
from pipeline.shards.layout import member_digest
from pipeline.shards.remote_fs import (RedirectRefused, TooLarge, Transient, Unreachable, file_digest, is_permanent,
                                       open_filesystem, permanent_message, service_md5, short)
from pipeline.shards.reading import ReadOptions, ShardFile, coalesce, read_gap, slice_members


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
        self.max_gap = read_gap(options, self.GAP)
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
            self._fs, self._base = open_filesystem(self.url, self.options.timeout)
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
        md5 = service_md5(info)
        if md5 is not None:
            return md5 == file_digest(path, hashlib.md5())
        def read_back() -> str:
            h = hashlib.sha256()
            self._stream(name, size, h.update)
            return h.hexdigest()

        try:
            theirs = self._with_retries(name, read_back, [None])
        except DataError:  # longer than the file, or gone
            return False
        return theirs == file_digest(path, hashlib.sha256())

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

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object, with the retries of every read (`pipeline index` walks headers so)."""
        return self._ranges(name, [start], [end])[0]

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
                    if is_permanent(data):
                        raise data
                    failed.append((i, data))
                elif len(data) > ends[i] - starts[i] and len(data) >= ends[i]:
                    # a server that ignores Range sends the whole object (200): use it, and read whole from now on
                    self._ignores_range()
                    out[i] = data[starts[i]:ends[i]]
                    self.bytes_read += len(data)
                    self._whole[name] = data
                elif len(data) != ends[i] - starts[i]:
                    failed.append((i, Transient(f"{len(data)} bytes for a {ends[i] - starts[i]}-byte range")))
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
                if is_permanent(exc):
                    raise DataError(permanent_message(self.url, url, exc)) from None
                if k == self.options.retries:
                    raise Unreachable(f"{url}: {len(pending) or 1} read(s) still failing after {k} retries "
                                      f"({type(exc).__name__}: {short(exc)}); check the connection and try "
                                      "again") from None
                time.sleep(min(5.0, 0.1 * 2 ** k) * (0.5 + random.random()))

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
        if shard.sha256 is None:  # indexed by headers only (`pipeline index`): nothing to check, nothing cached
            order = np.argsort(offsets, kind="stable")
            offs, szs = offsets[order], sizes[order]
            starts, ends, span = coalesce(offs, szs, self.max_gap)
            out = [None] * len(rows)
            slice_members(order, offs, szs, span, starts, self._ranges(shard.name, starts.tolist(), ends.tolist()), out)
            return out
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
        slice_members(order, offs, szs, span, starts, blobs, out)
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
