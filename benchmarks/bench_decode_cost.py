"""Where a 224 px random-resized crop's CPU time goes: the native reader's stages against ffcv's (issue 25, part 8).

Both decode the whole 256 px JPEG and resize the box (ffcv 1.0's RRC decoder: libjpeg-turbo with FASTDCT, then
OpenCV's INTER_AREA), so what differs is around the decode. Every row is CPU time (`time.process_time`, all
threads of the process) per image, so the figures do not depend on what else the machine runs:
- the native reader's stages one by one, in this process: read the members' bytes, draw the crop box
  (header + per-sample generator), decode, resample, and the whole `TaskReader.batches` call;
- ffcv's Loader with one thread, in this process (its own thread's CPU counted);
- what handing a batch from a loader worker to the trainer costs: a DataLoader worker that only returns a
  ready-made batch of the same shape, its CPU and the main process's per image.

    python benchmarks/make_imagenet_like.py /tmp/inet --classes 100 --train-per-class 20 --val-per-class 0
    python benchmarks/bench_decode_cost.py --data /tmp/inet [--images 2000] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.shards import ffcv_io
from pipeline.shards.crops import RandomResizedCrop, _resample
from pipeline.shards.images import jpeg_pixels
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.shards.reader import TaskReader
from pipeline.shards.shardset import ShardSet


def _cpu(fn, repeat: int = 1) -> float:
    """Best CPU seconds of `repeat` calls of fn()."""
    best = math.inf
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _each(fn, items) -> None:
    for x in items:
        fn(x)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Ready(IterableDataset):
    """A worker that returns `batches` copies of one ready batch: the cost of the hand-over alone."""

    def __init__(self, shape, batches):
        self.shape, self.batches = shape, batches

    def __iter__(self):
        ready = torch.zeros(self.shape, dtype=torch.uint8)
        for _ in range(self.batches):
            yield ready.clone()  # a new batch each time, as a reader makes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="An ImageNet-like folder (with train/)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    out = args.work / f"{args.data.name}-decode-cost"
    formats = ("wds", "ffcv") if ffcv_io.available() else ("wds",)
    if not (out / "index.json").is_file():
        prepare(f"folder:{args.data / 'train'}", PrepareOptions(out=out, formats=formats, workers=2,
                                                                image_size=args.image_size, test_fraction=0.0,
                                                                progress=False))
    ss = ShardSet.open(out)
    n = min(args.images, ss.count("train"))
    rows = np.arange(n)
    crop = RandomResizedCrop(args.crop)
    reader = TaskReader(ss, "train", None, args.batch_size, crop=crop, seed=0)
    table = reader.table
    blobs = [bytes(b) for b in reader.fetch(rows)]
    ids = table.ids[rows]

    headers = [simplejpeg.decode_jpeg_header(b) for b in blobs]
    dims = np.array([h[:2] for h in headers])
    boxes = [tuple(b) for b in crop.boxes(dims[:, 0], dims[:, 1], 0, 0, ids).tolist()]
    decoded = [jpeg_pixels(b, "RGB", False) for b in blobs]
    stages = {
        "read bytes (pread, page cache)": _cpu(lambda: reader.fetch(rows), args.repeat),
        "header": _cpu(lambda: [simplejpeg.decode_jpeg_header(b) for b in blobs], args.repeat),
        "crop boxes (one draw per task of a batch)": _cpu(
            lambda: [crop.boxes(dims[i:i + args.batch_size, 0], dims[i:i + args.batch_size, 1], 0, 0,
                                ids[i:i + args.batch_size]) for i in range(0, n, args.batch_size)], args.repeat),
        # each image's pixels dropped before the next decode, as the reader does (a list of them all would
        # count fresh pages for every image: 20% more)
        "decode (simplejpeg, whole image)": _cpu(lambda: _each(lambda b: jpeg_pixels(b, "RGB", False), blobs),
                                                 args.repeat),
        "decode (simplejpeg, fastdct)": _cpu(lambda: _each(lambda b: simplejpeg.decode_jpeg(b, fastdct=True), blobs),
                                             args.repeat),
        "resample (OpenCV)": _cpu(lambda: [_resample(p, bx, args.crop) for p, bx in zip(decoded, boxes)],
                                  args.repeat),
        "TaskReader.batches, all of it": _cpu(lambda: [None for _ in reader.batches(rows, 0)], args.repeat),
    }
    if "ffcv" in formats:
        loader = ss.loader("train", rows if n < ss.count("train") else None, backend="ffcv",
                           batch_size=args.batch_size, num_workers=1, seed=0, crop=f"random-resized:{args.crop}")
        for _ in loader:  # compile
            pass
        stages["ffcv Loader, 1 thread, all of it"] = _cpu(lambda: [None for _ in loader], args.repeat)

    batches = -(-n // args.batch_size)
    shape = (args.batch_size, 3, args.crop, args.crop)
    dl = DataLoader(_Ready(shape, batches), batch_size=None, num_workers=1)
    before_children, start = _children_cpu(), time.process_time()
    for _ in dl:
        pass
    main_cpu = time.process_time() - start
    del dl  # the worker exits: its CPU is counted in RUSAGE_CHILDREN
    time.sleep(0.5)
    worker_cpu = _children_cpu() - before_children
    made = _cpu(lambda: [torch.zeros(shape, dtype=torch.uint8).clone() for _ in range(batches)], 1)
    stages["hand-over: worker, less making the batch"] = max(0.0, worker_cpu - made)
    stages["hand-over: main process"] = main_cpu

    per_image = {k: round(v / n * 1e6, 1) for k, v in stages.items()}
    result = {"benchmark": "decode_cost", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "images": n, "crop": args.crop, "stored": args.image_size, "batch_size": args.batch_size,
              "cpu_us_per_image": per_image}
    print(json.dumps(result))
    print(f"\nCPU time per image, {n:,} images of {args.image_size} px to {args.crop} px crops")
    for k, v in per_image.items():
        print(f"{k:45s} {v:>9.1f} us")


if __name__ == "__main__":
    main()
