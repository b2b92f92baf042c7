"""Under a real torch.distributed process group (gloo, 2 CPU processes) each rank reads its own equal part."""

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.shards.shardset import ShardSet


def _rank_main(rank, world, root, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ss = ShardSet.open(root)
        for backend in ("stream", "indexed"):
            loader = ss.loader("train", backend=backend, batch_size=50, seed=11)  # rank and world from the group
            ids = np.concatenate([b.ids.numpy() for b in loader])
            np.save(f"{out_dir}/{backend}-{rank}.npy", ids)
    finally:
        dist.destroy_process_group()


def test_ranks_split_each_epoch_under_torch_distributed(synthetic_set, tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, str(synthetic_set.root), str(tmp_path / "init"), str(tmp_path)),
             nprocs=world, join=True)
    n = synthetic_set.count("train")
    for backend in ("stream", "indexed"):
        parts = [np.load(tmp_path / f"{backend}-{r}.npy") for r in range(world)]
        assert [len(p) for p in parts] == [n // world] * world
        assert not set(parts[0].tolist()) & set(parts[1].tolist())


SELECTIONS = {  # name: (selector, params): RCS in chunks spread over ranks, RCS in one chunk, facility, GreeDi
    "rcs-chunks": ("rcs", {"chunk_size": 400, "refreshes": 2}),
    "rcs-one-chunk": ("rcs", {"chunk_size": 0, "refreshes": 2}),
    "facility": ("facility", {"proxy": "gradients", "k": 10}),
    "facility-greedi": ("facility", {"proxy": "gradients", "k": 10, "partitions": 2}),  # a part per rank
}


def _select_main(rank, world, root, init_file, out_dir):
    import torch

    from pipeline.selectors.run import run_selection

    torch.set_num_threads(1)  # the same kernels in every process: bitwise-equal proxies
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, (selector, params) in SELECTIONS.items():
            m = run_selection(root, selector, 0.2, f"{out_dir}/{name}.json", arch="smallcnn", batch_size=64,
                              seed=3, params=params)
            np.save(f"{out_dir}/{name}-rank{rank}.npy", m.ids)  # every rank returns the manifest
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_distributed_selection_writes_the_manifest_of_one_process(digits_set, tmp_path):
    from pipeline.shards.manifest import Manifest

    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        mp.spawn(_select_main, args=(world, str(digits_set.root), str(tmp_path / f"init{world}"), str(out)),
                 nprocs=world, join=True)
    for name in SELECTIONS:
        one, two = Manifest.load(tmp_path / "world1" / f"{name}.json"), Manifest.load(tmp_path / "world2" / f"{name}.json")
        assert np.array_equal(one.ids, two.ids), name
        if one.weights is not None:
            assert np.array_equal(one.weights, two.weights), name
        assert two.extra["timing"]["processes"] == 2
        assert np.array_equal(np.load(tmp_path / "world2" / f"{name}-rank1.npy"), two.ids)


def test_background_rounds_in_two_processes_write_the_manifests_of_one(digits_set, tmp_path):
    from test_train import tiny_cfg

    from pipeline.shards.manifest import Manifest
    from pipeline.trainers import create_trainer

    runs = {}
    for n in (1, 2):
        run = tmp_path / f"p{n}"
        cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 2, "select.selector": "rcs", "select.fraction": 0.3,
                                               "select.warmup": 1, "select.every": 1, "select.sync": True,
                                               "select.processes": n, "select.params": "chunk_size=300,refreshes=2"})
        create_trainer(cfg, progress=False).fit()
        runs[n] = sorted((run / "manifests").glob("round-*.json"))
        assert not list((run / "snapshots").glob("*.group"))  # rendezvous files are cleaned up
    assert [p.name for p in runs[1]] == [p.name for p in runs[2]] and runs[1]
    for one, two in zip(runs[1], runs[2]):
        m1, m2 = Manifest.load(one), Manifest.load(two)
        assert np.array_equal(m1.ids, m2.ids) and m2.extra["timing"]["processes"] == 2


def test_pipeline_select_under_torchrun(digits_set, tmp_path):
    """The command line: `torchrun --nproc-per-node 2 -m pipeline select` writes what one process writes."""
    import os
    import shutil
    import subprocess
    import sys

    from pipeline.shards.manifest import Manifest

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    args = ["-m", "pipeline", "select", "--data", str(digits_set.root), "--selector", "facility", "--fraction", "0.2",
            "--arch", "smallcnn", "--device", "cpu", "--proxy", "gradients", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.json")], env=env, capture_output=True,
                         text=True, timeout=300)
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", *args, "--out",
                          str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert (two.stdout + two.stderr).count("selected 288") == 1  # rank 0 reports
    one, two = Manifest.load(tmp_path / "one.json"), Manifest.load(tmp_path / "two.json")
    # The same subset with the same weights. Not always in the same pick order: the ranks' k-NN blocks reach
    # BLAS in other shapes, similarities can differ in their last float32 bit, and two near-tied gains swap.
    assert dict(zip(one.ids.tolist(), one.weights.tolist())) == dict(zip(two.ids.tolist(), two.weights.tolist()))
    assert one.extra["objective"] == pytest.approx(two.extra["objective"], rel=1e-6)
