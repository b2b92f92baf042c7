"""A bounded local cache of remote shard members, shared by the loader workers and processes of one machine.

One sparse file per shard, named by the shard's SHA-256 (a changed remote shard is a different file, never a
stale hit): `<sha>.data` holds the members fetched so far at their offsets in the tar, `<sha>.have` one byte
per member saying which are there. Members enter only after their digest was checked, are written before
`.have` names them, and `.have` is replaced atomically under the cache's lock; a reader checks every member's
digest again, so a torn or evicted entry is a miss, never wrong bytes. When the cache's disk use (allocated
blocks, not logical sizes) passes its limit, the least recently read shards are evicted whole. A shard that an
epoch reads whole enters whole (`fill_whole`), checked against its SHA-256, fetched by one worker while the
others wait for it (`fetching`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.layout import member_digest

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text, what: str = "size") -> int:
    """Bytes of '10GB', '512MiB', '0' (and plain numbers)."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PipelineError(f"{what} = {text!r}: write a size such as 10GB, 512MiB or 0")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipeline" / "shards"


class ShardCache:
    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = Path(folder), int(limit)
        self.hits = self.misses = 0

    def _paths(self, sha: str) -> tuple[Path, Path]:
        return self.folder / f"{sha}.data", self.folder / f"{sha}.have"

    def _check_folder(self) -> None:
        """The cache writes only into a folder that is its user's own and that nobody else can write to: another
        user's links planted under the cache's names would otherwise make a run write into their targets. Every
        file is then opened without following links (O_NOFOLLOW) and temporaries are created exclusively."""
        try:
            st = os.lstat(self.folder)
        except OSError as exc:
            raise PipelineError(f"{self.folder}: the shard cache folder cannot be used ({exc.strerror}); set "
                                "data.cache_dir to a folder of yours, or data.cache_limit = 0") from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            why = ("is a link, not a folder" if stat.S_ISLNK(st.st_mode) else "is not a folder"
                   if not stat.S_ISDIR(st.st_mode) else "belongs to another user" if st.st_uid != os.geteuid()
                   else "can be written by other users")
            raise PipelineError(f"{self.folder}: the shard cache folder {why}; set data.cache_dir to a folder of "
                                "your own that only you can write (chmod go-w), or data.cache_limit = 0")

    def _ready(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise PipelineError(f"{self.folder}: the shard cache is not writable ({exc.strerror}); set "
                                "data.cache_dir to a folder of yours, or data.cache_limit = 0") from None
        self._check_folder()

    @contextmanager
    def _locked(self, name: str = ".lock"):
        """The cache's own lock (`.lock`: its bookkeeping), or another lock file of it."""
        self._ready()
        try:
            fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise PipelineError(f"{self.folder}: the shard cache is not writable ({exc.strerror}); set "
                                "data.cache_dir to a folder of yours, or data.cache_limit = 0") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def fetching(self, shard):
        """Held while one process or thread fetches a whole shard: the others wait for it, then find it here
        (a lock per open file, so threads of one process wait for each other too)."""
        return self._locked(f".{shard.sha256}.fetch")

    def holds_whole(self, shard) -> bool:
        """Whether every member of the shard is here (each is still checked when read)."""
        return bool(self._have(self._paths(shard.sha256)[1], shard.count).all())

    def fill_whole(self, shard, fetch) -> bool:
        """The whole shard from `fetch(sink)`, which streams its bytes into `sink`: written to a temporary of
        the cache's own and entered only when its size and sha256 are the ones its index records. Returns
        whether they were (False: nothing entered)."""
        self._ready()
        data_path, have_path = self._paths(shard.sha256)
        fd, tmp = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=self.folder)  # O_EXCL
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                def sink(chunk: bytes) -> None:
                    nonlocal size
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                fetch(sink)
            if size != shard.bytes or digest.hexdigest() != shard.sha256:
                Path(tmp).unlink(missing_ok=True)
                return False
            with self._locked():
                os.replace(tmp, data_path)
                self._write_have(have_path, np.ones(shard.count, np.uint8))
                self._evict(keep=shard.sha256)
            return True
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _write_have(self, have_path: Path, have: np.ndarray) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{have_path.name}.", suffix=".tmp", dir=self.folder)  # O_EXCL
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(have.tobytes())
            os.replace(tmp, have_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _have(self, path: Path, count: int) -> np.ndarray:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                have = np.frombuffer(os.pread(fd, count + 1, 0), dtype=np.uint8).copy()
            finally:
                os.close(fd)
        except (OSError, ValueError):  # none yet, unreadable, or a link: nothing held
            return np.zeros(count, np.uint8)
        return have if len(have) == count else np.zeros(count, np.uint8)

    def lookup(self, shard, rows, offsets, sizes, digests) -> dict[int, memoryview]:
        """{position in `rows`: bytes} of the members held and intact."""
        data_path, have_path = self._paths(shard.sha256)
        have = self._have(have_path, shard.count)
        present = np.flatnonzero(have[rows])
        found: dict[int, memoryview] = {}
        if len(present):
            try:
                fd = os.open(data_path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    for k in present.tolist():
                        blob = os.pread(fd, int(sizes[k]), int(offsets[k]))
                        if member_digest(blob) == int(digests[k]):
                            found[k] = memoryview(blob)
                finally:
                    os.close(fd)
                try:
                    os.utime(have_path)  # recency, for eviction
                except OSError:
                    pass
        self.hits += len(found)
        self.misses += len(rows) - len(found)
        return found

    def store(self, shard, rows, offsets, blobs) -> None:
        """Add verified members; then evict least-recently-read shards while the cache is over its limit."""
        if not len(rows):
            return
        data_path, have_path = self._paths(shard.sha256)
        with self._locked():
            fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                if os.fstat(fd).st_size < shard.bytes:
                    os.ftruncate(fd, shard.bytes)  # sparse: only written blocks take disk
                for off, blob in zip(offsets.tolist(), blobs):
                    os.pwrite(fd, blob, off)
            finally:
                os.close(fd)
            have = self._have(have_path, shard.count)
            have[rows] = 1
            self._write_have(have_path, have)
            self._evict(keep=shard.sha256)

    def keep_file(self, key: str, data: bytes) -> None:
        """A small whole file (index.json, an .idx table) under `key` (hex): written to a temporary of the
        cache's own, then renamed into place."""
        self._ready()
        path = self.folder / f"{key}.file"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)  # O_EXCL
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def kept_file(self, key: str) -> bytes | None:
        """The bytes kept under `key`, or None: never through a link, never from a folder another user can
        write (index.json's copy is trusted as it stands)."""
        try:
            self._check_folder()
            fd = os.open(self.folder / f"{key}.file", os.O_RDONLY | os.O_NOFOLLOW)
        except (OSError, PipelineError):
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except OSError:
            return None

    def usage(self) -> int:
        """Bytes of disk the cache's shard files take."""
        return sum(p.stat().st_blocks * 512 for p in self.folder.glob("*.data") if p.is_file())

    def _evict(self, keep: str) -> None:
        entries = []
        for p in self.folder.glob("*.data"):
            try:
                used = p.stat().st_blocks * 512
                recency = (p.with_suffix(".have")).stat().st_mtime
            except FileNotFoundError:
                recency = 0.0
                used = p.stat().st_blocks * 512 if p.exists() else 0
            entries.append((p.stem == keep, recency, used, p))
        total = sum(e[2] for e in entries)
        for _, _, used, p in sorted(entries, key=lambda e: (e[0], e[1])):  # the shard just written goes last
            if total <= self.limit:
                break
            p.with_suffix(".have").unlink(missing_ok=True)  # first: a reader never trusts a .data alone
            p.unlink(missing_ok=True)
            total -= used
