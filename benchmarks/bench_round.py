"""What does a selection round cost against a full-pool epoch, with rows training recorded and without?

For each pool size: one ACL epoch on the whole pool with `select.proxies = recorded` (the trainer keeps every
sample's selection rows) and the same epoch without (the baseline: the cost of recording is the difference);
then a standalone `pipeline select --selector rcs` from that epoch's checkpoint, timed as a user sees it
(process start, imports, loading and the greedy: wall seconds of the whole command, median of `--repeats`),
with `--recorded` rows and with a fresh proxy pass (the baseline). Reported: each as a share of the full-pool
epoch without recording (target for recorded rounds: at most 0.1), and the recording overhead per epoch.
With `--arms E`: the CPU experiment's schedule (20% subsets, warm-up 1, a round every 2 epochs) trained for E
epochs with random subsets (the baseline), RCS from fresh proxies in background rounds, and RCS from recorded
rows in the trainer's process (`select.processes = 0`), or every selector as a user gets it (`--arm-names
rcs,facility,kcg,...`: select.proxies = auto): wall time of each against random's run beside it.

    python benchmarks/bench_round.py [--pools 10000,50000] [--fraction 0.2] [--repeats 3] [--epoch-repeats 1]
                                     [--image-size 16] [--arms 15 --arm-repeats 3 --arm-names rcs-recorded]
    python benchmarks/bench_round.py --pools 10000 --arms-only --arms 10 --arch smallcnn-wide --arm-repeats 3 \
                                     --arm-names rcs,facility,kcg          # the budget experiment's schedule

Data: ../shared/data/cifar10 (class folders) at `--image-size` px when present, else synthetic. One JSON line
per pool size, then a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.trainers import TrainConfig, create_trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _epoch(data: Path, out: Path, recorded: bool) -> float:
    """Seconds of one full-pool ACL epoch (the run selects with rcs, its first round due after the end)."""
    cfg = TrainConfig()
    settings = {"data.path": str(data), "run.out": str(out), "model.arch": "smallcnn", "model.head_width": 256,
                "model.proj_dim": 128, "data.batch_size": 128, "data.workers": 0, "optim.optimizer": "sgd",
                "optim.lr": 0.5, "optim.epochs": 1, "optim.warmup_epochs": 0, "run.device": "cpu", "run.log_every": 0,
                "run.checkpoint_every": 0, "acl.min_crop_scale": 0.2, "attack.steps": 5, "select.selector": "rcs",
                "select.warmup": 1, "select.proxies": "recorded" if recorded else "fresh"}
    for k, v in settings.items():
        cfg.set(k, v)
    with create_trainer(cfg, progress=False) as t:
        return float(t.fit()["seconds"])


def _arm(data: Path, out: Path, settings: dict, epochs: int, arch: str = "smallcnn", fraction: float = 0.2) -> dict:
    """Wall seconds of a whole training run on the CPU experiments' schedule (warm-up 1, a round every 2
    epochs, each used one epoch after its snapshot), selection included."""
    cfg = TrainConfig()
    base = {"data.path": str(data), "run.out": str(out), "model.arch": arch, "model.head_width": 256,
            "model.proj_dim": 128, "data.batch_size": 128, "data.workers": 0, "optim.optimizer": "sgd",
            "optim.lr": 0.5, "optim.epochs": epochs, "optim.warmup_epochs": 1, "run.device": "cpu",
            "run.checkpoint_every": 0, "attack.steps": 5, "select.fraction": fraction, "select.warmup": 1,
            "select.every": 2, "acl.min_crop_scale": 0.2}
    for k, v in {**base, **settings}.items():
        cfg.set(k, v)
    started = time.perf_counter()
    with create_trainer(cfg, progress=False) as t:
        t.fit()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - started,
            "stall_s": sum(r.get("stall_s") or 0 for r in recs if r["kind"] == "selection"),
            "rounds": sum(r["kind"] == "selection" for r in recs)}


ARMS = {"random": {"select.selector": "random"},
        "rcs-fresh": {"select.selector": "rcs", "select.proxies": "fresh"},
        "rcs-recorded": {"select.selector": "rcs", "select.proxies": "recorded", "select.processes": 0},
        # each selector as a user gets it (select.proxies = auto: recorded rows, rounds in the trainer's process)
        "rcs": {"select.selector": "rcs"}, "facility": {"select.selector": "facility"},
        "kcg": {"select.selector": "kcg"}, "easy": {"select.selector": "easy"},
        "alignment": {"select.selector": "alignment"},
        "facility-fresh": {"select.selector": "facility", "select.proxies": "fresh"}}


def _select(data: Path, run: Path, out: Path, fraction: float, recorded: bool, repeats: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipeline", "select", "--data", str(data), "--selector", "rcs", "--fraction",
           str(fraction), "--checkpoint", str(run / "checkpoints" / "last.pt"), "--pool",
           str(run / "selection" / "pool.json"), "--device", "cpu", "--out", str(out)]
    if recorded:
        cmd += ["--recorded", str(run / "snapshots" / "book.rows")]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    timing = json.loads(out.read_text())["timing"]
    return statistics.median(times), timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", default="10000,50000")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each standalone select (median)")
    ap.add_argument("--epoch-repeats", type=int, default=1, help="epochs with and without recording (median)")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--arms", type=int, default=0, help="also train the CPU experiment's random and rcs arms for "
                                                         "this many epochs on each pool and compare wall times")
    ap.add_argument("--arm-repeats", type=int, default=1, help="runs of every arm, alternated (the ratio per pair "
                                                              "and its median: this machine drifts by several %%)")
    ap.add_argument("--arm-names", default="rcs-fresh,rcs-recorded",
                    help=f"which of {', '.join(ARMS)} (random always)")
    ap.add_argument("--arms-only", action="store_true", help="only the arms (no epoch and standalone-round figures)")
    ap.add_argument("--arch", default="smallcnn", help="the arms' encoder (the budget experiment: smallcnn-wide)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-round-"))
    rows = []
    for pool in [int(p) for p in args.pools.split(",")]:
        data = work / f"data-{pool}"
        source = f"folder:{SHARED}" if SHARED.is_dir() else f"synthetic:{pool}"
        prepare(source, PrepareOptions(out=data, image_size=args.image_size, workers=2, progress=False,
                                       per_class={"train": pool // 10} if SHARED.is_dir() else {}))
        row = {"benchmark": "round_cost", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
               "data": source, "image_size": args.image_size, "pool": pool, "fraction": args.fraction,
               "arch": args.arch}
        if not args.arms_only:
            plains, recs = [], []
            for i in range(args.epoch_repeats):  # alternated, so that a drift of the machine's speed hits both
                plains.append(_epoch(data, work / f"plain-{pool}-{i}", recorded=False))
                recs.append(_epoch(data, work / f"rec-{pool}-{i}", recorded=True))
            plain, rec = statistics.median(plains), statistics.median(recs)
            run = work / f"rec-{pool}-0"
            fresh_s, fresh_t = _select(data, run, work / f"sel-fresh-{pool}" / "round-0001.json", args.fraction,
                                       False, args.repeats)
            rec_s, rec_t = _select(data, run, work / f"sel-rec-{pool}" / "round-0001.json", args.fraction, True,
                                   args.repeats)
            row.update({"epoch_s": plain, "epoch_recording_s": rec, "epochs_s": plains, "epochs_recording_s": recs,
                        "recording_overhead": rec / plain - 1, "round_fresh_s": fresh_s, "round_recorded_s": rec_s,
                        "round_fresh_share": fresh_s / plain, "round_recorded_share": rec_s / plain,
                        "recorded_vs_fresh": rec_s / fresh_s, "timing_fresh": fresh_t, "timing_recorded": rec_t,
                        "rows_bytes": (run / "snapshots" / "book.rows").stat().st_size})
        if args.arms:  # repeated in alternation: each repeat pairs every arm with the random arm run next to it
            names = ["random", *[a for a in args.arm_names.split(",") if a != "random"]]
            runs = [{name: _arm(data, work / f"arm-{name}-{pool}-{i}", ARMS[name], args.arms, args.arch,
                                args.fraction) for name in names} for i in range(args.arm_repeats)]
            row["arms"] = {name: {"wall_s": [r[name]["wall_s"] for r in runs],
                                  "vs_random": [r[name]["wall_s"] / r["random"]["wall_s"] for r in runs],
                                  "vs_random_median": statistics.median(r[name]["wall_s"] / r["random"]["wall_s"]
                                                                        for r in runs),
                                  "stall_s": [r[name]["stall_s"] for r in runs], "rounds": runs[0][name]["rounds"]}
                           for name in names}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'pool':>7} {'epoch s':>8} {'recording':>10} {'fresh round s':>14} {'/ epoch':>8} "
          f"{'recorded round s':>17} {'/ epoch':>8}")
    for r in rows:
        if "epoch_s" in r:
            print(f"{r['pool']:>7} {r['epoch_s']:>8.1f} {r['recording_overhead']:>+10.1%} {r['round_fresh_s']:>14.1f} "
                  f"{r['round_fresh_share']:>8.3f} {r['round_recorded_s']:>17.1f} {r['round_recorded_share']:>8.3f}")
        for name, a in r.get("arms", {}).items():
            walls = ", ".join(f"{w:.1f}" for w in a["wall_s"])
            ratios = ", ".join(f"{v:.3f}" for v in a["vs_random"])
            print(f"    arm {name}: {walls} s wall; x random per pair {ratios} (median {a['vs_random_median']:.3f}); "
                  f"{a['rounds']} rounds, stall {max(a['stall_s']):.1f} s at most")


if __name__ == "__main__":
    main()
