"""Loaders that stream a split, or a subset of it, to a device as batches of (images, labels, ids).

One reader, two planners. A plan is the epoch's list of read tasks, each an array of member-table rows in
output order. The reader fetches a task's rows with as few reads as it can (neighbouring members in one
`pread`), decodes them and cuts the task into batches.
- `stream`: the whole split (or a subset) in storage order: shards in a seeded random order, each started at
  a random rotation, read in long sequential runs; samples are shuffled within windows of `window` batches
  (read as smaller tasks on a split too small for MIN_TASKS tasks an epoch). Shards were shuffled when
  prepared, so windows are well mixed. From a remote store each shard the epoch reads (nearly) all of is
  fetched whole, in one request, once for all the workers (`whole_shards`): the order is the same as locally.
- `indexed`: a seeded full permutation; each batch reads only its own members by offset, so the cost of a
  subset grows with the subset, not with the split.
- `ffcv`: the split's `.beton` through ffcv's Loader (`indices=` for subsets), when installed.
Under torch.distributed every rank plans the same epoch and takes its own equal, disjoint slice.
Images arrive NCHW uint8 (memory laid out channels_last); the trainer converts and augments on the device.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.dist import rank_and_world
from pipeline.errors import PipelineError
from pipeline.runtime import become_worker
from pipeline.shards.batch import Batch
from pipeline.shards.crops import RandomResizedCrop, parse_crop
from pipeline.shards.device_decode import DeviceDecoder, torchvision_decoder
from pipeline.shards.ffcv_io import FfcvLoader
from pipeline.shards.manifest import Manifest
from pipeline.shards.reader import TaskReader
from pipeline.validate import whole_number

BACKENDS = ("auto", "stream", "indexed", "ffcv")
WORKER_KINDS = ("auto", "process", "thread")
__all__ = ["BACKENDS", "WORKER_KINDS", "Batch", "ShardLoader", "create_loader"]


# --- planning ----------------------------------------------------------------------------------------------
def _rank_slice(seq: np.ndarray, rank: int, world: int) -> np.ndarray:
    per_rank = len(seq) // world
    return seq[rank * per_rank:(rank + 1) * per_rank]


def _cut(seq: np.ndarray, batch_size: int, drop_last: bool) -> np.ndarray:
    return seq[: len(seq) - len(seq) % batch_size] if drop_last else seq


def plan_indexed(rows: np.ndarray, batch_size: int, shuffle: bool, rng: np.random.Generator,
                 rank: int = 0, world: int = 1, drop_last: bool = False) -> list[np.ndarray]:
    seq = rng.permutation(rows) if shuffle else np.sort(rows)
    seq = _cut(_rank_slice(seq, rank, world), batch_size, drop_last)
    return [seq[i:i + batch_size] for i in range(0, len(seq), batch_size)]


def plan_stream(rows: np.ndarray, shard_starts: np.ndarray, batch_size: int, window: int, shuffle: bool,
                rng: np.random.Generator, rank: int = 0, world: int = 1, drop_last: bool = False,
                task_batches: int | None = None) -> list[np.ndarray]:
    """Samples are shuffled within windows of `window` batches; each window is read as tasks of `task_batches`
    batches (default: the whole window)."""
    rows = np.sort(rows)
    n_shards = len(shard_starts) - 1
    order = rng.permutation(n_shards) if shuffle else np.arange(n_shards)
    parts = []
    for s in order:
        lo, hi = np.searchsorted(rows, shard_starts[s]), np.searchsorted(rows, shard_starts[s + 1])
        part = rows[lo:hi]
        if shuffle and len(part):
            part = np.roll(part, -int(rng.integers(len(part))))  # new window boundaries every epoch
        parts.append(part)
    seq = np.concatenate(parts) if parts else rows
    seq = _cut(_rank_slice(seq, rank, world), batch_size, drop_last)
    span, task = batch_size * window, batch_size * min(window, task_batches or window)
    tasks = []
    for i in range(0, len(seq), span):
        w = seq[i:i + span]
        w = w[rng.permutation(len(w))] if shuffle else w
        tasks.extend(w[j:j + task] for j in range(0, len(w), task))
    return tasks


MIN_TASKS = 16


@dataclass
class Planner:
    """Everything that decides an epoch's tasks; the plan is a pure function of the epoch number."""

    backend: str
    rows: np.ndarray
    shard_starts: np.ndarray
    batch_size: int
    window: int
    shuffle: bool
    seed: int
    rank: int
    world_size: int
    drop_last: bool

    @property
    def task_batches(self) -> int:
        """Batches a stream task reads, fewer than a window on small splits so an epoch has at least MIN_TASKS
        tasks: tasks are dealt to the workers round-robin, and an epoch of a handful of 8-batch tasks leaves
        workers idle at its end (5 tasks on 2 workers: one idles for a fifth of the epoch). The shuffle window
        stays whole, so batches mix as much as ever; independent of the worker count, so the order is too."""
        batches = len(self.rows) // self.world_size // self.batch_size
        return max(1, min(self.window, batches // MIN_TASKS))

    def plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        args = dict(shuffle=self.shuffle, rng=rng, rank=self.rank, world=self.world_size, drop_last=self.drop_last)
        if self.backend == "stream":
            return plan_stream(self.rows, self.shard_starts, self.batch_size, self.window,
                               task_batches=self.task_batches, **args)
        return plan_indexed(self.rows, self.batch_size, **args)


def consumed_per_worker(tasks: list[np.ndarray], workers: int, batch_size: int,
                        consumed: int) -> tuple[list[int], int]:
    """(batches each worker had delivered when the loader had yielded `consumed`, the worker whose turn was
    next). torch's DataLoader takes one batch from each worker in turn, from worker 0 at every epoch (worker w
    reads tasks w, w + workers, ...), passing over workers that have run out."""
    counts = [sum(-(-len(t) // batch_size) for t in tasks[w::workers]) for w in range(workers)]
    if consumed > sum(counts):
        raise PipelineError(f"the loader's position ({consumed} batches) is past its epoch of {sum(counts)}; "
                            "resume with the settings the run was started with")
    taken, turn = [0] * workers, 0
    while consumed:
        if taken[turn] < counts[turn]:
            taken[turn] += 1
            consumed -= 1
        turn = (turn + 1) % workers
    return taken, turn


class _TaskStream(IterableDataset):
    """Worker side. Workers persist across epochs; each plans the epoch it reads from shared memory, and skips
    what the epoch had delivered before an interruption (`skip`, in batches of the whole loader)."""

    def __init__(self, reader: TaskReader, planner: Planner, epoch, skip):
        self.reader, self.planner, self.epoch, self.skip = reader, planner, epoch, skip

    def __iter__(self):
        info = get_worker_info()
        return self.worker_batches(*((0, 1) if info is None else (info.id, info.num_workers)))

    def worker_batches(self, w: int, workers: int) -> Iterator[Batch]:
        """The batches worker `w` of `workers` delivers this epoch (a process or a thread: the same ones)."""
        tasks = self.planner.plan(self.epoch.value)
        bs, skip = self.reader.batch_size, 0
        if self.skip.value:
            # the DataLoader starts at worker 0 again: worker w takes over the stream of the worker whose turn
            # was w places after the interruption, so the rest of the epoch comes in its uninterrupted order
            taken, turn = consumed_per_worker(tasks, workers, bs, self.skip.value)
            w = (w + turn) % workers
            skip = taken[w]
        for rows in tasks[w::workers]:
            n = -(-len(rows) // bs)
            if skip >= n:  # delivered before the interruption: not even read
                skip -= n
                continue
            rows, skip = rows[skip * bs:], 0
            yield from self.reader.batches(rows, self.epoch.value)


_DONE = object()


def threaded_batches(dataset: _TaskStream, workers: int, pin: bool, prefetch: int = 2) -> Iterator[Batch]:
    """The epoch of `workers` DataLoader worker processes, read by threads of this process instead: thread w
    reads what worker w would, and batches are taken one from each in turn (passing over threads that have run
    out), as the DataLoader takes them, so the batches and their order are the same. The decoders release the
    GIL; what a thread saves is the hand-over: a worker process copies every batch into a new shared-memory
    segment, whose pages fault in on both sides (about 200 us per 224 px image on 2 cores)."""
    queues = [queue.Queue(maxsize=prefetch) for _ in range(workers)]
    stop = threading.Event()

    def put(q, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(w: int) -> None:
        try:
            for b in dataset.worker_batches(w, workers):
                if not put(queues[w], b.pin() if pin else b):
                    return
            put(queues[w], _DONE)
        except BaseException as exc:  # noqa: BLE001  (raised in the consumer's thread)
            put(queues[w], exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True, name=f"loader-{w}") for w in range(workers)]
    for t in threads:
        t.start()
    try:
        active, turn = list(range(workers)), 0
        while active:
            w = active[turn]
            item = queues[w].get()
            if item is _DONE:
                active.pop(turn)
                turn = turn % len(active) if active else 0
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            turn = (turn + 1) % len(active)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _worker_init(_worker_id: int) -> None:
    become_worker()


class ShardLoader:
    """Iterate to get one epoch of `Batch`es; each iteration starts the next epoch unless `set_epoch` is used."""

    def __init__(self, shardset, split: str, rows: np.ndarray | None, *, backend: str, batch_size: int,
                 shuffle: bool, seed: int, drop_last: bool, device, num_workers: int, image_size: int | None,
                 window: int, rank: int, world_size: int, row_weights: np.ndarray | None = None,
                 crop: RandomResizedCrop | None = None, device_decode=None, worker_kind: str = "process"):
        table = shardset.members(split)
        rows = np.arange(len(table)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.planner = Planner(backend, rows, table.shard_starts, batch_size, window, shuffle, seed, rank,
                               world_size, drop_last)
        self.reader = TaskReader(shardset, split, image_size, batch_size, row_weights, crop, seed,
                                 encoded=device_decode is not None,
                                 whole_shards=whole_shards(shardset.store, table, rows, backend),
                                 in_process=num_workers == 0 or worker_kind == "thread")
        self.decoder = None
        if device_decode is not None:
            size = crop.size if crop else (image_size or shardset.image_size)
            self.decoder = DeviceDecoder(device_decode, device, size, shardset.channels)
        self.device = torch.device(device)
        self.num_workers, self.worker_kind = num_workers, worker_kind
        self.epoch, self.skip = 0, 0
        self._shared_epoch = mp.Value("q", 0, lock=False)  # read by persistent workers
        self._shared_skip = mp.Value("q", 0, lock=False)
        self._dataloader = None

    @property
    def samples_per_epoch(self) -> int:
        p = self.planner
        n = len(p.rows) // p.world_size
        return n - n % p.batch_size if p.drop_last else n

    def __len__(self) -> int:
        return -(-self.samples_per_epoch // self.planner.batch_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration is epoch `epoch`, from its batch `skip` on (0: all of it): a run resumed in the
        middle of an epoch gets exactly the batches an uninterrupted one would have had next."""
        self.epoch, self.skip = whole_number(epoch, "epoch"), whole_number(skip, "skip")

    def plan(self, epoch: int) -> list[np.ndarray]:
        return self.planner.plan(epoch)

    def _batches(self) -> Iterator[Batch]:
        self._shared_epoch.value, self._shared_skip.value = self.epoch, self.skip
        self.skip = 0  # one epoch only
        dataset = _TaskStream(self.reader, self.planner, self._shared_epoch, self._shared_skip)
        if self.num_workers == 0:
            return iter(dataset)
        if self.worker_kind == "thread":
            workers = min(self.num_workers, max(1, len(self.planner.plan(0))))
            return threaded_batches(dataset, workers, pin=self.device.type == "cuda")
        if self._dataloader is None:
            n_tasks = max(1, len(self.planner.plan(0)))
            self._dataloader = DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, n_tasks),
                                          pin_memory=self.device.type == "cuda", persistent_workers=True,
                                          worker_init_fn=_worker_init)
        return iter(self._dataloader)

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        self.epoch += 1
        try:
            for b in batches:
                if self.decoder is not None:
                    yield self.decoder(b)
                else:
                    yield b if self.device.type == "cpu" else b.to(self.device)
        except PipelineError as exc:  # from a worker: its own message, not the DataLoader's wrapping of it
            raise type(exc)(_worker_message(str(exc))) from None


WHOLE_FROM = 0.5


def whole_shards(store, table, rows: np.ndarray, backend: str) -> np.ndarray | None:
    """Which shards a remote `stream` epoch fetches whole (one request each, once for all workers): those it
    reads at least WHOLE_FROM of the members of; None when none is. A stream task takes a random part of its
    window, so reading a whole split by ranges would cost a request every few images (issue 39: 2,546 requests
    for 3,000 images); a subset below half of a shard keeps its byte-range economy."""
    if store.local or backend != "stream":
        return None
    counts = np.diff(table.shard_starts)
    read = np.bincount(table.shard[rows], minlength=len(counts)) if len(rows) else np.zeros(len(counts), int)
    whole = read >= WHOLE_FROM * np.maximum(counts, 1)
    return whole if whole.any() else None


def _worker_message(text: str) -> str:
    """The original message inside torch's "Caught X in DataLoader worker process N ... Original Traceback"."""
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if "Error: " in ln]
    return last[-1].split("Error: ", 1)[1] if last else text


def _subset_rows(shardset, split: str, subset, use_weights: bool):
    """(member-table rows of the subset or None for the whole split, per-row weights or None)."""
    if subset is None:
        return None, None
    weights = None
    if isinstance(subset, Manifest):
        subset.check_against(shardset)
        if subset.split != split:
            raise PipelineError(f"{subset.path}: manifest is for split {subset.split!r}, loader asked for {split!r}")
        weights = subset.weights if use_weights else None
        subset = subset.ids
    ids = np.asarray(subset, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise PipelineError("subset ids contain duplicates")
    rows = shardset.rows_of(split, ids)
    row_weights = None
    if weights is not None:
        row_weights = np.zeros(len(shardset.members(split)), dtype=np.float32)
        row_weights[rows] = weights
    return rows, row_weights


def create_loader(shardset, split: str = "train", subset=None, *, backend: str = "auto", batch_size: int = 256,
                  shuffle: bool = True, seed: int = 0, drop_last: bool = False, device="cpu", num_workers: int = 0,
                  image_size: int | None = None, window: int = 8, rank: int | None = None,
                  world_size: int | None = None, use_weights: bool = True, crop: RandomResizedCrop | str | None = None,
                  decode="auto", worker_kind: str = "auto"):
    """A loader of `split` (or of `subset`: ids or a Manifest). `auto` streams a whole split and reads subsets
    by index. `image_size` decodes to that square size (needed when stored images vary in size). Batches
    carry a manifest's per-sample weights when it has them and `use_weights` is on. `crop` (a
    `RandomResizedCrop` or its text, `random-resized:224`) crops while decoding: batches are crop.size square.
    `decode`: `cpu` (in the loader workers), `device` (nvJPEG on the CUDA device: workers read bytes only), `auto`
    (device where torchvision's GPU decoder works and the shards are JPEG, else cpu), or a decode function.
    `worker_kind`: the `num_workers` read in `process`es (torch DataLoader workers) or in `thread`s of this
    process (the same batches in the same order); `auto` picks by the work per image (`auto_worker_kind`)."""
    if backend not in BACKENDS:
        raise PipelineError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    whole_number(batch_size, "batch size", 1)
    whole_number(seed, "seed")
    whole_number(num_workers, "--workers", why="; 0 reads in this process")
    if worker_kind not in WORKER_KINDS:
        raise PipelineError(f"worker kind {worker_kind!r}: choose one of {', '.join(WORKER_KINDS)}")
    crop = parse_crop(crop) if isinstance(crop, str) else crop
    if image_size is None and shardset.image_size is None and crop is None:
        raise PipelineError(f"{shardset.root}: images vary in size; pass an image size to decode them to")
    rows, row_weights = _subset_rows(shardset, split, subset, use_weights)
    if worker_kind == "auto":
        worker_kind = auto_worker_kind(shardset, crop, image_size)
    rank, world_size = rank_and_world(rank, world_size)
    if backend == "auto":
        backend = "stream" if rows is None else "indexed"
    if backend == "ffcv":
        return FfcvLoader(shardset, split, rows, batch_size=batch_size, shuffle=shuffle, seed=seed,
                          drop_last=drop_last, device=device, num_workers=num_workers, image_size=image_size,
                          rank=rank, world_size=world_size, row_weights=row_weights, crop=crop)
    return ShardLoader(shardset, split, rows, backend=backend, batch_size=batch_size, shuffle=shuffle, seed=seed,
                       drop_last=drop_last, device=device, num_workers=num_workers, image_size=image_size,
                       window=window, rank=rank, world_size=world_size, row_weights=row_weights, crop=crop,
                       device_decode=_device_decoder(decode, device, shardset),
                       worker_kind=worker_kind)


THREADS_FROM_SIDE = 64


def auto_worker_kind(shardset, crop: RandomResizedCrop | None, image_size: int | None) -> str:
    """Threads where decoding an image outweighs the Python around it, which holds the GIL; else processes.
    Measured on 2 cores (benchmarks/RESULTS.md, "Thread workers"): threads read 64 px images 1.4x and 224 px
    crops 1.3-1.6x as fast as processes, 32 px CIFAR 0.82-0.95x."""
    if not shardset.store.local and shardset.store.cache is None:
        return "thread"  # threads share a whole shard fetched once; processes would each fetch it or read ranges
    side = crop.size if crop else (image_size or shardset.image_size or 0)
    return "thread" if side >= THREADS_FROM_SIDE else "process"


def _device_decoder(decode, device, shardset):
    """The function that decodes on the device, or None for the CPU path."""
    if callable(decode):
        return decode
    if decode not in ("auto", "cpu", "device"):
        raise PipelineError(f"decode {decode!r}: choose auto, cpu or device")
    if decode == "cpu" or (decode == "auto" and shardset.index["image"].get("format") != "jpg"):
        return None
    fn = torchvision_decoder(device)
    if fn is None and decode == "device":
        raise PipelineError("decode=device: needs a CUDA device and torchvision with GPU JPEG decoding "
                            "(pip install torchvision matching torch); use decode=cpu")
    return fn
