"""FFCV: `<split>.beton` files written from a shard set (rows in the order of the split's member table)."""

from __future__ import annotations

import numpy as np

from pipeline.atomic import atomic_path, write_json
from pipeline.errors import PipelineError
from pipeline.progress import console
from pipeline.shards import layout
from pipeline.shards.layout import file_sha256
from pipeline.shards.ffcv_io import _ffcv
from pipeline.shards.reader import TaskReader
from pipeline.shards.shardset import ShardSet


class _SplitRows:
    """Indexed view of a split for ffcv's writer: row -> (HxWx3 uint8 image, label, id)."""

    def __init__(self, shardset: ShardSet, split: str):
        self.reader = TaskReader(shardset, split, None, 1)
        self.table = shardset.members(split)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int):
        (batch,) = self.reader.batches(np.array([row]))
        img = batch.images[0].permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)  # ffcv's image field is RGB; grey sets read back channel 0
        return np.ascontiguousarray(img), int(self.table.labels[row]), int(self.table.ids[row])


def write_betons(out, workers: int = 1, progress: bool = True) -> dict:
    """Write `<split>.beton` for every split that lacks an intact one; record them in index.json."""
    ff = _ffcv()
    shardset = ShardSet.open(out)
    if shardset.image_size is None:
        raise PipelineError(f"{out}: images vary in size; prepare with --image-size N to write FFCV files")
    index = shardset.index
    for split in shardset.splits:
        info = index["splits"][split]
        path = shardset.root / f"{split}.beton"
        rec = info.get("beton")
        if rec and path.is_file() and path.stat().st_size == rec["bytes"] and rec.get("sha256") == file_sha256(path):
            continue
        console.print(f"writing {path.name} ({info['count']} images)")
        small = shardset.image_size <= 64
        fields = {
            # Small images stay raw (exact pixels); large ones are JPEG-compressed, as ffcv-imagenet does.
            "image": ff.fields.RGBImageField(write_mode="raw" if small else "jpg", max_resolution=shardset.image_size),
            "label": ff.fields.IntField(),
            "id": ff.fields.IntField(),
        }
        with atomic_path(path) as tmp:
            # ffcv's smallest page (2 MiB) keeps small sets small; a page must hold the largest sample.
            page = 2 << 20 if small else 8 << 20
            writer = ff.writer.DatasetWriter(str(tmp), fields, num_workers=max(1, workers), page_size=page)
            writer.from_indexed_dataset(_SplitRows(shardset, split), chunksize=256)
        info["beton"] = {"file": path.name, "count": info["count"], "bytes": path.stat().st_size,
                         "sha256": file_sha256(path)}
    write_json(shardset.root / layout.INDEX_NAME, index)
    return index
