"""FFCV: the loader over a split's `.beton`, with the same batches as the others (`ffcv_write.py` writes them).

ffcv is an optional extra (`pip install 'pipeline[ffcv]'`, after its system libraries); `_ffcv` here is the
only place it is imported. Rows of a split's `.beton` follow the split's member table, so row r holds sample
`ids[r]`; the id is
stored too (field `id`) because ffcv batches do not say which samples they hold.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from pipeline.errors import DataError, PipelineError
from pipeline.shards.batch import Batch

INSTALL_HINT = ("ffcv is not installed: `apt-get install -y --no-install-recommends libturbojpeg0-dev libopencv-dev "
                "pkg-config`, then `pip install 'pipeline[ffcv]'` (or leave out the ffcv format)")


@contextmanager
def _torch_threads_kept():
    """ffcv sets torch's thread count to its worker count (to 1 on import, again for each Loader and epoch):
    in a trainer that would change the kernels and the speed of training (and make runs that import ffcv
    differ from runs that do not). The count is put back after every call into ffcv."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _ffcv():
    with _torch_threads_kept():
        try:
            import ffcv  # noqa: F401
        except ImportError as exc:
            raise PipelineError(INSTALL_HINT) from exc
        import ffcv.fields
        import ffcv.fields.decoders
        import ffcv.loader
        import ffcv.reader
        import ffcv.transforms
        import ffcv.writer

    return ffcv


def available() -> bool:
    try:
        _ffcv()
        return True
    except PipelineError:
        return False


def check_beton(path, rec: dict, ids: np.ndarray) -> None:
    """At open, cheaply: the file's size is the one index.json records, and its `id` field holds exactly the
    split's sample ids in row order (another split's file, or one cut short, is refused); `verify` checks the
    SHA-256 of every byte."""
    ff = _ffcv()
    refuse = "; prepare the FFCV files again (`pipeline prepare ... --formats wds,ffcv`) or use --backend indexed"
    if path.stat().st_size != rec.get("bytes"):
        raise DataError(f"{path}: {path.stat().st_size} bytes, index.json records {rec.get('bytes')}{refuse}")
    try:
        reader = ff.reader.Reader(str(path))
        stored = np.asarray(reader.metadata["f2"])
    except Exception as exc:  # noqa: BLE001  (ffcv raises many kinds for a damaged header)
        raise DataError(f"{path}: not a readable FFCV file ({type(exc).__name__}){refuse}") from None
    if len(stored) != len(ids) or not np.array_equal(stored, ids):
        raise DataError(f"{path}: its samples are not this split's ({len(stored)} rows for {len(ids)} ids, or other "
                        f"ids){refuse}")


class FfcvLoader:
    """ffcv's Loader over a split's `.beton`, yielding the same `Batch`es as the shard loaders."""

    def __init__(self, shardset, split: str, rows, *, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool, device, num_workers: int, image_size: int | None, rank: int, world_size: int,
                 row_weights: np.ndarray | None = None, crop=None):
        if not shardset.store.local:
            raise PipelineError(f"{shardset.root}: the ffcv loader reads a local .beton (memory-mapped); read a "
                                "remote set with data.backend = stream or indexed, or download it first")
        ff = _ffcv()
        self.table_ids, self.row_weights = shardset.members(split).ids, row_weights
        rec = shardset.index["splits"][split].get("beton")
        path = shardset.root / f"{split}.beton"
        if not rec or not path.is_file():
            raise PipelineError(f"{path}: missing; run `pipeline prepare SOURCE --out {shardset.root} --formats wds,ffcv`")
        check_beton(path, rec, self.table_ids)
        if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise PipelineError("the ffcv backend splits work across ranks only under torch.distributed")
        dec = ff.fields.decoders
        tr = ff.transforms
        size = image_size or shardset.image_size
        if crop is not None:  # ffcv's own crop-while-decoding (its boxes, drawn by its own generator)
            image_dec = dec.RandomResizedCropRGBImageDecoder((crop.size, crop.size), scale=crop.scale, ratio=crop.ratio)
        elif size == shardset.image_size:
            image_dec = dec.SimpleRGBImageDecoder()
        else:
            image_dec = dec.CenterCropRGBImageDecoder((size, size), ratio=1.0)
        self.device = torch.device(device)
        self.channels = shardset.channels
        pipelines = {
            "image": [image_dec, tr.ToTensor(), tr.ToTorchImage(channels_last=True)],
            "label": [dec.IntDecoder(), tr.ToTensor(), tr.Squeeze()],
            "id": [dec.IntDecoder(), tr.ToTensor(), tr.Squeeze()],
        }
        order = ff.loader.OrderOption.RANDOM if shuffle else ff.loader.OrderOption.SEQUENTIAL
        indices = None if rows is None else np.sort(np.asarray(rows))
        with _torch_threads_kept():
            self.loader = ff.loader.Loader(
                str(path), batch_size=batch_size, num_workers=max(1, num_workers), order=order, indices=indices,
                drop_last=drop_last, pipelines=pipelines, seed=seed, distributed=world_size > 1, os_cache=True,
            )

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self):
        with _torch_threads_kept():
            batches = iter(self.loader)
        for images, labels, ids in batches:
            if self.channels == 1:
                images = images[:, :1]
            ids = ids.long().reshape(-1)
            weights = None
            if self.row_weights is not None:  # ffcv batches say which ids they hold; the rows follow
                weights = torch.from_numpy(self.row_weights[np.searchsorted(self.table_ids, ids.cpu().numpy())])
            b = Batch(images, labels.long().reshape(-1), ids, weights)
            yield b if self.device.type == "cpu" else b.to(self.device)
