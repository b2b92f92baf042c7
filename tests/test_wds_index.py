"""`pipeline index` (issue 41): the project's index over WebDataset shards written by the stock `webdataset`
writer, in place or over HTTP by range requests; the indexed set reads, verifies, subsets and trains like a
prepared one, and not a byte of the shards changes."""

import hashlib
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.errors import DataError, PipelineError
from pipeline.shards import layout
from pipeline.shards.shardset import ShardSet
from pipeline.shards.verify import verify
from pipeline.shards.wds_index import index_shards
from pipeline.trainers import create_trainer

from clirun import pipeline as pipeline_cli
from servers import RangeServer
from test_train import tiny_cfg

SIDE = 96  # random PNGs of about 27 KB: the 8 KiB header windows read a fraction of the shards


def _encoded(pix, fmt):
    buf = io.BytesIO()
    Image.fromarray(pix).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_wds(folder, counts=(("train", 40), ("val", 12)), per_shard=16, seed=0):
    """Shards by `webdataset.ShardWriter`; returns ({key: (pixels as PIL decodes the stored bytes, label)},
    {key: why it must be skipped})."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth, broken = {}, {}
    for split, n in counts:
        with wds.ShardWriter(str(folder / f"ds-{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(n):
                key = f"{split}{i:04d}"
                pix = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
                fmt, ext = ("JPEG", "jpg") if i % 3 == 1 else ("PNG", "png")
                data, label = _encoded(pix, fmt), int(rng.integers(0, 5))
                sample = {"__key__": key, ext: data}
                if i % 7 == 2:
                    sample["json"] = {"label": label, "source": "x"}
                elif i % 7 == 4:
                    sample["label"] = str(label)
                else:
                    sample["cls"] = label
                if i == 3:
                    sample = {"__key__": key, ext: data}  # no label
                    broken[key] = "0 labels"
                elif i == 5:
                    sample["txt"] = "a caption, left alone"
                elif i == 6:
                    sample["webp"] = _encoded(pix, "WEBP")  # two images
                    broken[key] = "2 images"
                elif i == 8:
                    sample["cls"] = "dog"  # not a class number
                    broken[key] = "not a class number"
                if key not in broken:
                    truth[key] = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), label)
                sink.write(sample)
    return truth, broken


def _digest_tree(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _check_round_trip(ss, truth):
    keys = sorted(truth)  # ShardWriter keeps the order: ids follow the shards' order, train first
    train = [k for k in keys if k.startswith("train")]
    test = [k for k in keys if k.startswith("val")]
    assert (ss.count("train"), ss.count("test")) == (len(train), len(test))
    for split, ks in (("train", train), ("test", test)):
        ids = ss.ids(split)
        assert list(ss.labels(split)) == [truth[k][1] for k in ks]
        for sample_id, k in zip(ids.tolist(), ks):
            np.testing.assert_array_equal(ss.read_image(split, sample_id), truth[k][0])
    assert list(ss.ids("train")) == list(range(len(train)))


def test_index_in_place_round_trips_and_rewrites_nothing(tmp_path):
    shards = tmp_path / "shards"
    truth, broken = write_wds(shards)
    before = _digest_tree(shards)
    r = index_shards(str(shards), progress=False)
    assert _digest_tree(shards) == before  # not a byte of a shard rewritten
    assert sorted(p.name for p in shards.iterdir() if not p.name.endswith(".tar")) == sorted(
        ["index.json", *(f"train-{n:06d}.idx" for n in range(3)), "test-000000.idx"])
    ss = ShardSet.open(shards)
    assert "shards_at" not in ss.index and ss.image_size == SIDE and ss.mode == "RGB"
    assert ss.classes == ["0", "1", "2", "3", "4"][: len(ss.classes)]
    _check_round_trip(ss, truth)
    reasons = {s["key"]: s["reason"] for s in r.skipped}
    assert set(reasons) == set(broken)
    assert all(why in reasons[k] for k, why in broken.items())
    assert 0 < r.bytes_read < 0.5 * sum(p.stat().st_size for p in shards.glob("*.tar"))  # headers, not images
    assert verify(shards, progress=False) == []


def test_index_over_http_reads_headers_by_range_and_streams_like_the_folder(tmp_path):
    shards = tmp_path / "www" / "shards"
    truth, _ = write_wds(shards)
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    with RangeServer(tmp_path / "www") as srv:
        url = f"{srv.url}/shards/ds-{{train-{{000000..000002}},val-000000}}.tar"
        r = index_shards(url, out=tmp_path / "index", progress=False)
        assert r.requests > 0 and r.bytes_read < 0.5 * total, (r.bytes_read, total)
        assert srv.bytes_sent - r.bytes_read < 64 * 1024  # what it says it moved is what the server sent (+ HEADs)
        ss = ShardSet.open(tmp_path / "index")
        assert ss.index["shards_at"] == f"{srv.url}/shards" and ss.index["member_digests"] is False
        _check_round_trip(ss, truth)
        batches = list(ss.loader("train", batch_size=8, shuffle=False))
        assert sum(len(b.ids) for b in batches) == ss.count("train")
        assert verify(tmp_path / "index", progress=False) == []
    local = tmp_path / "local"
    local.mkdir()
    for p in shards.glob("*.tar"):
        (local / p.name).write_bytes(p.read_bytes())
    assert ShardSet.open(tmp_path / "index").fingerprint == index_shards(str(local), progress=False).index["fingerprint"]


def test_digests_make_reads_checked_and_verify_finds_a_changed_byte(tmp_path):
    shards = tmp_path / "shards"
    write_wds(shards, counts=(("train", 20), ("val", 6)))
    r = index_shards(str(shards), digests=True, progress=False)
    assert r.bytes_read >= sum(p.stat().st_size for p in shards.glob("*.tar"))  # every byte, said so
    ss = ShardSet.open(shards)
    table = ss.members("train")
    assert table.digests.all() and all(rec["sha256"] for rec in ss.index["splits"]["train"]["shards"])
    assert verify(shards, progress=False) == []
    tar = shards / ss.index["splits"]["train"]["shards"][0]["tar"]
    data = bytearray(tar.read_bytes())
    at = int(table.offsets[1]) + 40
    data[at] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify(shards, progress=False)
    assert problems and all(str(tar) in p for p in problems) and any("not what index.json records" in p for p in problems)


def test_an_indexed_set_subsets_and_trains(tmp_path):
    shards = tmp_path / "shards"
    write_wds(shards)
    index_shards(str(shards), progress=False)
    manifest = tmp_path / "m.json"
    r = pipeline_cli("select", "--data", str(shards), "--selector", "random", "--fraction", "0.5", "--out", str(manifest))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    create_trainer(tiny_cfg(shards, run, **{"optim.epochs": 1, "optim.warmup_epochs": 0, "data.batch_size": 8,
                                            "data.manifest": str(manifest)}), progress=False).fit()
    assert (run / "checkpoints" / "last.pt").is_file()


def test_the_cli_indexes_and_says_what_it_read(tmp_path):
    shards = tmp_path / "shards"
    write_wds(shards, counts=(("train", 10), ("holdout", 5)))
    classes = tmp_path / "classes.txt"
    classes.write_text("ant\nbee\ncat\ndog\neel\n")
    r = pipeline_cli("index", str(shards), "--split", "train=*-train-*", "--split", "test=*-holdout-*",
                     "--classes", str(classes), "--name", "mine")
    assert r.returncode == 0, r.stderr
    said = " ".join((r.stdout + r.stderr).split())
    assert "tar headers and label members only" in said and "skipped" in said
    ss = ShardSet.open(shards)
    assert ss.name == "mine" and ss.classes == ["ant", "bee", "cat", "dog", "eel"] and set(ss.splits) == {"train", "test"}
    again = pipeline_cli("index", str(shards))
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert pipeline_cli("index", str(shards), "--overwrite").returncode == 0


def test_bad_shards_and_places_are_one_line(tmp_path, digits_set):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="no .tar shards found"):
        index_shards(str(empty), progress=False)
    (empty / "notes.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(DataError, match="notes.tar: not a readable tar"):
        index_shards(str(empty), progress=False)
    with pytest.raises(PipelineError, match="--split"):
        index_shards(str(empty), splits=["train"], progress=False)
    with pytest.raises(PipelineError, match="no shard matches"):
        index_shards(str(empty), splits=["train=*-train-*"], progress=False)
    with pytest.raises(PipelineError, match="give --out"):
        index_shards("http://127.0.0.1:9/x/a-{0..1}.tar", progress=False)
    prepared = tmp_path / "prepared"  # a prepared set's index is never replaced
    prepared.mkdir()
    (prepared / "index.json").write_text((digits_set.root / "index.json").read_text())
    write_wds(prepared, counts=(("train", 4),))
    with pytest.raises(PipelineError, match="not written by `pipeline index`"):
        index_shards(str(prepared), overwrite=True, progress=False)
    r = pipeline_cli("index", str(empty))
    assert r.returncode != 0 and "notes.tar" in r.stderr and "Traceback" not in r.stderr


def test_an_edited_index_is_refused(tmp_path):
    shards = tmp_path / "shards"
    write_wds(shards, counts=(("train", 8),))
    index_shards(str(shards), progress=False)
    index = json.loads((shards / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["tar"] = "../outside.tar"
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="tar"):
        layout.load_index(shards)


def test_index_a_bucket_by_its_listing_and_read_it_with_digests(tmp_path):
    """s3:// (moto on 127.0.0.1): the bucket's listing finds the shards; with --digests the reads are checked."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from servers import moto_s3

    shards = tmp_path / "shards"
    truth, _ = write_wds(shards, counts=(("train", 20), ("val", 6)))
    with moto_s3():
        s3 = boto3.client("s3")
        for p in shards.glob("*.tar"):
            s3.upload_file(str(p), "shards", f"wds/{p.name}")
        r = index_shards("s3://shards/wds", out=tmp_path / "index", digests=True, progress=False)
        assert r.requests == len(list(shards.glob("*.tar")))  # one read a shard: every byte once
        ss = ShardSet.open(tmp_path / "index")
        assert ss.index["shards_at"] == "s3://shards/wds" and ss.members("train").digests.all()
        _check_round_trip(ss, truth)


