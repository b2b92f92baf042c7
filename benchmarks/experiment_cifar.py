"""The experiment that says whether selection works: ACL on full data vs subsets chosen by random, rcs and
facility, at two fractions; SLF clean and PGD-20 accuracy and wall time for each.

Runs the real commands (printed, so any arm can be rerun by hand) on a fixed, class-balanced subset of
CIFAR-10 from ../shared/data (symlinks in --work; nothing is copied into the repository). Schedule of the
selection arms, as in the paper: full data for --warmup epochs, then a new subset every --every epochs,
selected in the background (overlapped) from the current model.

    python benchmarks/experiment_cifar.py [--train-per-class 200] [--epochs 8] [--fractions 0.1,0.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def sh(cmd: list, log) -> float:
    print("$", " ".join(map(str, cmd)), flush=True)
    log.write("$ " + " ".join(map(str, cmd)) + "\n")
    start = time.perf_counter()
    subprocess.run(list(map(str, cmd)), check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def build_subset(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cdir in sorted((src / split).iterdir()):
            out = dst / split / cdir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cdir.iterdir())[:n]:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline-experiment"))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--fractions", default="0.1,0.2")
    ap.add_argument("--selectors", default="random,rcs,facility")
    ap.add_argument("--slf-epochs", type=int, default=10)
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        sys.exit(f"{args.data}: CIFAR-10 class folders not found (see ../shared/data/cifar10/SOURCE.txt)")

    py = [sys.executable, "-m", "pipeline"]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "commands.log", "a")
    folder = build_subset(args.data, work / "cifar10-subset", args.train_per_class, args.test_per_class)
    shards = work / "shards"
    sh(py + ["prepare", f"folder:{folder}", "--out", shards, "--workers", "2"], log)
    common = ["--data", shards, "--arch", "smallcnn", "--epochs", args.epochs, "--batch-size", 128,
              "--optimizer", "sgd", "--lr", 0.5, "--workers", 0, "--set", "optim.warmup_epochs=1",
              "--set", "model.head_width=256", "--set", "model.proj_dim=128", "--set", "run.checkpoint_every=0",
              "--overwrite"]
    arms = [("full", 1.0, [])]
    for sel in args.selectors.split(","):
        for f in map(float, args.fractions.split(",")):
            arms.append((sel, f, ["--selector", sel, "--fraction", f, "--warmup", args.warmup,
                                  "--select-every", args.every]))
    results = []
    for name, fraction, extra in arms:
        run = work / "runs" / f"{name}-{fraction:g}"
        train_s = sh(py + ["train", *common, "--out", run, *extra], log)
        eval_s = sh(py + ["eval", "--data", shards, "--checkpoint", run / "checkpoints" / "last.pt", "--protocol", "slf",
                          "--epochs", args.slf_epochs, "--lr", 0.1, "--batch-size", 128, "--device", "cpu"], log)
        by_ckpt = json.loads((run / "results.json").read_text())
        res = next(e["slf-pgd20"] for e in by_ckpt.values() if e["checkpoint"].endswith("last.pt"))
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in recs if r["kind"] == "epoch"]
        rounds = [r for r in recs if r["kind"] == "selection"]
        row = {"arm": name, "fraction": fraction, "clean": res["clean"], "pgd20": res["pgd20"],
               "train_wall_s": round(train_s, 1), "epoch_s": round(sum(e["seconds"] for e in epochs), 1),
               "images_seen": sum(e["images"] for e in epochs), "eval_s": round(eval_s, 1),
               "selection_s": round(sum(r["selection_s"] or 0 for r in rounds), 1),
               "stall_s": round(sum(r["stall_s"] for r in rounds), 2), "rounds": len(rounds),
               "full_epoch_s": round(epochs[0]["seconds"], 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({"experiment": "cifar10-subset", "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {
        "data": str(args.data), "work": str(args.work)}, "results": results}, default=str))
    print(f"\n{'arm':10s} {'frac':>5s} {'clean':>7s} {'pgd20':>7s} {'train s':>8s} {'images':>8s} {'select s':>9s} {'stall s':>8s}")
    for r in results:
        print(f"{r['arm']:10s} {r['fraction']:>5g} {r['clean']:>7.2%} {r['pgd20']:>7.2%} {r['train_wall_s']:>8.0f} "
              f"{r['images_seen']:>8,d} {r['selection_s']:>9.1f} {r['stall_s']:>8.2f}")


if __name__ == "__main__":
    main()
