"""Walking a WebDataset shard's tar headers by range reads: what `pipeline index` and its verify read.

`tarfile` runs over `RangeReader`, a file object that fetches `WINDOW` bytes at a time through a `fetch(start,
end)` (a folder's pread or an object store's range request), so a shard's headers cost one read a sample in the
common layout (the label member before the image, each with its pax header). Members are grouped by key (the
name up to the first dot of the base name): one image (`IMAGE_EXTS`) and one label (`LABEL_EXTS`) make a sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

from PIL import Image

from pipeline.errors import DataError
from pipeline.shards import layout

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "label", "json")
WINDOW = 8 * 1024  # bytes read at a header: a label member before the image (pax headers too) and its first 2 KiB
IMAGE_HEAD = 2048  # bytes of an image read for its width and height
LABEL_MAX = 4096  # bytes of a label member read at most


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over `read(start, end) -> bytes` that fetches `window` bytes at a time: what
    `tarfile` walks the headers of a shard through, from a folder or by range requests."""

    def __init__(self, fetch, size: int, window: int = WINDOW):
        self.fetch, self.length, self.window = fetch, size, window
        self.pos, self.buf, self.buf_at = 0, b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence] + offset
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), max(0, self.length - self.pos))
        if not n:
            return 0
        if not (self.buf_at <= self.pos and self.pos + n <= self.buf_at + len(self.buf)):
            end = min(self.length, self.pos + max(n, self.window))
            self.buf, self.buf_at = self.fetch(self.pos, end), self.pos
        start = self.pos - self.buf_at
        b[:n] = self.buf[start:start + n]
        self.pos += n
        return n


@dataclass
class ShardScan:
    """What the headers of one shard say: a row per usable sample, and the samples skipped."""

    name: str
    bytes: int
    offsets: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    shapes: list = field(default_factory=list)  # (height, width, mode) of each image, None where not in reach
    skipped: list = field(default_factory=list)
    headers_sha256: str = ""
    sha256: str | None = None
    digests: list | None = None


def _label(ext: str, data: bytes) -> int:
    text = data.decode("utf-8").strip()
    value = json.loads(text) if ext == "json" else int(text)
    if isinstance(value, dict):
        value = value.get("label", value.get("cls"))
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a class number")
    return value


def _shape(head: bytes):
    """(height, width, mode) from an image's first bytes, or None when they do not hold it."""
    try:
        with Image.open(io.BytesIO(head)) as img:
            return img.height, img.width, "L" if img.mode in ("L", "1", "LA", "I;16") else "RGB"
    except Exception:  # noqa: BLE001 - a truncated header: the size is simply not known
        return None


def scan_shard(name: str, size: int, fetch, window: int = WINDOW) -> ShardScan:
    """Walk one shard's headers (tarfile over `fetch(start, end)`), grouping members into samples by key."""
    scan = ShardScan(name, size)
    headers = hashlib.sha256(str(size).encode())
    samples: dict[str, dict] = {}
    try:
        reader = RangeReader(fetch, size, window)

        def head(m, limit: int) -> bytes:  # not tarfile's extractfile: its buffer would read 8 KiB of every image
            reader.seek(m.offset_data)
            return reader.read(min(m.size, limit))
        with tarfile.open(fileobj=reader, mode="r:") as tar:
            for m in tar:
                headers.update(f"{m.name}\0{m.size}\0{m.offset_data}\0".encode())
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile() or "." not in base:
                    continue
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                sample = samples.setdefault(key, {"images": [], "labels": []})
                if ext in IMAGE_EXTS:
                    sample["images"].append((m.offset_data, m.size, _shape(head(m, IMAGE_HEAD))))
                elif ext in LABEL_EXTS:
                    data = head(m, LABEL_MAX) if m.size <= LABEL_MAX else None
                    sample["labels"].append((ext, data))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{name}: not a readable tar ({type(exc).__name__}: {exc}); index only WebDataset tar "
                        "shards (`--split NAME=PATTERN` picks which files)") from None
    for key, s in samples.items():
        reason = None
        if len(s["images"]) != 1 or len(s["labels"]) != 1:
            reason = (f"{len(s['images'])} images ({', '.join(IMAGE_EXTS)}) and {len(s['labels'])} labels "
                      f"({', '.join(LABEL_EXTS)}); a sample needs one of each")
        else:
            ext, data = s["labels"][0]
            try:
                label = _label(ext, data if data is not None else b"")
            except (ValueError, UnicodeDecodeError) as exc:
                reason = f"its .{ext} is not a class number ({str(exc)[:80]})"
        if reason:
            scan.skipped.append({"shard": name, "key": key, "reason": reason})
            continue
        offset, nbytes, shape = s["images"][0]
        scan.offsets.append(offset)
        scan.sizes.append(nbytes)
        scan.labels.append(label)
        scan.shapes.append(shape)
    scan.headers_sha256 = headers.hexdigest()
    return scan


def digests_of(scan: ShardScan, data: bytes) -> None:
    """Record the shard's SHA-256 and each image's digest from the shard's bytes."""
    scan.sha256 = hashlib.sha256(data).hexdigest()
    scan.digests = [layout.member_digest(memoryview(data)[o:o + n]) for o, n in zip(scan.offsets, scan.sizes)]


__all__ = ["IMAGE_EXTS", "LABEL_EXTS", "WINDOW", "RangeReader", "ShardScan", "digests_of", "scan_shard"]
