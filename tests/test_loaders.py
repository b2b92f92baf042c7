"""Loaders: exact subsets, every sample once per epoch, seeded shuffles, disjoint equal parts per rank."""

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.shards.loaders import plan_stream


def _epoch_ids(loader):
    out = []
    for b in loader:
        assert b.images.dtype == torch.uint8 and b.images.ndim == 4
        assert len(b.images) == len(b.labels) == len(b.ids)
        out.append(b.ids.numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@pytest.mark.parametrize("backend", ["stream", "indexed"])
def test_whole_split_each_sample_once(synthetic_set, backend):
    loader = synthetic_set.loader("train", backend=backend, batch_size=64, seed=1)
    ids = _epoch_ids(loader)
    assert sorted(ids.tolist()) == synthetic_set.ids("train").tolist()
    assert len(loader) == -(-synthetic_set.count("train") // 64)


@pytest.mark.parametrize("backend", ["stream", "indexed"])
def test_subset_loader_returns_exactly_the_manifest_ids(synthetic_set, backend, tmp_path):
    from pipeline.shards.manifest import Manifest

    rng = np.random.default_rng(0)
    chosen = rng.choice(synthetic_set.ids("train"), 97, replace=False)
    m = Manifest.for_shardset(synthetic_set, "train", chosen, producer={"name": "test"})
    m.save(tmp_path / "round-0001.json")
    loader = synthetic_set.loader("train", Manifest.load(tmp_path / "round-0001.json"), backend=backend, batch_size=10)
    for _ in range(2):
        ids = _epoch_ids(loader)
        assert sorted(ids.tolist()) == sorted(chosen.tolist())


def test_batches_carry_the_right_pixels_and_labels(digits_set):
    loader = digits_set.loader("test", batch_size=50, backend="indexed")
    rows_label = dict(zip(digits_set.ids("test").tolist(), digits_set.labels("test").tolist()))
    for b in loader:
        for img, label, sid in zip(b.images, b.labels, b.ids):
            assert rows_label[int(sid)] == int(label)
            np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), digits_set.read_image("test", int(sid)))


@pytest.mark.parametrize("backend", ["stream", "indexed"])
def test_shuffle_is_seeded_per_epoch(synthetic_set, backend):
    a = synthetic_set.loader("train", backend=backend, batch_size=32, seed=7)
    b = synthetic_set.loader("train", backend=backend, batch_size=32, seed=7)
    e0a, e1a = _epoch_ids(a), _epoch_ids(a)
    e0b = _epoch_ids(b)
    np.testing.assert_array_equal(e0a, e0b)  # same seed, same epoch: same order
    assert not np.array_equal(e0a, e1a)  # next epoch: another order
    b.set_epoch(1)
    np.testing.assert_array_equal(_epoch_ids(b), e1a)
    c = synthetic_set.loader("train", backend=backend, batch_size=32, seed=8)
    assert not np.array_equal(_epoch_ids(c), e0a)


def test_stream_batches_are_mixed(synthetic_set):
    """Batches from the streaming planner draw on many classes, and change membership between epochs."""
    loader = synthetic_set.loader("train", backend="stream", batch_size=64, seed=0, window=4)
    first = [set(b.ids.tolist()) for b in loader]
    second = [set(b.ids.tolist()) for b in loader]
    labels = [len(np.unique(b.labels.numpy())) for b in synthetic_set.loader("train", backend="stream", batch_size=64)]
    assert min(labels) >= 8
    assert not any(s in second for s in first[:-1])


@pytest.mark.parametrize("backend", ["stream", "indexed"])
def test_ranks_get_disjoint_equal_parts(synthetic_set, backend):
    world = 3
    subset = synthetic_set.ids("train")[5:800]
    parts = [_epoch_ids(synthetic_set.loader("train", subset, backend=backend, batch_size=16, seed=2,
                                             rank=r, world_size=world)) for r in range(world)]
    sizes = {len(p) for p in parts}
    assert sizes == {len(subset) // world}
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union)
    assert set(union.tolist()) <= set(subset.tolist())


@pytest.mark.parametrize("backend", ["stream", "indexed"])
def test_persistent_workers_follow_the_epochs(synthetic_set, backend):
    """Worker processes live across epochs and still read each epoch's own batches (same as in-process)."""
    def batches(loader):
        return sorted(tuple(b.ids.tolist()) for b in loader)

    serial = synthetic_set.loader("train", backend=backend, batch_size=64, seed=4, num_workers=0)
    parallel = synthetic_set.loader("train", backend=backend, batch_size=64, seed=4, num_workers=2)
    for _ in range(2):
        assert batches(serial) == batches(parallel)
    serial.set_epoch(7)
    parallel.set_epoch(7)
    assert batches(serial) == batches(parallel)


