"""Round trip of every sample for each source form: ids, labels, and pixels where the format is lossless."""

import pickle
import tarfile

import numpy as np
import pytest

from conftest import make_prepared, write_cifar_pickles, write_image_folder, write_mnist
from pipeline.errors import PipelineError
from pipeline.shards.sources import open_source


def _round_trip_arrays(ss, expected: dict, split_of_source=None):
    """expected: source split -> (images NHW[C], labels); checks every sample of every split of ss."""
    seen = 0
    for split in ss.splits:
        t = ss.members(split)
        src_split = split_of_source or split
        images, labels = expected[src_split]
        for sid, label, src in zip(t.ids, t.labels, t.sources):
            assert label == labels[src]
            got = ss.read_image(split, int(sid))
            want = images[src] if images[src].ndim == 3 else images[src][:, :, None]
            np.testing.assert_array_equal(got, want)
            seen += 1
    return seen


def test_cifar10_pickles_round_trip(tmp_path):
    data = write_cifar_pickles(tmp_path / "cifar-10-batches-py")
    ss = make_prepared(f"cifar10:{tmp_path}", tmp_path / "out", shard_size=16)
    assert ss.count("train") == 50 and ss.count("test") == 20
    assert ss.classes == [f"k{i}" for i in range(10)]
    assert _round_trip_arrays(ss, data) == 70
    # ids: global, increasing, train before test, unique
    ids = np.concatenate([ss.ids(s) for s in ss.splits])
    assert len(np.unique(ids)) == 70 and ss.ids("train").max() < ss.ids("test").min()


def test_cifar100_from_tar_gz_archive(tmp_path):
    data = write_cifar_pickles(tmp_path / "cifar-100-python", hundred=True)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-100-python", arcname="cifar-100-python")
    ss = make_prepared(f"cifar100:{archive}", tmp_path / "out")
    assert len(ss.classes) == 100 and ss.classes[3] == "c3"
    assert _round_trip_arrays(ss, data) == 70


def test_cifar10_binary_version(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    expected = {}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        imgs, labs = [], []
        for name in names:
            labels = rng.integers(0, 10, 4).astype(np.uint8)
            pix = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
            (root / name).write_bytes(np.concatenate([labels[:, None], pix], 1).tobytes())
            imgs.append(pix.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labs.append(labels.astype(np.int64))
        expected[split] = (np.concatenate(imgs), np.concatenate(labs))
    (root / "batches.meta.txt").write_text("\n".join(f"n{i}" for i in range(10)) + "\n")
    ss = make_prepared(f"cifar10:{root}", tmp_path / "out")
    assert ss.classes[0] == "n0"
    assert _round_trip_arrays(ss, expected) == 24


def test_cifar_unpickler_refuses_foreign_objects(tmp_path):
    root = tmp_path / "c"
    write_cifar_pickles(root)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(PipelineError, match=r"refusing to load (builtins|__builtin__)\.print"):
        open_source(f"cifar10:{root}")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip(tmp_path, gz):
    data = write_mnist(tmp_path / "mnist", gz=gz)
    ss = make_prepared(f"mnist:{tmp_path / 'mnist'}", tmp_path / "out")
    assert ss.mode == "L" and ss.image_size == 28
    assert _round_trip_arrays(ss, data) == 42


def test_mnist_truncated_file_is_one_clear_error(tmp_path):
    write_mnist(tmp_path / "m", gz=False)
    f = tmp_path / "m" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PipelineError, match="truncated idx file"):
        open_source(f"mnist:{tmp_path / 'm'}")


def test_digits_round_trip_and_holdout(digits_set):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * 255 / 16).astype(np.uint8)
    assert digits_set.count("train") + digits_set.count("test") == 1797
    assert abs(digits_set.count("test") - 0.2 * 1797) < 10
    # train and test together cover every source image once
    srcs = np.concatenate([digits_set.members(s).sources for s in digits_set.splits])
    assert sorted(srcs.tolist()) == list(range(1797))
    assert _round_trip_arrays(digits_set, {"train": (images, d.target)}, split_of_source="train") == 1797
    # the held-out split is stratified: every class is in it
    assert len(np.unique(digits_set.labels("test"))) == 10


def test_synthetic_is_seeded_and_round_trips(synthetic_set):
    from pipeline.shards.sources.synthetic import generate

    images, labels, roles = generate(1200)
    again, _, _ = generate(1200)
    np.testing.assert_array_equal(images, again)
    assert (roles == 1).sum() > 100 and (roles == 2).sum() > 60  # near-duplicates and hard cases exist
    assert _round_trip_arrays(synthetic_set, {"train": (images, labels)}, split_of_source="train") == 1200


def test_folder_with_splits_png_round_trip(tmp_path):
    train = write_image_folder(tmp_path / "ds" / "train", seed=1)
    test = write_image_folder(tmp_path / "ds" / "val", n_per_class=2, seed=2)
    ss = make_prepared(f"folder:{tmp_path / 'ds'}", tmp_path / "out")
    assert ss.classes == ["cat", "dog", "eel"]
    assert ss.count("train") == 18 and ss.count("test") == 6
    src = open_source(f"folder:{tmp_path / 'ds'}")
    for split, expected in (("train", train), ("test", test)):
        t = ss.members(split)
        for sid, label, s in zip(t.ids, t.labels, t.sources):
            pix, want_label = expected[src.describe(split, int(s))]
            assert label == want_label
            np.testing.assert_array_equal(ss.read_image(split, int(sid)), pix)


def test_folder_jpeg_bytes_stored_unchanged(tmp_path):
    write_image_folder(tmp_path / "flat", fmt="jpg", n_per_class=4)
    ss = make_prepared(f"folder:{tmp_path / 'flat'}", tmp_path / "out", test_fraction=0.25)
    src = open_source(f"folder:{tmp_path / 'flat'}")
    assert ss.index["image"]["format"] == "jpg"
    for split in ss.splits:
        t = ss.members(split)
        for sid, s in zip(t.ids, t.sources):
            original = (tmp_path / "flat" / src.describe("train", int(s))).read_bytes()
            assert ss.read_bytes(split, int(sid)) == original  # no re-encoding loss


def test_folder_resize_and_centre_crop(tmp_path):
    from PIL import Image

    root = tmp_path / "r" / "a"
    root.mkdir(parents=True)
    pix = np.zeros((20, 40, 3), dtype=np.uint8)
    pix[:, 10:30] = 255  # a white square in the middle of a black 20x40 image
    Image.fromarray(pix).save(root / "x.png")
    Image.fromarray(pix).save(root / "y.png")
    ss = make_prepared(f"folder:{tmp_path / 'r'}", tmp_path / "out", image_size=10, test_fraction=0)
    img = ss.read_image("train", 0)
    assert img.shape == (10, 10, 3) and img.min() > 200  # the centre crop keeps only the white square


def test_bad_sources_are_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="unknown source"):
        open_source("imagenet:/x")
    with pytest.raises(PipelineError, match="no such folder"):
        open_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "e" / "empty_class").mkdir(parents=True)
    write_image_folder(tmp_path / "e", classes=("full",))
    with pytest.raises(PipelineError, match="empty class folder"):
        open_source(f"folder:{tmp_path / 'e'}")
    (tmp_path / "none").mkdir()
    with pytest.raises(PipelineError, match="no class folders"):
        open_source(f"folder:{tmp_path / 'none'}")
    with pytest.raises(PipelineError, match="whole number"):
        open_source("synthetic:abc")
