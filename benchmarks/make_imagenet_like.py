"""Write a synthetic ImageNet-like folder: full-size JPEGs of varied sizes and content, many classes.

    python benchmarks/make_imagenet_like.py OUT [--classes 1000] [--train-per-class 20] [--val-per-class 2]
                                                [--quality 90] [--workers 2] [--seed 0]

Layout as ImageNet's (OUT/train/nXXXXXXXX/*.JPEG, OUT/val/nXXXXXXXX/*.JPEG), so `pipeline prepare folder:OUT`
reads it like the real thing. Sizes follow ImageNet's train set roughly (sides 200-800 px, median near
500 x 375, a few portraits and squares); content is a smooth class-coloured field, random shapes and
high-frequency texture, so the JPEGs are about as large and as slow to decode as photographs (ImageNet's
mean file is about 110 KB). Nothing is downloaded; a seed fixes every pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): mostly landscape 4:3, some portrait and square, scaled around 500 px."""
    long_side = int(np.clip(rng.normal(500, 90), 200, 800))
    kind = rng.random()
    ratio = 4 / 3 if kind < 0.7 else (1.0 if kind < 0.85 else 3 / 4)
    if ratio >= 1:
        return long_side, max(150, int(long_side / ratio))
    return max(150, int(long_side * ratio)), long_side


def render(class_no: int, rng: np.random.Generator) -> np.ndarray:
    w, h = image_size(rng)
    palette = np.random.default_rng(class_no).uniform(30, 225, (3, 3))  # the class's three colours
    coarse = rng.uniform(0, 1, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    weights = field / np.maximum(field.sum(-1, keepdims=True), 1.0)
    base = weights @ palette  # each pixel a mix of the class's colours, varying smoothly
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(20, w // 2 + 21), y0 + rng.integers(20, h // 2 + 21)
        colour = tuple(int(c) for c in palette[int(rng.integers(3))] + rng.normal(0, 20, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    arr = np.asarray(img, np.float32)
    arr += rng.normal(0, rng.uniform(4, 14), arr.shape).astype(np.float32)  # texture: sensor-like noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def _write_class(args) -> int:
    out, split, class_no, count, quality, seed = args
    folder = Path(out) / split / f"n{class_no:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, class_no, 0 if split == "train" else 1])
    total = 0
    for i in range(count):
        path = folder / f"n{class_no:08d}_{i}.JPEG"
        data = simplejpeg.encode_jpeg(render(class_no, rng), quality=quality, colorspace="RGB")
        path.write_bytes(data)
        total += len(data)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--val-per-class", type=int, default=2)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if (args.out / "train").exists():
        sys.exit(f"{args.out / 'train'} exists: choose an empty OUT (nothing is overwritten)")
    jobs = [(str(args.out), split, c, n, args.quality, args.seed)
            for split, n in (("train", args.train_per_class), ("val", args.val_per_class)) if n > 0
            for c in range(args.classes)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        total = sum(pool.map(_write_class, jobs, chunksize=8))
    n = args.classes * (args.train_per_class + args.val_per_class)
    secs = time.perf_counter() - start
    print(json.dumps({"out": str(args.out), "images": n, "classes": args.classes, "mean_kb": round(total / n / 1024, 1),
                      "seconds": round(secs, 1)}))


if __name__ == "__main__":
    main()
