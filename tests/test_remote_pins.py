"""What index.json pins, and what an upload keeps (issue 39): every file the index names is checked by size
and SHA-256 before use, so a consistent .tar + .idx pair from another preparation is refused, locally and
remotely; a resumed upload keeps an object only when its bytes are the file's, not merely its size."""

import json
import shutil

import numpy as np
import pytest

from pipeline.errors import DataError, PipelineError
from pipeline.shards import storage
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
        monkeypatch.setattr(storage, "_service_md5", lambda info: None)
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
