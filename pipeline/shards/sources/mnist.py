"""`mnist:PATH` - the idx files (train-images-idx3-ubyte, t10k-labels-idx1-ubyte, ...), gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.sources.base import ArraySource

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file: magic (0, 0, dtype 0x08, ndim), big-endian dimensions, then uint8 data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise PipelineError(f"{path}: corrupt gzip file ({exc}); download it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PipelineError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise PipelineError(f"{path}: truncated idx file ({len(raw) - start} bytes of data, header says {int(np.prod(dims))})")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(tuple(dims))


def _find(root: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        hits = sorted(root.rglob(cand))
        if hits:
            return hits[0]
    raise PipelineError(f"{root}: {stem}[.gz] not found (mnist:PATH needs the four idx files)")


class MnistSource(ArraySource):
    def __init__(self, arg: str | None):
        super().__init__()
        if not arg:
            raise PipelineError("mnist: needs a path, e.g. mnist:/data/mnist")
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise PipelineError(f"{root}: no such folder (mnist:PATH)")
        self.name, self.mode = root.name or "mnist", "L"
        for split, (img_name, lbl_name) in FILES.items():
            images, labels = read_idx(_find(root, img_name)), read_idx(_find(root, lbl_name))
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise PipelineError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
            self._set_split(split, images, labels)
        self.classes = [str(i) for i in range(int(self._labels["train"].max()) + 1)]