def test_only_its_own_member_tables_are_replaced(tmp_path):
    shards = tmp_path / "shards"
    write_wds(shards, counts=(("train", 40),))
    (shards / "train-000001.idx").write_text("someone else's file")
    with pytest.raises(PipelineError, match="train-000001.idx: exists and is not a member table"):
        index_shards(str(shards), progress=False)
    assert (shards / "train-000001.idx").read_text() == "someone else's file" and not (shards / "index.json").exists()
    (shards / "train-000001.idx").unlink()
    index_shards(str(shards), progress=False)
    for p in sorted(shards.glob("ds-train-00000[12].tar")):  # fewer shards: the index is made again, smaller
        p.unlink()
    index_shards(str(shards), overwrite=True, progress=False)
    assert sorted(p.name for p in shards.glob("*.idx")) == ["train-000000.idx"]  # its stale tables are gone
    assert ShardSet.open(shards).count("train") == 16 - 3  # the first shard: 16 less samples 3, 6 and 8 (broken)


def test_upload_takes_an_indexed_set_only_with_digests_and_its_shards(tmp_path):
    from pipeline.shards.upload import upload

    shards = tmp_path / "shards"
    write_wds(shards, counts=(("train", 8),))
    index_shards(str(shards), progress=False)
    with pytest.raises(PipelineError, match="--digests --overwrite"):
        upload(shards, "s3://bucket/x", progress=False)
    index_shards(str(shards), out=tmp_path / "elsewhere", digests=True, progress=False)
    with pytest.raises(PipelineError, match="indexes shards kept at"):
        upload(tmp_path / "elsewhere", "s3://bucket/x", progress=False)
