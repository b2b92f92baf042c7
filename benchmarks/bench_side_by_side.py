"""Does a trainer keep its share of the cores beside other torch processes?

Runs `pipeline train` (the demo's configuration: ACL, smallcnn, digits at 16 px) alone, then `--procs` copies of
it side by side, under each thread mode: `torch` (PIPELINE_THREADS=torch: torch's own defaults, OpenMP threads
that spin while they wait: the baseline, what every version before issue 40 did) and `auto` (the default since:
threads from the usable cores, OpenMP threads that sleep while they wait; pipeline.runtime.prepare_threads).
Reported per mode: images/s alone (median over epochs after the first), each side-by-side copy's images/s and
its ratio to alone. Issue 40's target: with 2 copies on 2 cores each keeps at least 0.4x (a fair share is 0.5x).

    python benchmarks/bench_side_by_side.py [--procs 2,4] [--epochs 3] [--modes torch,auto]

Time it with nothing else running: the question is how processes share the cores, so other work skews it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(mode: str) -> dict:
    """A mode is PIPELINE_THREADS's value, then any variables to set: `torch+GOMP_SPINCOUNT=10000`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PIPELINE_THREADS", "GOMP_SPINCOUNT")}
    name, *extra = mode.split("+")
    env["PIPELINE_THREADS"] = name
    env.update(e.split("=", 1) for e in extra)
    env["PIPELINE_LOG_EVERY"] = "0"
    return env


def _images_per_s(run: Path) -> float:
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    rates = [e["images"] / e["seconds"] for e in epochs[1:] or epochs]  # the first epoch pays the start
    return statistics.median(rates)


def _train(data: Path, out: Path, epochs: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", "configs/demo-digits.toml",
                             "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--overwrite",
                             "--set", "run.checkpoint_every=100"],
                            cwd=ROOT, env=_env(mode), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a trainer failed:\n{err[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="2", help="copies side by side, comma-separated (2,4)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--modes", default="torch,auto", help="PIPELINE_THREADS values, each with +VAR=VALUE to set")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    data = tmp / "digits-16"
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", "digits", "--image-size", "16", "--out", str(data)],
                   cwd=ROOT, check=True, capture_output=True)
    rows = []
    for mode in args.modes.split(","):
        t = time.time()
        _wait([_train(data, tmp / f"{mode}-alone", args.epochs, mode)])
        alone = _images_per_s(tmp / f"{mode}-alone")
        row = {"mode": mode, "alone_images_per_s": alone, "alone_wall_s": time.time() - t}
        for n in map(int, args.procs.split(",")):
            procs = [_train(data, tmp / f"{mode}-{n}-{i}", args.epochs, mode) for i in range(n)]
            t = time.time()
            _wait(procs)
            rates = [_images_per_s(tmp / f"{mode}-{n}-{i}") for i in range(n)]
            row[f"side_by_side_{n}"] = {"images_per_s": rates, "ratios": [r / alone for r in rates],
                                        "wall_s": time.time() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, {args.epochs} epochs of the demo's "
          "training (images/s: median over epochs after the first)\n")
    print("| mode | alone images/s | " + " | ".join(f"{n} side by side: images/s each (ratio to alone)"
                                                    for n in map(int, args.procs.split(","))) + " |")
    print("| --- | ---: | " + " | ".join("---" for _ in args.procs.split(",")) + " |")
    for row in rows:
        cells = []
        for n in map(int, args.procs.split(",")):
            s = row[f"side_by_side_{n}"]
            cells.append(", ".join(f"{r:,.0f} ({q:.2f}x)" for r, q in zip(s["images_per_s"], s["ratios"])))
        print(f"| {row['mode']} | {row['alone_images_per_s']:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
