"""Round trip of every sample for each source form: ids, labels, and pixels where the format is lossless."""

import pickle
import tarfile

import numpy as np
import pytest

from clirun import pipeline as pipeline_cli
from conftest import make_prepared, write_cifar_pickles, write_image_folder, write_mnist
from pipeline.errors import PipelineError
from pipeline.shards.shardset import ShardSet
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


def _write_imagenet_small(root, size=32, batches=(3, 4), val=5, zipped=False, seed=0):
    """The release's npz form: rows of the red, green and blue planes, 1-based labels, a mean, the map file.
    Returns source split -> (images, 0-based labels), decoded here by hand, plane by plane."""
    import zipfile

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    expected, files = {}, {}
    for split, counts in (("train", batches), ("test", (val,))):
        imgs, labs = [], []
        for b, n in enumerate(counts, 1):
            data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
            labels = rng.integers(1, 6, n)
            labels[0] = 5  # every class number up to 5 in use
            name = f"train_data_batch_{b}.npz" if split == "train" else "val_data.npz"
            np.savez(root / name, data=data, labels=labels.tolist(), mean=data.mean(0))
            files.setdefault(split, []).append(root / name)
            planes = [data[:, k * size * size:(k + 1) * size * size].reshape(n, size, size) for k in range(3)]
            imgs.append(np.stack(planes, axis=-1))
            labs.append(labels - 1)
        expected[split] = (np.concatenate(imgs), np.concatenate(labs))
    (root / "map_clsloc.txt").write_text("n01 1 tench\nn02 2 crane\nn03 3 goldfish\nn04 4 crane\nn05 5 kit_fox\n")
    if zipped:
        for split, paths in files.items():
            with zipfile.ZipFile(root / f"Imagenet{size}_{'val' if split == 'test' else split}_npz.zip", "w") as z:
                for p in paths:
                    z.write(p, arcname=f"Imagenet{size}_{split}/{p.name}")
                    p.unlink()
    return expected


@pytest.mark.parametrize("size,zipped", [(32, False), (64, True)])
def test_downsampled_imagenet_round_trip(tmp_path, size, zipped):
    expected = _write_imagenet_small(tmp_path / "in", size=size, zipped=zipped)
    first = expected["train"][0][0]
    row = np.load(tmp_path / "in" / "train_data_batch_1.npz")["data"][0] if not zipped else None
    if row is not None:  # one pixel by hand: green plane, row 2, column 7
        assert first[2, 7, 1] == row[size * size + 2 * size + 7]
    ss = make_prepared(f"imagenet{size}:{tmp_path / 'in'}", tmp_path / "out", shard_size=4)
    assert ss.count("train") == 7 and ss.count("test") == 5
    assert ss.classes == ["tench", "crane (n02)", "goldfish", "crane (n04)", "kit_fox"]  # two cranes in ImageNet
    assert _round_trip_arrays(ss, expected) == 12


def test_downsampled_imagenet_bad_files_are_one_line(tmp_path):
    _write_imagenet_small(tmp_path / "in64", size=64)
    with pytest.raises(PipelineError, match=r"not uint8 rows of 3072 pixels \(32 px: is this imagenet64\?\)"):
        open_source(f"imagenet32:{tmp_path / 'in64'}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("train_data_batch_1", "val_data"):
        with open(pickled / name, "wb") as f:
            pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [1]}, f)
    with pytest.raises(PipelineError, match="pickle files, which are not read: use its npz form"):
        open_source(f"imagenet32:{pickled}")
    (tmp_path / "in64" / "map_clsloc.txt").write_text("n01 1 tench\n")
    with pytest.raises(PipelineError, match="map_clsloc.txt: no line for class 2"):
        open_source(f"imagenet64:{tmp_path / 'in64'}")


