import gzip
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.shards.shardset import ShardSet

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on the two cores) each worker and the processes its tests
    start compute on one thread: two workers of two threads each on two cores spin against each other (OpenMP),
    and one thread in every process keeps the bitwise comparisons between processes on the same kernels."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_are_given_back():
    """A test that leaves torch's thread count changed makes later in-process runs use other kernels, and the
    bitwise comparisons between an in-process run and a subprocess fail far from the cause."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, f"the test left torch with {after} threads instead of {before}"


def wait_for(condition, proc=None, what="the event the test needs"):
    """Wait on an event, never on the clock: return when `condition()` holds, fail at once when `proc` has ended
    before it. A machine that is slow or busy only makes the wait longer; a hang is ended by pytest-timeout
    (`timeout` in pyproject.toml), far beyond any machine's slowness."""
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)


def make_prepared(spec, out, **kw):
    kw.setdefault("progress", False)
    result = prepare(spec, PrepareOptions(out=out, **kw))
    return ShardSet.open(result.out)


@pytest.fixture(scope="session")
def digits_set(tmp_path_factory):
    return make_prepared("digits", tmp_path_factory.mktemp("digits"), shard_size=300)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    return make_prepared("synthetic:1200", tmp_path_factory.mktemp("synthetic"), shard_size=250)


def write_image_folder(root: Path, n_per_class=6, classes=("cat", "dog", "eel"), size=12, fmt="png", seed=0):
    """Class folders of small random images; returns {relative path: (pixels, label)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for label, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pix = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            path = root / c / f"{i:03d}.{fmt}"
            Image.fromarray(pix).save(path, quality=95) if fmt == "jpg" else Image.fromarray(pix).save(path)
            written[str(path.relative_to(root.parent if root.name in ("train", "test", "val") else root))] = (pix, label)
    return written


def write_cifar_pickles(root: Path, n_train=50, n_test=20, hundred=False, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    n_classes = 100 if hundred else 10
    label_key = b"fine_labels" if hundred else b"labels"
    out = {}

    def dump(name, n):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, n).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": b"x"}, f, protocol=2)
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)

    if hundred:
        out["train"] = dump("train", n_train)
        out["test"] = dump("test", n_test)
        with open(root / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    else:
        parts = [dump(f"data_batch_{i}", n_train // 5) for i in range(1, 6)]
        out["train"] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        out["test"] = dump("test_batch", n_test)
        with open(root / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"k{i}".encode() for i in range(10)]}, f, protocol=2)
    return out


def write_mnist(root: Path, n_train=30, n_test=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            raw = bytes([0, 0, 8, magic]) + np.array(arr.shape, dtype=">u4").tobytes() + arr.tobytes()
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)
        out[split] = (images, labels.astype(np.int64))
    return out


def all_pixels(ss: ShardSet, split: str) -> dict[int, np.ndarray]:
    return {int(i): ss.read_image(split, int(i)) for i in ss.ids(split)}


def write_tiny_run(folder: Path) -> Path:
    """The least a report reads as a run: config.toml and one epoch record."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text('[method]\nname = "acl"\n[model]\narch = "smallcnn"\n')
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "loss": 1.0, "lr": 0.1,
                                                      "images": 10, "seconds": 1.0, "images_per_s": 10.0,
                                                      "time": 100.0}) + "\n")
    return folder
