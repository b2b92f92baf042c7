"""What does `pipeline index` move to index WebDataset shards, headers only, against reading every byte?

Writes a WebDataset set with the stock `webdataset.ShardWriter` (JPEGs of `--side` px with smooth content,
the size of ImageNet's JPEGs at the default, a `.cls` each), serves it on 127.0.0.1 with Range support (the
tests' server), and indexes it over HTTP: headers only (the default) and `--digests` (every byte: the baseline,
what a reader that streams whole shards moves). Reported: bytes read, reads, seconds, and the ratio of bytes
to the shards' size. A local folder's index is timed the same way.

    python benchmarks/bench_index.py [--samples 2000] [--side 400] [--per-shard 500]
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write_set(folder: Path, samples: int, side: int, per_shard: int) -> int:
    import webdataset as wds

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:side, 0:side * 5 // 4].astype(np.float32)
    with wds.ShardWriter(str(folder / "bench-train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(samples):
            f = rng.uniform(0.01, 0.08, 3)
            pix = np.stack([127 + 120 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + i) for c in range(3)], -1)
            pix += rng.normal(0, 12, pix.shape)
            buf = io.BytesIO()
            Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"s{i:07d}", "jpg": buf.getvalue(), "cls": i % 1000})
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--side", type=int, default=400)
    ap.add_argument("--per-shard", type=int, default=500)
    args = ap.parse_args()
    from servers import RangeServer

    from pipeline.shards.wds_index import index_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = write_set(tmp / "www" / "set", args.samples, args.side, args.per_shard)
        shards = len(list((tmp / "www" / "set").glob("*.tar")))
        print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}; "
              f"{args.samples} samples, {args.side} px JPEGs, {total / args.samples / 1024:.0f} KiB a sample, "
              f"{shards} shards, {total / 2**20:.1f} MiB")
        print("| where | mode | bytes read | of the shards | reads | seconds |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        with RangeServer(tmp / "www") as srv:
            pattern = f"{srv.url}/set/bench-train-{{000000..{shards - 1:06d}}}.tar"
            for digests in (True, False):
                started = time.perf_counter()
                r = index_shards(pattern, out=tmp / f"idx-{digests}", digests=digests, progress=False)
                took = time.perf_counter() - started
                print(f"| HTTP | {'every byte (--digests, baseline)' if digests else 'headers'} | "
                      f"{r.bytes_read:,} | {r.bytes_read / total:.3f} | {r.requests:,} | {took:.2f} |")
        for digests in (True, False):
            started = time.perf_counter()
            r = index_shards(str(tmp / "www" / "set"), out=tmp / f"local-{digests}", digests=digests,
                             progress=False)
            took = time.perf_counter() - started
            print(f"| folder | {'every byte (--digests, baseline)' if digests else 'headers'} | "
                  f"{r.bytes_read:,} | {r.bytes_read / total:.3f} | {r.requests:,} | {took:.2f} |")


if __name__ == "__main__":
    main()
