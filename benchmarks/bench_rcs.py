"""`bench_select.py --mode rcs`: one RCS round against a full-pool ACL epoch of the same model."""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.shards.manifest import Manifest
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.shards.shardset import ShardSet
from pipeline.trainers import TrainConfig, create_trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _trainer(data, out, device, manifest=None):
    cfg = TrainConfig()
    settings = {"data.path": str(data), "run.out": str(out), "model.arch": "smallcnn", "model.head_width": 256,
                "model.proj_dim": 128, "data.batch_size": 128, "data.workers": 0, "optim.optimizer": "sgd",
                "optim.lr": 0.5, "optim.epochs": 10, "optim.warmup_epochs": 0, "run.device": device,
                "run.log_every": 0, "run.checkpoint_every": 0}
    if manifest:
        settings["data.manifest"] = str(manifest)
    for k, v in settings.items():
        cfg.set(k, v)
    return create_trainer(cfg, progress=False)


def _epoch_seconds_per_image(data, work, device, sample: Path) -> float:
    t = _trainer(data, work / f"epoch-{time.time_ns()}", device, sample)
    start = time.perf_counter()
    s = t.fit(stop_after=1)
    return (time.perf_counter() - start) / s["images"]


def _select(kwargs):
    import os

    from pipeline.runtime import tune_allocator
    from pipeline.selectors.run import run_selection

    if kwargs.pop("nice", 0):
        os.nice(10)
    torch.set_num_threads(kwargs.pop("threads"))
    tune_allocator()
    m = run_selection(**kwargs)
    return m.extra["timing"]


def rcs_rounds(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-rcs-"))
    pools = [int(p) for p in args.pools.split(",")]
    source = f"folder:{SHARED}" if SHARED.is_dir() else f"synthetic:{max(pools)}"
    prepare(source, PrepareOptions(out=work / "data", image_size=args.image_size, workers=2, progress=False))
    ss = ShardSet.open(work / "data")
    ids = ss.ids("train")
    # a snapshot with some training behind it: 20 steps of ACL on the first 2,560 images
    sample = Manifest.for_shardset(ss, "train", ids[:2560])
    sample.save(work / "sample.json")
    t = _trainer(work / "data", work / "warm", args.device, work / "sample.json")
    t.fit(stop_after=1)
    save_checkpoint(work / "snap.pt", t.snapshot(1))
    rows = []
    ctx = mp.get_context("spawn")
    for n in pools:
        pool = Manifest.for_shardset(ss, "train", ids[:n])
        pool.save(work / f"pool-{n}.json")
        per_image = _epoch_seconds_per_image(work / "data", work, args.device, work / "sample.json")
        kwargs = dict(data=str(work / "data"), selector="rcs", fraction=args.fraction, checkpoint=str(work / "snap.pt"),
                      pool=str(work / f"pool-{n}.json"), seed=0, device=args.device)
        alone = _select({**kwargs, "out": str(work / f"alone-{n}.json"), "threads": torch.get_num_threads()})
        # overlapped as the trainer runs it: the round in a background process (1 thread, nice 10) while the
        # foreground trains on the cores it leaves (pipeline.selectors.background.SelectionScheduler._share_cores)
        threads = torch.get_num_threads()
        with ProcessPoolExecutor(1, mp_context=ctx) as bg:
            job = bg.submit(_select, {**kwargs, "out": str(work / f"over-{n}.json"), "threads": 1, "nice": 1})
            torch.set_num_threads(max(1, threads - 1) if args.device == "cpu" else threads)
            trained, start = 0, time.perf_counter()
            while not job.done():
                t2 = _trainer(work / "data", work / f"ov-{n}-{trained}", args.device, work / "sample.json")
                trained += t2.fit(stop_after=1)["images"]
            over = job.result()
            train_s = time.perf_counter() - start
            torch.set_num_threads(threads)
        epoch_s = per_image * n
        rows.append({"pool": n, "fraction": args.fraction, "epoch_s": round(epoch_s, 1),
                     "round_alone_s": alone["total"], "proxies_s": alone["proxies"], "greedy_s": alone["greedy"],
                     "ratio_alone": round(alone["total"] / epoch_s, 3), "round_overlapped_s": over["total"],
                     "ratio_overlapped": round(over["total"] / epoch_s, 3),
                     "training_slowdown_overlapped": round((train_s / max(trained, 1)) / per_image, 3)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "select_rcs_round", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                      "device": args.device, "threads": torch.get_num_threads(), "image_size": args.image_size,
                      "data": source, "model": "smallcnn (head 256-256-128)", "rows": rows}))
    print(f"\n{'pool':>7s} {'epoch s':>8s} {'round s':>8s} {'x epoch':>8s} {'overlapped s':>13s} {'x epoch':>8s} "
          f"{'train slowdown':>15s}")
    for r in rows:
        print(f"{r['pool']:>7,d} {r['epoch_s']:>8.1f} {r['round_alone_s']:>8.1f} {r['ratio_alone']:>8.3f} "
              f"{r['round_overlapped_s']:>13.1f} {r['ratio_overlapped']:>8.3f} {r['training_slowdown_overlapped']:>15.2f}")
