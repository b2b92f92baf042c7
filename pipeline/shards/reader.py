"""`TaskReader`: fetches planned rows of a split from its tar shards by byte offset and decodes them."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.shards.batch import Batch
from pipeline.shards.crops import RandomResizedCrop, crop_rng, decode_crop
from pipeline.shards.device_decode import encode_batch
from pipeline.shards.images import CorruptImage, decode

MERGE_GAP = 16 * 1024  # read across gaps up to this size: cheaper than another system call


class TaskReader:
    """Reads and decodes planned tasks. Picklable: file descriptors are opened lazily in each process."""

    def __init__(self, shardset, split: str, image_size: int | None, batch_size: int,
                 row_weights: np.ndarray | None = None, crop: RandomResizedCrop | None = None, seed: int = 0,
                 encoded: bool = False):
        self.table = shardset.members(split)
        self.row_weights = row_weights  # float32 per member-table row, or None
        self.paths = [str(shardset.shard_path(split, i)) for i in range(len(self.table.shard_starts) - 1)]
        self.mode, self.channels = shardset.mode, shardset.channels
        self.size = image_size
        self.stored_size = shardset.image_size
        self.batch_size = batch_size
        self.crop, self.seed = crop, seed  # a random-resized crop taken while decoding, seeded per sample
        self.encoded = encoded  # yield bytes and boxes (EncodedBatch) for decoding on the device
        self._fds: dict[int, int] = {}
        self._pid = None

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def fetch(self, rows: np.ndarray) -> list[bytes]:
        """Bytes of each row's image, in the order of `rows`."""
        t = self.table
        order = np.lexsort((t.offsets[rows], t.shard[rows]))
        out: list[bytes] = [b""] * len(rows)
        i = 0
        while i < len(order):
            j = i + 1
            shard = t.shard[rows[order[i]]]
            end = t.offsets[rows[order[i]]] + t.sizes[rows[order[i]]]
            while (j < len(order) and t.shard[rows[order[j]]] == shard
                   and t.offsets[rows[order[j]]] - end <= MERGE_GAP):
                end = max(end, t.offsets[rows[order[j]]] + t.sizes[rows[order[j]]])
                j += 1
            start = int(t.offsets[rows[order[i]]])
            buf = os.pread(self._fd(int(shard)), int(end) - start, start)
            if len(buf) != int(end) - start:
                raise PipelineError(f"{self.paths[int(shard)]}: truncated shard (short read at byte {start}); "
                                    "run `pipeline verify` and prepare the shard set again")
            view = memoryview(buf)
            for k in order[i:j]:
                o = int(t.offsets[rows[k]]) - start
                out[k] = view[o:o + int(t.sizes[rows[k]])]
            i = j
        return out

    def _path_of(self, row: int) -> str:
        return self.paths[int(self.table.shard[row])]

    def _slices(self, rows: np.ndarray):
        """(slice, labels, ids, weights) of each batch of a task: the task cut into batches."""
        labels = torch.from_numpy(self.table.labels[rows])
        ids = torch.from_numpy(self.table.ids[rows])
        weights = None if self.row_weights is None else torch.from_numpy(self.row_weights[rows])
        for i in range(0, len(rows), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield sl, labels[sl], ids[sl], None if weights is None else weights[sl]

    def batches(self, rows: np.ndarray, epoch: int = 0) -> Iterator[Batch]:
        blobs = self.fetch(rows)
        if self.encoded:
            yield from self._encoded(rows, blobs, epoch)
            return
        size = self.crop.size if self.crop else (self.size or self.stored_size)
        resize = self.size is not None and self.size != self.stored_size
        images = np.empty((len(rows), size, size, self.channels), dtype=np.uint8)
        for k, blob in enumerate(blobs):
            try:
                if self.crop is not None:
                    rng = crop_rng(self.seed, epoch, int(self.table.ids[rows[k]]))
                    images[k] = decode_crop(bytes(blob), self.mode, self.crop, rng)[0]
                else:
                    images[k] = decode(bytes(blob), self.mode, size if resize else None)
            except (CorruptImage, ValueError) as exc:
                sid = int(self.table.ids[rows[k]])
                raise PipelineError(f"{self._path_of(rows[k])}: sample {sid} does not decode "
                                    f"({exc}); run `pipeline verify` and prepare the shard set again") from exc
        images_t = torch.from_numpy(images).permute(0, 3, 1, 2)
        for sl, labels, ids, weights in self._slices(rows):
            yield Batch(images_t[sl], labels, ids, weights)

    def _encoded(self, rows: np.ndarray, blobs: list, epoch: int):
        for sl, labels, ids, weights in self._slices(rows):
            yield encode_batch(blobs[sl], labels, ids, weights, self.crop, self.seed, epoch,
                               lambda k, start=sl.start: self._path_of(rows[start + k]))