def test_drop_last_and_decode_size(digits_set):
    loader = digits_set.loader("train", batch_size=100, drop_last=True, image_size=16)
    sizes = [len(b.ids) for b in loader]
    assert set(sizes) == {100} and len(sizes) == digits_set.count("train") // 100
    b = next(iter(loader))
    assert b.images.shape == (100, 1, 16, 16)


def test_plan_stream_reads_runs(synthetic_set):
    """The streaming plan touches each shard in at most two contiguous runs (rotation), so reads stay sequential."""
    t = synthetic_set.members("train")
    tasks = plan_stream(np.arange(len(t)), t.shard_starts, batch_size=32, window=1000, shuffle=True,
                        rng=np.random.default_rng(0))
    (task,) = tasks
    runs = 1 + int(np.sum(np.diff(np.sort(task)) != 1))
    assert runs <= 2 * (len(t.shard_starts) - 1)


def test_bad_loader_requests(synthetic_set):
    with pytest.raises(PipelineError, match="backend"):
        synthetic_set.loader("train", backend="tfdata")
    with pytest.raises(PipelineError, match="no split 'val'"):
        synthetic_set.loader("val")
    with pytest.raises(PipelineError, match="not in split 'train'"):
        synthetic_set.loader("train", [10**8])
    with pytest.raises(PipelineError, match="duplicates"):
        synthetic_set.loader("train", [1, 1])


def test_small_splits_still_give_every_worker_tasks(synthetic_set):
    """A split of few batches is read as at least MIN_TASKS stream tasks, so two workers end an epoch
    together, with the same shuffle window (the same sample order); a split with batches to spare reads
    whole windows."""
    from pipeline.shards.loaders import MIN_TASKS

    n = synthetic_set.count("train")
    small = synthetic_set.loader("train", backend="stream", batch_size=n // 40, seed=0, window=8)
    tasks = small.plan(0)
    assert len(tasks) >= MIN_TASKS and max(len(t) for t in tasks) <= 2 * (n // 40)
    t = synthetic_set.members("train")
    whole_windows = plan_stream(np.arange(n), t.shard_starts, n // 40, 8, True, np.random.default_rng([0, 0]))
    assert len(whole_windows) < MIN_TASKS  # what whole 8-batch windows would have given
    np.testing.assert_array_equal(np.concatenate(tasks), np.concatenate(whole_windows))
    big = synthetic_set.loader("train", backend="stream", batch_size=1, seed=0, window=8)
    assert max(len(t) for t in big.plan(0)) == 8


@pytest.mark.parametrize("backend,workers,skip", [("stream", 2, 0), ("indexed", 3, 0), ("stream", 3, 3)])
def test_thread_workers_deliver_the_process_workers_batches_in_their_order(synthetic_set, backend, workers, skip):
    """Threads read what the DataLoader's worker processes read and hand it over in the DataLoader's order,
    one batch from each worker in turn: the same epoch batch for batch, also resumed inside an epoch."""
    subset = synthetic_set.ids("train")[::3][:250]  # 4 batches of 64: workers run out at different times
    def epoch(kind, ids):
        loader = synthetic_set.loader("train", ids, backend=backend, batch_size=64, seed=4, num_workers=workers,
                                      worker_kind=kind)
        loader.set_epoch(2, skip)
        return [(b.ids.numpy(), b.images.numpy()) for b in loader]

    for ids in (None, subset):
        procs, threads = epoch("process", ids), epoch("thread", ids)
        assert len(procs) == len(threads) > 0
        for (pid, pim), (tid, tim) in zip(procs, threads):
            np.testing.assert_array_equal(pid, tid)
            np.testing.assert_array_equal(pim, tim)


def test_a_thread_workers_error_reaches_the_caller_and_ends_the_epoch(synthetic_set, monkeypatch):
    import threading

    from pipeline.shards.reader import TaskReader

    real, calls = TaskReader.batches, [0]

    def failing(self, rows, epoch=0):
        calls[0] += 1
        if calls[0] == 3:
            raise PipelineError("shard 2 is broken")
        yield from real(self, rows, epoch)

    monkeypatch.setattr(TaskReader, "batches", failing)
    loader = synthetic_set.loader("train", backend="indexed", batch_size=64, num_workers=2, worker_kind="thread")
    with pytest.raises(PipelineError, match="shard 2 is broken"):
        for _ in loader:
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("loader-")]  # none left running
    with pytest.raises(PipelineError, match="worker kind 'fiber'"):
        synthetic_set.loader("train", num_workers=2, worker_kind="fiber")
