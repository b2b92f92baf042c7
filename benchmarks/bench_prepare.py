"""Prepare throughput at ImageNet size: `pipeline prepare --image-size 256` against a plain PIL conversion.

Baseline (same images, same number of processes): what a one-off script does to shrink ImageNet, per file
`PIL.Image.open` + `convert("RGB")` (every pixel decoded) + shorter side to 256 and a centre crop (the same
`resize_square`) + `save(JPEG, quality)` into one file per image. Ours: the whole `prepare` (DCT-scaled decode,
the same resize, libjpeg-turbo encode, tar shards, offset indexes, SHA-256, index.json).

    python benchmarks/make_imagenet_like.py /tmp/inet --classes 100 --train-per-class 50 --val-per-class 0
    python benchmarks/bench_prepare.py --data /tmp/inet [--workers 2] [--image-size 256] [--quality 90]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from pipeline.shards.images import resize_square
from pipeline.shards.prepare import PrepareOptions, prepare


def _pil_one(args) -> int:
    src, dst, size, quality = args
    with Image.open(src) as img:
        out = resize_square(img.convert("RGB"), size)
    out.save(dst, format="JPEG", quality=quality)
    return 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="ImageNet-style folder (with train/)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench-prepare"))
    args = ap.parse_args(argv)
    files = sorted((args.data / "train").glob("*/*"))
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "pil").mkdir(parents=True)
    jobs = [(str(f), str(args.work / "pil" / f"{i}.jpg"), args.image_size, args.quality) for i, f in enumerate(files)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        n_pil = sum(pool.map(_pil_one, jobs, chunksize=64))
    pil_s = time.perf_counter() - start
    start = time.perf_counter()
    result = prepare(f"folder:{args.data / 'train'}", PrepareOptions(
        out=args.work / "shards", image_size=args.image_size, jpeg_quality=args.quality, workers=args.workers,
        test_fraction=0.0, progress=False, shard_size=1000))
    ours_s = time.perf_counter() - start
    rows = [{"path": "per-file PIL (baseline)", "images": n_pil, "seconds": round(pil_s, 2),
             "images_per_s": round(n_pil / pil_s, 1)},
            {"path": "pipeline prepare", "images": result.written, "seconds": round(ours_s, 2),
             "images_per_s": round(result.written / ours_s, 1)}]
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(json.dumps({"benchmark": "prepare", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                      "workers": args.workers, "image_size": args.image_size, "quality": args.quality,
                      "ratio_vs_baseline": round(ratio, 2), "rows": rows}))
    print(f"\n{len(files):,} JPEGs from {args.data / 'train'}, {args.workers} processes, to {args.image_size} px")
    print(f"{'path':26s} {'images/s':>9s} {'per process':>12s} {'x baseline':>11s}")
    for r in rows:
        print(f"{r['path']:26s} {r['images_per_s']:>9.1f} {r['images_per_s'] / args.workers:>12.1f} "
              f"{r['images_per_s'] / rows[0]['images_per_s']:>11.2f}")


if __name__ == "__main__":
    main()
