"""Devices and torch.distributed (torchrun) set-up: who am I, how many are we, and agreeing on values."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; else the initialised process group; else a single process."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise PipelineError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device("cpu")


@dataclass
class DistContext:
    """This process's place in a torchrun job (a world of one without torchrun) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def agree(self, obj):
        """Rank 0's value, on every rank (which manifest to use, whether to stop)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor(1.0 if flag else 0.0, device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group when there is one (nccl on CUDA, gloo on CPU) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if (device_name != "cpu" and torch.cuda.is_available()) else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend)
    return DistContext(rank, world, local, resolve_device(device_name, local))


# --- collectives for work spread over ranks (selection): plain functions, a world of one needs no group ---------
def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` (first dimensions may differ), concatenated in rank order, on every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    import torch.distributed as dist

    dev = _comm_device()
    x_dev = x.to(dev).contiguous()
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(x)], dtype=torch.int64, device=dev))
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[:len(x)] = x_dev
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)


def gather_objects(obj) -> list:
    """Every rank's (small, project-made) object, in rank order, on every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
