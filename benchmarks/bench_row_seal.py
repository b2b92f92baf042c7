"""What sealing a book of recorded rows costs (issue 39): the book saved with every checkpoint, plain (the
arrays one after another, the baseline) against sealed (the same, hashed on the way, then the seal).

    python benchmarks/bench_row_seal.py [--pool 10000 --slots 2 --rows 4 --feat 256 --grad 128 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.selectors.recorded import _write_sealed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("pool", 10000), ("slots", 2), ("rows", 4), ("feat", 256), ("grad", 128), ("repeats", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    arrays = (np.arange(a.pool, dtype=np.int64),
              rng.random((a.pool, a.slots, a.rows, a.feat), dtype=np.float32).astype(np.float16),
              rng.random((a.pool, a.slots, a.rows, a.grad), dtype=np.float32),
              np.ones((a.pool, a.slots), np.int64), np.array(["n", "a"] * (a.rows // 2), dtype=np.str_),
              np.full(a.pool, a.slots, np.int64))
    folder = tempfile.mkdtemp()

    def plain(path):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for arr in arrays:
                np.save(f, arr, allow_pickle=False)

    medians = {}
    for name, write in (("plain", plain), ("sealed", lambda p: _write_sealed(p, arrays, "fingerprint"))):
        path = os.path.join(folder, f"{name}.rows")
        times = []
        for _ in range(a.repeats):
            started = time.perf_counter()
            write(path)
            times.append(time.perf_counter() - started)
        medians[name] = float(np.median(times))
        print(f"{name}: median {medians[name]:.3f} s (min {min(times):.3f}, max {max(times):.3f}), "
              f"{os.path.getsize(path) / 1e6:.0f} MB")
    print(f"sealed / plain: {medians['sealed'] / medians['plain']:.2f}x, "
          f"+{medians['sealed'] - medians['plain']:.3f} s per save")


if __name__ == "__main__":
    main()
