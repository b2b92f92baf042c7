"""The shards are standard: stock webdataset and stock ffcv read them; the offset index points at the bytes."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shards.layout import member_key


def test_stock_webdataset_reads_every_sample_with_its_label(synthetic_set):
    import webdataset as wds

    urls = [str(synthetic_set.root / sh["tar"]) for s in synthetic_set.splits
            for sh in synthetic_set.index["splits"][s]["shards"]]
    labels = {int(i): int(l) for s in synthetic_set.splits
              for i, l in zip(synthetic_set.ids(s), synthetic_set.labels(s))}
    found = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert set(sample) >= {"__key__", "png", "cls"}
        sid = int(sample["__key__"])
        found[sid] = int(sample["cls"])
        img = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert img.shape == (32, 32, 3)
    assert found == labels


def test_offset_index_matches_tarfile(digits_set):
    t = digits_set.members("train")
    with tarfile.open(digits_set.shard_path("train", 0)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for sid, off, size in zip(t.ids[:50], t.offsets[:50], t.sizes[:50]):
        m = members[f"{member_key(int(sid))}.png"]
        assert (m.offset_data, m.size) == (off, size)


@pytest.fixture
def torch_threads():
    """ffcv's own Loader sets torch's thread count (the project's wrapper puts it back): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_stock_ffcv_loader_reads_the_beton(tmp_path, torch_threads):
    pytest.importorskip("ffcv", reason="ffcv extra not installed (needs libturbojpeg/opencv)")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from conftest import make_prepared

    ss = make_prepared("synthetic:300", tmp_path / "s", formats=("wds", "ffcv"), shard_size=100)
    assert ss.index["splits"]["train"]["beton"]["count"] == ss.count("train")
    loader = Loader(str(tmp_path / "s" / "train.beton"), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                                                "id": [IntDecoder()]})
    seen = 0
    for images, labels, ids in loader:
        for img, label, sid in zip(images, labels[:, 0], ids[:, 0]):
            np.testing.assert_array_equal(img, ss.read_image("train", int(sid)))
            assert label == ss.labels("train")[ss.rows_of("train", [int(sid)])[0]]
            seen += 1
    assert seen == ss.count("train")


def test_pipeline_ffcv_backend_matches_subset(tmp_path):
    pytest.importorskip("ffcv", reason="ffcv extra not installed (needs libturbojpeg/opencv)")
    from conftest import make_prepared

    ss = make_prepared("digits", tmp_path / "d", formats=("wds", "ffcv"))
    subset = ss.ids("train")[::7]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not ffcv's worker count: its own Compiler would set 1 (import) and 2 (Loader)
    try:
        loader = ss.loader("train", subset, backend="ffcv", batch_size=32, seed=3, num_workers=2)
        got = []
        for b in loader:
            assert torch.get_num_threads() == 3  # the trainer's kernels are its own, whatever ffcv sets
            for img, sid in zip(b.images, b.ids):
                np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ss.read_image("train", int(sid)))
            got.extend(b.ids.tolist())
            assert b.images.shape[1:] == (1, 8, 8) and b.images.dtype.is_floating_point is False
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == sorted(subset.tolist())


def test_shard_writer_is_byte_identical_to_tarfile(tmp_path):
    from pipeline.shards.tarshard import ShardSample, write_shard

    rng = np.random.default_rng(0)
    samples = [ShardSample(i * 7, i % 3, i, rng.bytes(int(rng.integers(1, 3000))), "png") for i in range(25)]
    rec = write_shard(tmp_path / "a.tar", tmp_path / "a.idx", samples)
    with tarfile.open(tmp_path / "b.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for name, data in ((f"{member_key(s.id)}.png", s.data), (f"{member_key(s.id)}.cls", str(s.label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert rec["bytes"] == (tmp_path / "a.tar").stat().st_size
