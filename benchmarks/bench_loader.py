"""Loader throughput: one-file-per-sample baseline vs shard streaming, indexed subsets and FFCV.

Same images, batch size and worker count for every row. The baseline is an ImageFolder-style loader (a torch
DataLoader whose dataset opens one JPEG per sample with PIL). Each loader runs one untimed warm-up epoch (warm
page cache, JIT compilation for ffcv), then `--epochs` timed ones. Prints one JSON line, then a table.

    python benchmarks/bench_loader.py [--data FOLDER] [--batch-size 256] [--workers 2] [--epochs 1]

Targets (issue 2): streaming >= 2x the baseline; a 10% subset read costs <= 15% of a full-split read.

At ImageNet size (issue 13): full-size JPEGs (`benchmarks/make_imagenet_like.py`), shards prepared at 256 px,
every loader delivering 224 px random-resized crops (shards: cropped while decoding; ffcv: its RRC decoder;
the per-file baseline: PIL decodes the whole photo, then crops the same boxes, as torchvision's ImageFolder +
RandomResizedCrop does); `--device cuda` moves every batch to the GPU (pinned memory) inside the timing.

    python benchmarks/bench_loader.py --data /tmp/inet --image-size 256 --crop 224 --subsets 0.05 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.shards.crops import RandomResizedCrop
from pipeline.shards.images import decode, resize_square
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.shards.shardset import ShardSet

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


class PerFileDataset(Dataset):
    """The baseline: list the class folders, open one image file per sample with PIL (and with `crop`, take a
    random-resized crop of the decoded photo, as ImageFolder + RandomResizedCrop)."""

    def __init__(self, root: Path, decoder: str = "pil", crop: int = 0, size: int | None = None):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
        self.decoder = decoder
        self.crop = RandomResizedCrop(crop) if crop else None
        self.size = size  # photos of varied sizes: shorter side to `size`, centre crop (Resize + CenterCrop)
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        path, label = self.items[k]
        if self.decoder == "simplejpeg":  # the decoder the shard loaders use: separates layout from decoder
            arr = decode(path.read_bytes(), "RGB", self.size).copy()
        else:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.crop is not None:
                    top, left, h, w = self.crop.boxes([img.height], [img.width], 0, self.epoch, [k])[0].tolist()
                    img = img.resize((self.crop.size,) * 2, Image.BILINEAR, box=(left, top, left + w, top + h))
                elif self.size is not None:
                    img = resize_square(img, self.size)
                arr = np.array(img)
        return torch.from_numpy(arr).permute(2, 0, 1), label


def _time_epochs(make_loader, epochs: int, device: str = "cpu") -> tuple[float, int]:
    """Build the loader once (as a trainer would for a selection round), warm it up, time `epochs` epochs
    (with the copy to `device` and a synchronisation at the end)."""
    loader = make_loader()
    for _ in loader:  # warm-up epoch
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images = batch[0]
            if device != "cpu" and images.device.type == "cpu":
                images = images.pin_memory().to(device, non_blocking=True)
            n += len(images)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, n


def synthetic_folder(root: Path, count: int) -> Path:
    from pipeline.shards.sources.synthetic import CLASSES, generate

    if (root / CLASSES[0]).is_dir():
        return root
    images, labels, _ = generate(count)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / CLASSES[label] / f"{i:06d}.jpg", quality=75)
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="Class-folder root (with train/); default: shared CIFAR-10")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench"), help="Where shard sets are written")
    ap.add_argument("--synthetic-count", type=int, default=20000, help="Images to generate when no data is found")
    ap.add_argument("--no-ffcv", action="store_true")
    ap.add_argument("--image-size", type=int, default=None, help="Prepare the shards at this size (ImageNet: 256)")
    ap.add_argument("--crop", type=int, default=0, help="Every loader delivers random-resized crops of this size")
    ap.add_argument("--subsets", default="0.10,0.01", help="Subset fractions read by index")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: batches are moved there inside the timing")
    ap.add_argument("--worker-kinds", default="process,thread",
                    help="Read the shard rows with workers of these kinds (process: DataLoader workers; thread)")
    args = ap.parse_args(argv)

    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if data is None:
        data = synthetic_folder(args.work / "synthetic-jpeg", args.synthetic_count)
        split_dir, name = data, "synthetic-jpeg"
    else:
        split_dir, name = (data / args.split if (data / args.split).is_dir() else data), data.name
    formats = ("wds",) if args.no_ffcv else ("wds", "ffcv")
    if "ffcv" in formats:
        from pipeline.shards import ffcv_io

        if not ffcv_io.available():
            print("ffcv not installed: FFCV row skipped", file=sys.stderr)
            formats = ("wds",)

    out = args.work / f"{name}-{args.split}"
    prep = prepare(f"folder:{split_dir}", PrepareOptions(out=out, formats=("wds",), workers=args.workers,
                                                         image_size=args.image_size, test_fraction=0.0,
                                                         overwrite=True, progress=False))
    if "ffcv" in formats:
        prepare(f"folder:{split_dir}", PrepareOptions(out=out, formats=formats, workers=args.workers,
                                                      image_size=args.image_size, test_fraction=0.0, progress=False))
    ss = ShardSet.open(out)
    n_total = ss.count("train")
    rng = np.random.default_rng(0)
    fractions = [float(f) for f in args.subsets.split(",")]
    subsets = {f: np.sort(rng.choice(ss.ids("train"), int(n_total * f), replace=False)) for f in fractions}
    crop = f"random-resized:{args.crop}" if args.crop else None
    common = dict(batch_size=args.batch_size, num_workers=args.workers, seed=0, crop=crop)
    dev = args.device

    rows = {}
    base = PerFileDataset(split_dir, crop=args.crop, size=args.image_size)
    rows["per-file PIL (baseline)"] = _time_epochs(
        lambda: DataLoader(base, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                           persistent_workers=args.workers > 0), args.epochs, dev)
    if not args.crop:
        fast = PerFileDataset(split_dir, decoder="simplejpeg", size=args.image_size)
        rows["per-file simplejpeg"] = _time_epochs(
            lambda: DataLoader(fast, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                               persistent_workers=args.workers > 0), args.epochs, dev)
    kinds = args.worker_kinds.split(",")
    if "process" not in kinds:
        ap.error("--worker-kinds: include process, the rows the others are compared with")
    for kind in kinds:
        tag = "" if kind == "process" else f" ({kind}s)"
        kw = dict(common, worker_kind=kind)
        rows[f"stream (shards){tag}"] = _time_epochs(lambda: ss.loader("train", backend="stream", **kw), args.epochs,
                                                     dev)
        rows[f"indexed, whole split{tag}"] = _time_epochs(lambda: ss.loader("train", backend="indexed", **kw),
                                                          args.epochs, dev)
        for f, ids in subsets.items():
            rows[f"indexed, {f:.0%} subset{tag}"] = _time_epochs(lambda ids=ids: ss.loader("train", ids, **kw),
                                                                 args.epochs, dev)
    if dev == "cuda":
        from pipeline.shards.device_decode import torchvision_decoder

        if torchvision_decoder(dev) is not None:
            rows["stream, decoded on the GPU"] = _time_epochs(
                lambda: ss.loader("train", backend="stream", device=dev, decode="device", **common), args.epochs, dev)
    if "ffcv" in formats:
        first = fractions[0]
        rows["ffcv, whole split"] = _time_epochs(lambda: ss.loader("train", backend="ffcv", **common), args.epochs, dev)
        rows[f"ffcv, {first:.0%} subset"] = _time_epochs(
            lambda: ss.loader("train", subsets[first], backend="ffcv", **common), args.epochs, dev)

    base_rate = rows["per-file PIL (baseline)"][1] / rows["per-file PIL (baseline)"][0]
    full_time = rows["stream (shards)"][0]
    table = []
    for label, (secs, n) in rows.items():
        table.append({"loader": label, "images": n, "seconds": round(secs, 3), "images_per_s": round(n / secs),
                      "vs_baseline": round(n / secs / base_rate, 2), "cost_vs_full_stream": round(secs / full_time, 3)})
    result = {
        "benchmark": "loader", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": torch.get_num_threads(), "data": str(split_dir), "images": n_total, "image_format": ss.index["image"],
        "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
        "prepare_images_per_s": round(prep.images_per_s),
        "stream_vs_baseline": round(rows["stream (shards)"][1] / rows["stream (shards)"][0] / base_rate, 2),
        "subset_cost_vs_full": {f"{f:.0%}": round(rows[f"indexed, {f:.0%} subset"][0] / full_time, 3)
                                for f in fractions},
        "crop": args.crop, "device": dev,
        "rows": table,
    }
    print(json.dumps(result))
    print(f"\n{n_total:,} images from {split_dir}, batch {args.batch_size}, {args.workers} workers; "
          f"prepare {result['prepare_images_per_s']:,} images/s")
    print(f"{'loader':36s} {'images/s':>10s} {'x baseline':>11s} {'time vs full':>13s}")
    for r in table:
        print(f"{r['loader']:36s} {r['images_per_s']:>10,d} {r['vs_baseline']:>11.2f} {r['cost_vs_full_stream']:>13.3f}")


if __name__ == "__main__":
    main()