def _write_stl10(root, counts=(("train", 4), ("test", 3), ("unlabeled", 2)), seed=0):
    """STL-10's binary files; returns split -> (images decoded by hand, 0-based labels, -1 for the unlabeled):
    pixel (row r, column c, channel k) of an image is byte k * 96 * 96 + c * 96 + r of its record (channels
    column-major)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    r, c, k = np.meshgrid(np.arange(96), np.arange(96), np.arange(3), indexing="ij")
    offset = k * 96 * 96 + c * 96 + r
    expected = {}
    for split, n in counts:
        raw = rng.integers(0, 256, (n, 3 * 96 * 96), dtype=np.uint8)
        labels = rng.integers(1, 11, n).astype(np.uint8) if split != "unlabeled" else np.zeros(n, np.uint8)
        (root / f"{split}_X.bin").write_bytes(raw.tobytes())
        if split != "unlabeled":
            (root / f"{split}_y.bin").write_bytes(labels.tobytes())
        expected[split] = (np.stack([row[offset] for row in raw]), labels.astype(np.int64) - 1)
    (root / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                      "monkey", "ship", "truck"]) + "\n")
    return expected


@pytest.mark.parametrize("archived", [False, True])
def test_stl10_binary_round_trip(tmp_path, archived):
    expected = _write_stl10(tmp_path / "stl10_binary")
    spec = tmp_path / "stl10_binary"
    if archived:
        spec = tmp_path / "stl10_binary.tar.gz"
        with tarfile.open(spec, "w:gz") as tar:
            tar.add(tmp_path / "stl10_binary", arcname="stl10_binary")
    ss = make_prepared(f"stl10:{spec}", tmp_path / "out", shard_size=3)
    assert ss.count("train") == 4 and ss.count("test") == 3 and ss.count("unlabeled") == 2
    assert ss.classes[7] == "monkey" and ss.labelled("train") and not ss.labelled("unlabeled")
    assert _round_trip_arrays(ss, expected) == 9  # the unlabeled split's labels are all -1


def test_a_split_without_labels_pretrains_and_is_refused_where_labels_are_needed(tmp_path):
    """STL-10's unlabeled split: verified, streamed and trained on by ACL; a supervised method, per-class
    selection and per-class preparation refuse it in one line each."""
    from pipeline.selectors import run as selection
    from pipeline.shards.prepare import PrepareOptions, prepare
    from pipeline.shards.verify import verify
    from pipeline.trainers import create_trainer
    from test_train import tiny_cfg

    _write_stl10(tmp_path / "s", counts=(("train", 4), ("test", 3), ("unlabeled", 8)))
    ss = make_prepared(f"stl10:{tmp_path / 's'}", tmp_path / "out", shard_size=5, image_size=16)
    assert verify(ss.root, progress=False) == []
    assert [int(b.labels.min()) for b in ss.loader("unlabeled", batch_size=4)] == [-1, -1]
    over = {"data.split": "unlabeled", "data.batch_size": 4, "optim.epochs": 1, "attack.steps": 1}
    with create_trainer(tiny_cfg(ss.root, tmp_path / "acl", **over), progress=False) as t:
        t.fit()
    assert (tmp_path / "acl" / "checkpoints" / "last.pt").is_file()
    with pytest.raises(PipelineError, match="split 'unlabeled' has no labels, and method 'pgd-at' trains on labels"):
        create_trainer(tiny_cfg(ss.root, tmp_path / "at", **over, **{"method.name": "pgd-at"}), progress=False)
    with pytest.raises(PipelineError, match="per_class: the split has no labels"):
        selection.run_selection(ss.root, "random", 0.5, tmp_path / "m.json", split="unlabeled",
                                params={"per_class": True})
    with pytest.raises(PipelineError, match="split 'unlabeled' has no labels, so no classes to balance"):
        prepare(f"stl10:{tmp_path / 's'}", PrepareOptions(out=tmp_path / "pc", per_class={"unlabeled": 1},
                                                          progress=False))


def test_stl10_truncated_file_is_one_line(tmp_path):
    _write_stl10(tmp_path / "s")
    (tmp_path / "s" / "test_X.bin").write_bytes((tmp_path / "s" / "test_X.bin").read_bytes()[:-5])
    with pytest.raises(PipelineError, match=r"test_X.bin: 82939 bytes for 3 labels in test_y.bin"):
        open_source(f"stl10:{tmp_path / 's'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="test_X.bin, test_y.bin, train_X.bin, train_y.bin not found"):
        open_source(f"stl10:{tmp_path / 'empty'}")


def test_prepare_keeps_only_the_splits_asked_for(tmp_path):
    """STL-10 for evaluation: train and test, not its unlabeled images; the choice is part of the recipe."""
    from pipeline.shards.layout import load_index

    _write_stl10(tmp_path / "stl10_binary")
    ss = make_prepared(f"stl10:{tmp_path / 'stl10_binary'}", tmp_path / "two", splits=("train", "test"))
    assert ss.splits == ["train", "test"] and load_index(tmp_path / "two")["recipe"]["splits"] == ["test", "train"]
    with pytest.raises(PipelineError, match="--splits train,val: the data has no 'val' split"):
        make_prepared(f"stl10:{tmp_path / 'stl10_binary'}", tmp_path / "bad", splits=("train", "val"))
    r = pipeline_cli("prepare", f"stl10:{tmp_path / 'stl10_binary'}", "--out", str(tmp_path / "cli"),
                     "--splits", "test")
    assert r.returncode == 0, r.stderr
    assert ShardSet.open(tmp_path / "cli").splits == ["test"]
