"""`folder:PATH` - ImageNet-style class folders of JPEG/PNG files.

Entries whose real path leaves the source folder (symbolic links to files or folders elsewhere) are skipped
and listed unless `follow_symlinks`; so are folders nested inside a class folder and files that are not
images by their extension.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.images import SOURCE_EXTENSIONS, Encoding, transcode_file
from pipeline.shards.sources.base import Encoded, Source

SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def _class_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


class FolderSource(Source):
    def __init__(self, arg: str | None, follow_symlinks: bool = False):
        if not arg:
            raise PipelineError("folder: needs a path, e.g. folder:/data/imagenet")
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise PipelineError(f"{root}: no such folder (folder:PATH needs a folder of class folders)")
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.follow_symlinks = follow_symlinks
        self.name = root.name
        self.mode = "RGB"
        self._files: dict[str, list[str]] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._skipped: list[dict] = []

        split_dirs = {}
        for split, names in SPLIT_DIRS.items():
            found = [root / n for n in names if (root / n).is_dir()]
            if found:
                split_dirs[split] = found[0]
        if "train" in split_dirs:
            self.native_splits = True
        else:
            self.native_splits = False
            split_dirs = {"train": root}

        train_classes = _class_dirs(split_dirs["train"])
        if not train_classes:
            raise PipelineError(f"{split_dirs['train']}: holds no class folders (expected CLASS/IMAGE.jpg)")
        self.classes = [p.name for p in train_classes]
        for split, sdir in split_dirs.items():
            self._list_split(split, sdir)

    def _list_split(self, split: str, sdir: Path) -> None:
        class_ids = {c: i for i, c in enumerate(self.classes)}
        files, labels = [], []
        for cdir in _class_dirs(sdir):
            if not self._inside(cdir):
                self._skip(split, cdir, "symbolic link to a folder outside the source folder (--follow-symlinks to read it)")
                continue
            if cdir.name not in class_ids:
                raise PipelineError(
                    f"{cdir}: class folder not present in {self.root / 'train'}; "
                    "every split must use the training classes"
                )
            found = 0
            for f in sorted(cdir.iterdir()):
                if f.name.startswith("."):
                    continue
                if f.is_dir():
                    self._skip(split, f, "a folder inside a class folder (not read)")
                    continue
                if not f.is_file():
                    self._skip(split, f, "not a regular file")
                    continue
                if not self._inside(f):
                    self._skip(split, f, "symbolic link to a file outside the source folder (--follow-symlinks to read it)")
                    continue
                rel = str(f.relative_to(self.root))
                if f.suffix.lower() not in SOURCE_EXTENSIONS:
                    self._skipped.append({"split": split, "source": rel, "reason": "not an image file (by its extension)"})
                    continue
                files.append(rel)
                labels.append(class_ids[cdir.name])
                found += 1
            if found == 0:
                raise PipelineError(f"{cdir}: empty class folder (no image files it may read); remove it or add images")
        self._files[split] = files
        self._labels[split] = np.asarray(labels, dtype=np.int64)

    def _inside(self, path: Path) -> bool:
        if self.follow_symlinks:
            return True
        real = os.path.realpath(path)
        return real == str(self.real_root) or real.startswith(str(self.real_root) + os.sep)

    def _skip(self, split: str, path: Path, reason: str) -> None:
        self._skipped.append({"split": split, "source": str(path.relative_to(self.root)), "reason": reason})

    def splits(self) -> list[str]:
        return list(self._files)

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def load(self, split: str, index: int, encoding: Encoding) -> Encoded:
        data = (self.root / self._files[split][index]).read_bytes()
        return Encoded(*transcode_file(data, self.mode, encoding))

    def describe(self, split: str, index: int) -> str:
        return self._files[split][index]

    def skipped(self) -> list[dict]:
        return list(self._skipped)
