"""`stl10:PATH` - STL-10's binary release (Coates, Lee and Ng, 2011): stl10_binary/ or stl10_binary.tar.gz.

`train_X.bin` / `test_X.bin`: uint8 images of 3x96x96, each channel stored column-major (the release's own
reader transposes (N, 3, 96, 96) to (N, 96, 96, 3) over axes 3, 2, 1); `train_y.bin` / `test_y.bin`: one byte
per image, classes 1..10 (here 0..9); `class_names.txt`; `unlabeled_X.bin`: 100,000 images without labels,
the split `unlabeled` (labels -1, `labelled: false` in index.json: for pre-training with the methods that need
no labels, as the ACL family does; the others refuse it). PATH is the extracted folder (searched below it; the
files are memory-mapped, not read whole) or the archive (read in one pass, front to back).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.sources.base import ArraySource, RowImages

SIZE = 96
PIXELS = 3 * SIZE * SIZE
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin", None)}
NAMES = "class_names.txt"


def _column_major(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, SIZE, SIZE).transpose(2, 1, 0)


def _read_members(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """The wanted files by base name as uint8 arrays, from the folder below `path` (memory-mapped) or from the
    archive `path`."""
    if path.is_dir():
        found = {}
        for p in sorted(path.rglob("*")):
            if p.name in wanted and p.is_file() and p.name not in found:
                found[p.name] = np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8)
        return found
    found = {}
    try:
        with tarfile.open(path, "r|*") as tar:  # a stream: the archive is read once, front to back
            for m in tar:
                name = Path(m.name).name
                if m.isfile() and name in wanted and name not in found:
                    found[name] = np.frombuffer(tar.extractfile(m).read(), dtype=np.uint8)
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PipelineError(f"{path}: not a readable STL-10 archive ({exc}); download it again") from exc
    return found


class Stl10Source(ArraySource):
    def __init__(self, arg: str | None):
        super().__init__()
        if not arg:
            raise PipelineError("stl10: needs a path, e.g. stl10:/data/stl10_binary")
        path = Path(arg).expanduser()
        if not path.exists():
            raise PipelineError(f"{path}: no such file or folder (stl10:PATH)")
        self.name, self.mode = "stl10", "RGB"
        wanted = {n for pair in FILES.values() for n in pair if n} | {NAMES}
        found = _read_members(path, wanted)
        missing = sorted(n for split, pair in FILES.items() if split != "unlabeled" for n in pair if n not in found)
        if missing:
            raise PipelineError(f"{path}: {', '.join(missing)} not found (stl10:PATH takes the extracted stl10_binary "
                                "folder or stl10_binary.tar.gz)")
        for split, (x_name, y_name) in FILES.items():
            if x_name not in found:  # the unlabeled images are optional: some copies leave them out
                continue
            raw = found[x_name]
            labels = (np.asarray(found[y_name]).astype(np.int64) if y_name
                      else np.zeros(raw.size // PIXELS, np.int64))  # 1 less below: -1, no label
            y_name = y_name or "its size"
            if raw.size % PIXELS or raw.size // PIXELS != len(labels):
                raise PipelineError(f"{path}/{x_name}: {raw.size} bytes for {len(labels)} labels in {y_name} (each "
                                    f"image is {PIXELS} bytes); the file is truncated or not STL-10's")
            if split != "unlabeled" and len(labels) and (labels.min() < 1 or labels.max() > 10):
                raise PipelineError(f"{path}/{y_name}: labels must be 1..10 (found {labels.min()}..{labels.max()})")
            self._images[split] = RowImages([raw.reshape(-1, PIXELS)], _column_major)
            self._labels[split] = labels - 1
        if "unlabeled" in self._images:
            self.unlabeled_splits = frozenset({"unlabeled"})
        text = bytes(found[NAMES]).decode(errors="replace") if NAMES in found else ""
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
        self.classes = names if len(names) == 10 else [str(i) for i in range(10)]
