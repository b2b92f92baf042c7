"""Remote shard sets: images/s and bytes transferred from loopback S3 (moto) and HTTP, against local files.

One shard set, read three ways with the same loader settings: from its folder (the baseline), from an HTTP
server with Range support, and from moto's S3 API (both on 127.0.0.1, started here; the S3 bytes and requests
are counted by a TCP proxy in front of it, HTTP headers included). For each: one epoch of the whole split with
no cache (thread workers share each shard in memory) and one with an empty cache (worker processes share
each shard through it), one of a random `--fraction` subset with no cache (what the network carries), then
the subset again with a cache (what a second epoch of a subset that fits costs). Bytes are reported as a share
of the split's shard bytes. Targets (issue 39): a whole-split epoch at most 2 requests per shard and 1.05x the
bytes; a 10% subset at most 15% of the bytes. Every remote epoch's order is checked against the local one's,
and the shuffle's quality is stated: the rank correlation of the delivery order with the storage order, and
the mean displacement against a uniform permutation's (n/3).

    python benchmarks/bench_remote.py [--data FOLDER] [--per-class 1000] [--image-size 256 --crop 224]

CIFAR: the shared 32 px JPEGs (default). ImageNet-like: `benchmarks/make_imagenet_like.py OUT`, then
`--data OUT --image-size 256 --crop 224`. Loopback has no latency worth the name: these rows measure the
cost of the protocol and of the client, not of a WAN.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import FaultyProxy, RangeServer, moto_s3  # noqa: E402  (the tests' loopback servers)

from pipeline.shards.prepare import PrepareOptions, prepare  # noqa: E402
from pipeline.shards.shardset import ShardSet  # noqa: E402
from pipeline.shards.storage import ReadOptions  # noqa: E402
from pipeline.shards.upload import upload  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"


def _epoch(ss, ids, args, kind="auto") -> tuple[float, np.ndarray]:
    crop = f"random-resized:{args.crop}" if args.crop else None
    loader = ss.loader("train", ids, batch_size=args.batch_size, num_workers=args.workers, seed=0, crop=crop,
                       worker_kind=kind)
    order, start = [], time.perf_counter()
    for batch in loader:
        order.append(batch.ids.numpy())
    return time.perf_counter() - start, np.concatenate(order)


def shuffle_quality(order: np.ndarray, storage: np.ndarray) -> dict:
    """How far an epoch's order is from the storage order: Spearman's rank correlation (a uniform permutation:
    about 0) and the mean displacement as a share of a uniform permutation's (n/3; about 1)."""
    pos = np.searchsorted(storage, order)  # storage position of each delivered sample (ids increase in storage)
    n = len(order)
    rho = float(np.corrcoef(np.arange(n), pos)[0, 1])
    return {"spearman_vs_storage": round(rho, 4),
            "displacement_vs_uniform": round(float(np.abs(pos - np.arange(n)).mean() / (n / 3)), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Class-folder root of the images")
    ap.add_argument("--per-class", type=int, default=1000, help="Images of each class to prepare (0: all)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--crop", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline-bench-remote"))
    args = ap.parse_args(argv)

    out = args.work / "set"
    per_class = {"train": args.per_class} if args.per_class else {}
    prepare(f"folder:{args.data}", PrepareOptions(out=out, image_size=args.image_size, shard_size=args.shard_size,
                                                  workers=args.workers, test_fraction=0.0, per_class=per_class,
                                                  overwrite=True, progress=False))
    local = ShardSet.open(out)
    set_bytes = sum(r["bytes"] for r in local.index["splits"]["train"]["shards"])
    n_shards = len(local.index["splits"]["train"]["shards"])
    ids = np.sort(np.random.default_rng(0).choice(local.ids("train"), int(args.fraction * local.count("train")),
                                                  replace=False))
    cache = Path(tempfile.mkdtemp(prefix="bench-remote-cache-"))
    no_cache = ReadOptions(cache_limit="0")
    cold = "cold"  # an empty cache
    warm = "warm"  # a cache filled by one epoch first
    rows, orders = [], {}
    pct = f"{args.fraction:.0%}"
    readings = (("whole split", None, no_cache, "auto"), ("whole split, empty cache, processes", None, cold, "process"),
                (f"{pct} subset", ids, no_cache, "auto"), (f"{pct} subset, cache filled", ids, warm, "auto"))

    def measure(transport, opener, counter, requests=lambda: None):
        for label, subset, opts, kind in readings:
            if opts in (cold, warm):
                shutil.rmtree(cache, ignore_errors=True)
                fill, opts = opts == warm, ReadOptions(cache_dir=str(cache), cache_limit="10GB")
                if fill:
                    _epoch(opener(opts), subset, args)
            ss = opener(opts)
            ss.members("train")  # the member tables are read once per opening, not per epoch
            before, asked = counter(), requests()
            secs, order = _epoch(ss, subset, args, kind)
            moved = counter() - before
            asked = None if asked is None else requests() - asked
            if label in orders:
                assert np.array_equal(order, orders[label]), f"{transport} {label}: not the local order"
            orders.setdefault(label, order)
            n = len(order)
            rows.append({"transport": transport, "read": label, "images": n, "seconds": round(secs, 3),
                         "images_per_s": round(n / secs), "bytes": moved, "requests": asked,
                         "requests_per_shard": None if asked is None else round(asked / n_shards, 2),
                         "bytes_vs_set": round(moved / set_bytes, 4) if moved is not None else None})

    measure("local folder (baseline)", lambda o: ShardSet.open(out, o), lambda: 0)
    with RangeServer(out) as srv:
        measure("HTTP (loopback)", lambda o: ShardSet.open(srv.url, o), lambda: srv.bytes_sent, lambda: srv.requests)
    with moto_s3() as (host, port):
        upload(out, "s3://shards/bench", progress=False)
        with FaultyProxy((host, port)) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            measure("S3 (moto, loopback)", lambda o: ShardSet.open("s3://shards/bench", o),
                    lambda: proxy.bytes_back, lambda: proxy.requests)
    shutil.rmtree(cache, ignore_errors=True)

    base = {r["read"]: r["images_per_s"] for r in rows if r["transport"].startswith("local")}
    for r in rows:
        r["vs_local"] = round(r["images_per_s"] / base[r["read"]], 3)
    result = {"benchmark": "remote", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "data": str(args.data),
              "images": local.count("train"), "set_bytes": set_bytes, "image_size": args.image_size,
              "crop": args.crop, "fraction": args.fraction, "batch_size": args.batch_size,
              "workers": args.workers, "shard_size": args.shard_size, "shards": n_shards,
              "shuffle": shuffle_quality(orders["whole split"], local.ids("train")), "rows": rows}
    print(json.dumps(result))
    print(f"\n{local.count('train'):,} images, {set_bytes / 1e6:,.1f} MB in {n_shards} shards; batch "
          f"{args.batch_size}, {args.workers} workers; whole-split order (the same from every transport): "
          f"{result['shuffle']}")
    print(f"{'transport':24s} {'read':38s} {'images/s':>9s} {'x local':>8s} {'MB moved':>9s} {'of set':>7s} "
          f"{'requests':>9s} {'per shard':>9s}")
    for r in rows:
        asked = ("", "") if r["requests"] is None else (r["requests"], r["requests_per_shard"])
        print(f"{r['transport']:24s} {r['read']:38s} {r['images_per_s']:>9,d} {r['vs_local']:>8.2f} "
              f"{r['bytes'] / 1e6:>9.2f} {r['bytes_vs_set']:>7.1%} {asked[0]:>9} {asked[1]:>9}")


if __name__ == "__main__":
    main()
