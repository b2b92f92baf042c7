"""What index.json pins, what an upload keeps, what a remote miss says (issue 39): every file the index names is
checked by size and SHA-256 before use, so a consistent .tar + .idx pair from another preparation is refused,
locally and remotely; a resumed upload keeps an object only when its bytes are the file's, not merely its
size; a set whose shards are all cached trains with the server gone; a missing bucket, a missing object and an
over-long one are each named for what they are."""

import json
import shutil

import numpy as np
import pytest

from pipeline.errors import DataError, PipelineError
from pipeline.shards import remote
from pipeline.shards.shardset import ShardSet
from pipeline.shards.storage import ReadOptions
from pipeline.shards.upload import upload
from pipeline.shards.verify import verify

from conftest import make_prepared
from servers import RangeServer, moto_s3

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


def test_a_shard_and_table_from_another_preparation_are_refused_everywhere(digits_set, tmp_path):
    other = make_prepared("digits", tmp_path / "other", shard_size=300, seed=1)
    mine = tmp_path / "mine"
    shutil.copytree(digits_set.root, mine)
    for ext in ("tar", "idx"):  # a consistent pair: its members match its own table, not this set's index
        shutil.copy(other.root / f"train-000000.{ext}", mine / f"train-000000.{ext}")
    assert not np.array_equal(other.labels("train")[:300], digits_set.labels("train")[:300])
    needle = r"train-000000\.idx: not the member table index\.json records"
    with pytest.raises(DataError, match=needle):
        ShardSet.open(mine).members("train")
    assert any("not the member table index.json records" in p for p in verify(mine, progress=False))
    with RangeServer(mine) as srv:
        with pytest.raises(DataError, match=needle):
            ShardSet.open(srv.url, ReadOptions(cache_limit="0")).loader("train", batch_size=64)


@pytest.mark.parametrize("service_md5", [True, False], ids=["by-service-md5", "read-back"])
def test_a_resumed_upload_replaces_an_object_that_merely_has_the_right_size(digits_set, tmp_path, monkeypatch,
                                                                           service_md5):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import boto3

    if not service_md5:
        monkeypatch.setattr(remote, "service_md5", lambda info: None)
    with moto_s3() as _:
        s3 = boto3.client("s3")
        upload(digits_set.root, "s3://shards/mine", progress=False)
        key = "mine/train-000001.tar"
        body = bytearray(s3.get_object(Bucket="shards", Key=key)["Body"].read())
        body[1000] ^= 0xFF  # same size, other bytes
        s3.put_object(Bucket="shards", Key=key, Body=bytes(body))
        s3.delete_object(Bucket="shards", Key="mine/index.json")  # as if it stopped before the last step
        s3.put_object(Bucket="shards", Key="mine/.pipeline-upload.json",
                      Body=json.dumps({"fingerprint": digits_set.fingerprint}).encode())
        resumed = upload(digits_set.root, "s3://shards/mine", progress=False)
        assert resumed.uploaded == 2 and resumed.kept > 0  # the damaged shard and index.json
        assert s3.get_object(Bucket="shards", Key=key)["Body"].read() == (digits_set.root / "train-000001.tar").read_bytes()
        assert verify("s3://shards/mine", progress=False) == []


def test_a_set_prepared_before_the_pin_still_reads(digits_set, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(digits_set.root, old)
    index = json.loads((old / "index.json").read_text())
    for info in index["splits"].values():
        for rec in info["shards"]:
            del rec["idx_bytes"], rec["idx_sha256"]
    (old / "index.json").write_text(json.dumps(index))
    assert verify(old, progress=False) == []
    np.testing.assert_array_equal(ShardSet.open(old).labels("train"), digits_set.labels("train"))
    with pytest.raises(PipelineError, match="idx_sha256"):  # half a pin is a damaged index
        index["splits"]["train"]["shards"][0]["idx_bytes"] = 5
        (old / "index.json").write_text(json.dumps(index))
        ShardSet.open(old)


def test_a_fully_cached_set_trains_offline_and_an_uncached_one_says_why_not(digits_set, tmp_path, capfd):
    opts = ReadOptions(cache_dir=str(tmp_path / "cache"), retries=1, timeout=5)
    local_ids = np.concatenate([b.ids.numpy() for b in digits_set.loader("train", batch_size=64, seed=2)])
    with RangeServer(digits_set.root) as srv:
        url = srv.url
        for _ in ShardSet.open(url, opts).loader("train", batch_size=64, seed=5):
            pass  # one whole epoch: every shard is now in the cache
    capfd.readouterr()
    offline = ShardSet.open(url, opts)  # the server is gone
    assert "Using the copy of index.json cached" in capfd.readouterr().err
    ids = np.concatenate([b.ids.numpy() for b in offline.loader("train", batch_size=64, seed=2)])
    np.testing.assert_array_equal(ids, local_ids)
    with pytest.raises(DataError, match=r"index\.json: 1 read\(s\) still failing after 1 retries"):
        ShardSet.open(url, ReadOptions(cache_dir=str(tmp_path / "empty"), retries=1, timeout=5))


def test_remote_misses_name_what_is_missing(digits_set, tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import boto3

    with moto_s3() as _:
        with pytest.raises(DataError, match="the bucket 'no-such-bucket' does not exist"):
            ShardSet.open("s3://no-such-bucket/set", ReadOptions(cache_limit="0"))
        upload(digits_set.root, "s3://shards/set", progress=False)
        s3 = boto3.client("s3")
        s3.delete_object(Bucket="shards", Key="set/train-000002.tar")
        longer = (digits_set.root / "train-000003.tar").read_bytes() + b"\0" * 512
        s3.put_object(Bucket="shards", Key="set/train-000003.tar", Body=longer)
        problems = verify("s3://shards/set", progress=False)
        assert any("set/train-000002.tar: missing; check the URL" in p for p in problems), problems
        assert any("set/train-000003.tar: larger than the" in p and "bytes index.json records" in p
                   for p in problems), problems
