"""`imagenet32:PATH` and `imagenet64:PATH` - downsampled ImageNet (Chrabaszcz, Loshchilov and Hutter, 2017).

The release's numpy form: `train_data_batch_1.npz` .. `train_data_batch_10.npz` and `val_data.npz`, each with
`data` (one uint8 row per image: the red plane, then green, then blue, row-major, as CIFAR) and `labels`
(1-based class numbers; here 0-based), and `map_clsloc.txt` (`n02119789 1 kit_fox` a line) for the class names
when present. PATH is the folder holding them (searched below it) or their .zip archives
(Imagenet32_train_npz.zip, Imagenet32_val_npz.zip). The val data is the test split. Read with
`allow_pickle=False`: the release's pickle form (the same names without .npz) is refused, not unpickled.
The rows are held in memory as read, once (ImageNet-32's train split: 3.9 GB; ImageNet-64's: 15.7 GB), and
turned into images one at a time.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.sources.base import ArraySource, RowImages

_TRAIN = re.compile(r"train_data_batch_(\d+)\.npz$")
_VAL = "val_data.npz"
_MAP = "map_clsloc.txt"


def _members(path: Path) -> dict[str, tuple[Path, str | None]]:
    """Base name -> (file, member of a zip or None) for the release's files under `path`."""
    found: dict[str, tuple[Path, str | None]] = {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".zip":
            try:
                with zipfile.ZipFile(f) as z:
                    for name in z.namelist():
                        found.setdefault(Path(name).name, (f, name))
            except (zipfile.BadZipFile, OSError) as exc:
                raise PipelineError(f"{f}: not a readable zip archive ({exc}); download it again") from exc
        else:
            found.setdefault(f.name, (f, None))
    return found


def _read(where: tuple[Path, str | None]) -> bytes:
    f, member = where
    if member is None:
        return f.read_bytes()
    with zipfile.ZipFile(f) as z:
        return z.read(member)


class ImagenetSmallSource(ArraySource):
    def __init__(self, arg: str | None, size: int):
        super().__init__()
        form = f"imagenet{size}"
        if not arg:
            raise PipelineError(f"{form}: needs a path, e.g. {form}:/data/Imagenet{size}_npz")
        path = Path(arg).expanduser()
        if not path.exists():
            raise PipelineError(f"{path}: no such file or folder ({form}:PATH)")
        self.name, self.mode, self.size = form, "RGB", size
        members = _members(path)
        train = sorted((int(m.group(1)), name) for name in members if (m := _TRAIN.match(name)))
        if not train or _VAL not in members:
            pickles = [n for n in members if n == "val_data" or re.fullmatch(r"train_data_batch_\d+", n)]
            hint = (" (these are the release's pickle files, which are not read: use its npz form, "
                    f"Imagenet{size}_train_npz.zip and Imagenet{size}_val_npz.zip)" if pickles else "")
            raise PipelineError(f"{path}: no {form} batches found (expected train_data_batch_N.npz and "
                                f"{_VAL}){hint}")
        parts = [self._batch(members[name], path / name) for _, name in train]
        planes = self._planes
        self._images["train"] = RowImages([p[0] for p in parts], planes)
        self._labels["train"] = np.concatenate([p[1] for p in parts])
        rows, self._labels["test"] = self._batch(members[_VAL], path / _VAL)
        self._images["test"] = RowImages([rows], planes)
        n_classes = int(max(self._labels["train"].max(), self._labels["test"].max())) + 1
        self.classes = self._class_names(members, path, n_classes)

    def _planes(self, row: np.ndarray) -> np.ndarray:
        """A row of red, green and blue planes, each row-major, as HxWx3."""
        return row.reshape(3, self.size, self.size).transpose(1, 2, 0)

    def _batch(self, where, origin: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(io.BytesIO(_read(where)), allow_pickle=False) as z:
                data, labels = np.asarray(z["data"]), np.asarray(z["labels"])
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
            raise PipelineError(f"{origin}: not a downsampled-ImageNet batch (needs arrays data and labels: "
                                f"{exc}); download it again") from exc
        pixels = 3 * self.size * self.size
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
            raise PipelineError(f"{origin}: data is {data.dtype} {tuple(data.shape)}, not uint8 rows of {pixels} "
                                f"pixels ({self.size} px: is this imagenet{64 if self.size == 32 else 32}?)")
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != len(data) or (len(labels) and labels.min() < 1):
            raise PipelineError(f"{origin}: {len(labels)} labels for {len(data)} images, or a label below 1 (the "
                                "release numbers classes from 1)")
        return data, labels - 1

    @staticmethod
    def _class_names(members, path: Path, n_classes: int) -> list[str]:
        """From map_clsloc.txt (`WNID NUMBER NAME`), names made unique by their WordNet id where two share one
        (ImageNet has two cranes); class numbers as names without it."""
        if _MAP not in members:
            return [str(i) for i in range(n_classes)]
        by_number: dict[int, tuple[str, str]] = {}
        for n, line in enumerate(_read(members[_MAP]).decode(errors="replace").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 3 or not fields[1].isdigit():
                raise PipelineError(f"{path / _MAP}: line {n} is not `WNID NUMBER NAME` ({line[:60]!r})")
            by_number[int(fields[1]) - 1] = (fields[0], " ".join(fields[2:]))
        missing = [i + 1 for i in range(n_classes) if i not in by_number]
        if missing:
            raise PipelineError(f"{path / _MAP}: no line for class {missing[0]} (of {n_classes}); use the "
                                "release's map file, or remove it to name classes by number")
        names = [by_number[i][1] for i in range(n_classes)]
        return [f"{name} ({by_number[i][0]})" if names.count(name) > 1 else name for i, name in enumerate(names)]
