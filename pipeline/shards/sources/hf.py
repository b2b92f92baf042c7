"""`hf:PATH` - a Hugging Face data set as it lies on disk: a `save_to_disk` folder (Arrow files, memory-mapped) or
parquet files (a file, or a folder of them: the hub's `data/train-00000-of-00003.parquet` layout).

The image column is the one the features call `Image` (else the one of `{bytes, path}` structs); the label
column is the `ClassLabel` one (its names become the classes), else one named `label`; `hf:PATH#image=COL,
label=COL` names them. Image bytes are stored as they are (JPEG and PNG byte for byte, as `folder:` does). A
split whose labels are all -1 (the hub's "no label") is a split without labels. Splits: a DatasetDict's own;
parquet files by the split their name or folder begins with (train, test, validation/val); a validation split
is the test split where there is no test split (the hub's train/validation sets), else it keeps its name; one
Dataset or one file is `train`, and prepare holds out a test split. Needs pyarrow (`pip install -e '.[hf]'`).

Arrow files are memory-mapped: any image costs its own bytes. Parquet is read by row group: `prefetch` reads
the groups one prepare shard needs once each; a shuffled prepare therefore reads a group once per shard that
holds one of its rows (save_to_disk's Arrow avoids that for large sets).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.images import CorruptImage, Encoding, open_fully, transcode_file
from pipeline.shards.sources.base import Encoded, Source

SPLIT_WORDS = ("train", "test", "validation", "val", "valid")
VALIDATION = ("validation", "val", "valid")


def _split_names(raw: list[str]) -> dict[str, str]:
    """A data set's split names -> ours: its validation split is the test split when it has no test split of its
    own (the hub's train/validation sets); with both, each keeps its name (none is merged into another)."""
    out = {r: r for r in raw}
    if "test" not in raw:
        val = next((r for r in VALIDATION if r in raw), None)
        if val is not None:
            out[val] = "test"
    return out
LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PipelineError("hf:PATH needs pyarrow: pip install -e '.[hf]' (with torch==2.13.0)") from None
    return pa, pq


def _options(arg: str) -> tuple[Path, dict]:
    path, _, opts = arg.partition("#")
    named = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in ("image", "label") or not value:
            raise PipelineError(f"hf:{arg}: after '#' give image=COLUMN and/or label=COLUMN, e.g. hf:{path}#label=fine_label")
        named[key] = value
    return Path(path).expanduser(), named


class HfSource(Source):
    def __init__(self, arg: str | None):
        if not arg:
            raise PipelineError("hf: needs a path, e.g. hf:/data/cifar10-hf (a save_to_disk folder or parquet files)")
        self.pa, self.pq = _pyarrow()
        self.path, self.named = _options(arg)
        self.name = self.path.stem if self.path.suffix == ".parquet" else self.path.name
        self._tables: dict = {}  # split -> memory-mapped Arrow table (save_to_disk)
        self._parquet: dict = {}  # split -> (files, per-row file number, row group, row in group)
        self._ready: dict = {}  # (split, index) -> image bytes read ahead (`prefetch`)
        features = self._open()
        self._columns(features)
        self.classes, self._labels = self._read_labels(features)
        self.native_splits = set(self.splits()) != {"train"}
        self.unlabeled_splits = frozenset(s for s, lab in self._labels.items() if len(lab) and (lab == -1).all())
        self.mode = self._mode()

    # -- layout ------------------------------------------------------------------------------------------
    def _open(self) -> dict:
        p = self.path
        if not p.exists():
            raise PipelineError(f"{p}: no such file or folder (hf:PATH takes a save_to_disk folder or parquet files)")
        if (p / "dataset_dict.json").is_file():
            splits = self._json(p / "dataset_dict.json").get("splits")
            if (not isinstance(splits, list) or not splits
                    or not all(isinstance(x, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", x) for x in splits)):
                raise PipelineError(f"{p / 'dataset_dict.json'}: no list of split names (letters, digits, '-', '_'); "
                                    "save the data set again")
            features, names = {}, _split_names([str(s) for s in splits])
            for s in splits:
                features = self._arrow_split(names[str(s)], p / str(s)) or features
            return features
        if (p / "state.json").is_file():
            return self._arrow_split("train", p)
        files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
        if not files or any(f.suffix != ".parquet" for f in files):
            raise PipelineError(f"{p}: neither a save_to_disk folder (dataset_dict.json or state.json) nor parquet "
                                "files; give the folder `save_to_disk` wrote or the parquet files")
        by_split: dict[str, list[Path]] = {}
        for f in files:
            split = "train" if p.is_file() else self._split_of(f.relative_to(p))
            by_split.setdefault(split, []).append(f)
        names = _split_names(list(by_split))
        by_split = {names[s]: fs for s, fs in by_split.items()}
        features = {}
        for split, fs in by_split.items():
            features = self._parquet_split(split, fs) or features
        return features

    @staticmethod
    def _split_of(rel: Path) -> str:
        for part in (*rel.parent.parts, rel.name):
            word = part.split("-", 1)[0].split("_", 1)[0].split(".", 1)[0].lower()
            if word in SPLIT_WORDS:
                return word
        raise PipelineError(f"{rel}: cannot tell its split (its name or folder should begin with train, test or "
                            "validation); give one parquet file, or a folder laid out as the hub's data/")

    @staticmethod
    def _json(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path}: unreadable ({exc}); save the data set again") from None
        if not isinstance(data, dict):
            raise PipelineError(f"{path}: not a JSON object; save the data set again")
        return data

    def _arrow_split(self, split: str, folder: Path) -> dict:
        state = self._json(folder / "state.json")
        files = [d.get("filename") for d in state.get("_data_files", []) if isinstance(d, dict)]
        if not files or not all(isinstance(f, str) and "/" not in f and ".." not in f for f in files):
            raise PipelineError(f"{folder / 'state.json'}: no data files listed; save the data set again")
        parts = []
        for f in files:
            try:
                parts.append(self.pa.ipc.open_stream(self.pa.memory_map(str(folder / f))).read_all())
            except (OSError, self.pa.ArrowInvalid) as exc:
                raise PipelineError(f"{folder / f}: not an Arrow file of a saved data set ({exc})") from None
        self._tables[split] = self.pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        info = folder / "dataset_info.json"
        return (self._json(info).get("features") or {}) if info.is_file() else self._schema_features(parts[0].schema)

    def _parquet_split(self, split: str, files: list[Path]) -> dict:
        where, features = [], {}
        for n, f in enumerate(files):
            try:
                meta = self.pq.ParquetFile(f).metadata
            except (OSError, self.pa.ArrowInvalid) as exc:
                raise PipelineError(f"{f}: not a parquet file ({exc})") from None
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                where.append(np.stack([np.full(rows, n), np.full(rows, g), np.arange(rows)], 1))
            features = features or self._schema_features(self.pq.read_schema(f))
        self._parquet[split] = (files, np.concatenate(where) if where else np.zeros((0, 3), np.int64))
        return features

    @staticmethod
    def _schema_features(schema) -> dict:
        meta = (schema.metadata or {}).get(b"huggingface")
        try:
            return json.loads(meta)["info"]["features"] if meta else {}
        except (ValueError, KeyError, TypeError):
            return {}

    # -- columns -----------------------------------------------------------------------------------------
    def _schema(self):
        if self._tables:
            return next(iter(self._tables.values())).schema
        files = next(iter(self._parquet.values()))[0]
        return self.pq.read_schema(files[0])

    def _columns(self, features: dict) -> None:
        schema = self._schema()
        names = schema.names
        image = self.named.get("image") or next(
            (c for c, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"), None) or next(
            (f.name for f in schema if self.pa.types.is_struct(f.type)
             and {"bytes", "path"} <= {t.name for t in f.type}), None)
        label = self.named.get("label") or next(
            (c for c, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None) or next(
            (c for c in LABEL_NAMES if c in names), None)
        for what, col in (("image", image), ("label", label)):
            if col is None or col not in names:
                raise PipelineError(f"{self.path}: {'no' if col is None else 'no column'} {what} column"
                                    + (f" {col!r}" if col else "") + f" (columns: {', '.join(names)}); name it: "
                                    f"hf:{self.path}#{what}=COLUMN")
        self.image_column, self.label_column = image, label

    def _column(self, split: str, name: str) -> np.ndarray:
        if split in self._tables:
            return self._tables[split].column(name).to_numpy(zero_copy_only=False)
        files, _ = self._parquet[split]
        return np.concatenate([self.pq.read_table(f, columns=[name]).column(name).to_numpy(zero_copy_only=False)
                               for f in files]) if files else np.zeros(0)

    def _read_labels(self, features: dict) -> tuple[list[str], dict]:
        labels = {}
        for split in self.splits():
            values = self._column(split, self.label_column)
            if values.dtype.kind not in "iu" or (len(values) and values.min() < -1):
                raise PipelineError(f"{self.path}: split {split}: column {self.label_column!r} holds no class numbers "
                                    f"(dtype {values.dtype}); name the label column: hf:{self.path}#label=COLUMN")
            if len(values) and (values == -1).any() and not (values == -1).all():
                raise PipelineError(f"{self.path}: split {split}: some samples have label -1 (none) and some have "
                                    "one; keep the labelled ones in a split of their own")
            labels[split] = values.astype(np.int64)
        names = (features.get(self.label_column) or {}).get("names") if isinstance(features, dict) else None
        top = max((int(v.max()) for v in labels.values() if len(v)), default=-1)
        if isinstance(names, list) and len(names) > top and all(isinstance(n, str) for n in names):
            return list(names), labels
        return [str(i) for i in range(top + 1)], labels

    def _mode(self) -> str:
        split = next((s for s in self.splits() if len(self._labels[s])), None)
        if split is None:
            return "RGB"
        try:
            return "L" if open_fully(self._bytes(split, 0)).mode in ("L", "1", "LA", "I;16", "I") else "RGB"
        except CorruptImage:
            return "RGB"

    # -- Source ------------------------------------------------------------------------------------------
    def splits(self) -> list[str]:
        found = [*self._tables, *self._parquet]
        return sorted(found, key=lambda s: (s != "train", s != "test", s))

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def _cell(self, value, split: str, index: int) -> bytes:
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, (bytes, bytearray)):
            raise CorruptImage(f"{split}[{index}] holds no image bytes (a path only: save the data set with the "
                               "images embedded)")
        return bytes(data)

    def _bytes(self, split: str, index: int) -> bytes:
        if split in self._tables:
            return self._cell(self._tables[split].column(self.image_column)[index].as_py(), split, index)
        if (split, index) not in self._ready:
            self.prefetch(split, [index])
        return self._cell(self._ready.pop((split, index)), split, index)

    def prefetch(self, split: str, indices) -> None:
        """Read ahead the images of `indices` (one prepare shard's) from parquet, each row group once."""
        if split not in self._parquet:
            return
        files, where = self._parquet[split]
        indices = np.asarray(indices, dtype=np.int64)
        spots = where[indices]
        for n, g in sorted({(int(a), int(b)) for a, b in spots[:, :2]}):
            column = self.pq.ParquetFile(files[n]).read_row_group(g, columns=[self.image_column]).column(0)
            for index in indices[(spots[:, 0] == n) & (spots[:, 1] == g)].tolist():
                self._ready[(split, index)] = column[int(where[index, 2])].as_py()

    def load(self, split: str, index: int, encoding: Encoding) -> Encoded:
        return Encoded(*transcode_file(self._bytes(split, index), self.mode, encoding))

    def describe(self, split: str, index: int) -> str:
        return f"{self.path.name} {split}[{index}]"
