"""`TaskReader`: fetches planned rows of a split from its shards by byte offset (through the shard set's
store: a folder or a URL) and decodes them."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.shards.batch import Batch
from pipeline.shards.crops import RandomResizedCrop, decode_crop, task_boxes
from pipeline.shards.device_decode import encode_batch
from pipeline.shards.images import CorruptImage, decode


def read_rows(store, files, table, rows: np.ndarray, whole: np.ndarray | None = None,
              in_process: bool = False) -> list:
    """Image bytes of member-table rows, in the order of `rows`: one store read per shard touched, which
    merges neighbouring members into one range, or (`whole[shard]`: an epoch that reads nearly all of it, from
    a remote store) fetches the whole shard once for every worker."""
    out: list = [b""] * len(rows)
    shards = table.shard[rows]
    for s in np.unique(shards).tolist():
        mine = np.flatnonzero(shards == s)
        r = rows[mine]
        got = store.read_members(files[s], r - table.shard_starts[s], table.offsets[r], table.sizes[r],
                                 table.digests[r], whole=whole is not None and bool(whole[s]),
                                 in_process=in_process)
        for k, blob in zip(mine.tolist(), got):
            out[k] = blob
    return out


class TaskReader:
    """Reads and decodes planned tasks. Picklable: the store opens files or connections lazily in each process."""

    def __init__(self, shardset, split: str, image_size: int | None, batch_size: int,
                 row_weights: np.ndarray | None = None, crop: RandomResizedCrop | None = None, seed: int = 0,
                 encoded: bool = False, whole_shards: np.ndarray | None = None, in_process: bool = False):
        self.table = shardset.members(split)
        self.row_weights = row_weights  # float32 per member-table row, or None
        self.store, self.files = shardset.store, shardset.shard_files(split)
        self.mode, self.channels = shardset.mode, shardset.channels
        self.size = image_size
        self.stored_size = shardset.image_size
        self.batch_size = batch_size
        self.crop, self.seed = crop, seed  # a random-resized crop taken while decoding, seeded per sample
        self.encoded = encoded  # yield bytes and boxes (EncodedBatch) for decoding on the device
        self.whole_shards, self.in_process = whole_shards, in_process  # see `read_rows`

    def fetch(self, rows: np.ndarray) -> list:
        """Bytes of each row's image, in the order of `rows`."""
        return read_rows(self.store, self.files, self.table, rows, self.whole_shards, self.in_process)

    def _path_of(self, row: int):
        return self.store.where(self.files[int(self.table.shard[row])].name)

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
        draws = task_boxes(self.crop, blobs, self.seed, epoch, self.table.ids[rows]) if self.crop else None
        for k, blob in enumerate(blobs):
            try:
                if draws is not None:
                    images[k] = decode_crop(blob, self.mode, self.crop, draws[k])[0]
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
