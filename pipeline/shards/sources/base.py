"""The interface every source reader implements, and the array-backed base most of them share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from pipeline.shards.images import Encoding, encode_array


@dataclass
class Encoded:
    """One image ready for a shard: stored bytes, member extension, (height, width)."""

    data: bytes
    ext: str
    shape: tuple[int, int]


class Source(ABC):
    """A readable data set. Items are addressed by (split, index) in a fixed, deterministic order.

    Subclasses set `name`, `classes`, `mode` ("RGB" or "L") and `native_splits` (False when the data comes as
    one pool, so prepare holds out a test split itself); `unlabeled_splits` names splits that come without
    labels (STL-10's unlabeled images): their items' label is -1, and index.json marks them `labelled: false`.
    """

    name: str
    classes: list[str]
    mode: str
    native_splits: bool = True
    unlabeled_splits: frozenset = frozenset()

    @abstractmethod
    def splits(self) -> list[str]:
        """Split names in their canonical order (train first)."""

    @abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """int64 label of every item of `split`, in item order."""

    @abstractmethod
    def load(self, split: str, index: int, encoding: Encoding) -> Encoded:
        """Encoded image of one item; raises images.CorruptImage when it does not decode."""

    def describe(self, split: str, index: int) -> str:
        """Where an item comes from, for messages and `pipeline inspect`."""
        return f"{split}[{index}]"

    def prefetch(self, split: str, indices) -> None:
        """Read ahead the items `indices` of `split` that a prepare shard is about to load (a source read by blocks,
        parquet's row groups, reads each block once); nothing by default."""

    def skipped(self) -> list[dict]:
        """Source files the reader passed over while listing (not images), with the reason."""
        return []


class RowImages:
    """A split's images as rows of the release's files, batch by batch (no copy, no second array of the whole
    split); image i comes out as an HxW[xC] array through `decode(row)`. Stands in for ArraySource's array."""

    def __init__(self, batches: list[np.ndarray], decode):
        self.batches, self.decode = batches, decode
        self.starts = np.cumsum([0] + [len(b) for b in batches])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        b = int(np.searchsorted(self.starts, index, side="right")) - 1
        return np.ascontiguousarray(self.decode(self.batches[b][index - self.starts[b]]))


class ArraySource(Source):
    """A source whose images are already uint8 arrays in memory (CIFAR, MNIST, digits, synthetic)."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    def _set_split(self, split: str, images: np.ndarray, labels) -> None:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        self._images[split] = images
        self._labels[split] = labels

    def splits(self) -> list[str]:
        return list(self._images)

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def load(self, split: str, index: int, encoding: Encoding) -> Encoded:
        return Encoded(*encode_array(self._images[split][index], encoding.size))
