"""Under a real torch.distributed process group (gloo, 2 CPU processes) each rank reads its own equal part."""

import numpy as np
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
