"""What a remote epoch costs (issue 39): a whole-split epoch fetches each shard whole, in one request, once for
all the workers, in the order a local epoch has; a small subset keeps reading byte ranges. Real servers on
127.0.0.1 (tests/servers.py); requests and bytes counted on the server's side."""

import os
import shutil

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.shards.shardset import ShardSet
from pipeline.shards.storage import ReadOptions
from pipeline.shards.upload import upload

from servers import FaultyProxy, RangeServer, moto_s3

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


def _epoch(ss, ids=None, **kw):
    """(ids, images) of one shuffled epoch, in the order delivered."""
    batches = list(ss.loader("train", ids, batch_size=64, seed=3, **kw))
    return (np.concatenate([b.ids.numpy() for b in batches]),
            np.concatenate([b.images.numpy() for b in batches]))


def _shards(ss) -> list[dict]:
    return ss.index["splits"]["train"]["shards"]


def _set_bytes(ss) -> int:
    return sum(r["bytes"] for r in _shards(ss))


@pytest.mark.parametrize("workers,kind,cache", [(2, "process", True), (2, "thread", False), (0, "auto", False)])
def test_a_whole_split_epoch_over_http_costs_one_request_per_shard_in_the_local_order(digits_set, tmp_path,
                                                                                     workers, kind, cache):
    local_ids, local_images = _epoch(digits_set, backend="stream", num_workers=workers)
    with RangeServer(digits_set.root) as srv:
        opts = ReadOptions(cache_dir=str(tmp_path / "cache"), cache_limit="1GB" if cache else "0")
        remote = ShardSet.open(srv.url, opts)
        remote.members("train")  # index.json and the .idx tables: read once per opening
        requests, sent = srv.requests, srv.bytes_sent
        ids, images = _epoch(remote, num_workers=workers, worker_kind=kind)
        np.testing.assert_array_equal(ids, local_ids)  # the same shuffle as from the folder
        np.testing.assert_array_equal(images, local_images)
        assert srv.requests - requests == len(_shards(digits_set))
        assert srv.bytes_sent - sent <= 1.05 * _set_bytes(digits_set)


def test_a_whole_split_epoch_from_s3_costs_one_get_per_shard(digits_set, tmp_path):
    with moto_s3() as (host, port):
        upload(digits_set.root, "s3://shards/epoch", progress=False)
        with FaultyProxy((host, port)) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            remote = ShardSet.open("s3://shards/epoch", ReadOptions(cache_dir=str(tmp_path / "cache")))
            remote.members("train")
            requests, back = proxy.requests, proxy.bytes_back
            ids, _ = _epoch(remote, num_workers=2, worker_kind="process")
            assert len(ids) == digits_set.count("train")
            assert proxy.requests - requests == len(_shards(digits_set))
            assert proxy.bytes_back - back <= 1.05 * _set_bytes(digits_set)


def test_a_small_subset_streamed_keeps_reading_ranges_and_a_large_one_reads_whole_shards(digits_set, tmp_path):
    all_ids = digits_set.ids("train")
    rng = np.random.default_rng(0)
    small = np.sort(rng.choice(all_ids, len(all_ids) // 10, replace=False))
    large = np.sort(rng.choice(all_ids, len(all_ids) * 7 // 10, replace=False))
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, ReadOptions(cache_limit="0"))
        remote.members("train")
        sent = srv.bytes_sent
        ids, images = _epoch(remote, small, backend="stream", num_workers=0)
        np.testing.assert_array_equal(images, _epoch(digits_set, small, backend="stream")[1])
        assert srv.bytes_sent - sent <= 0.15 * _set_bytes(digits_set)
        requests = srv.requests
        _epoch(remote, large, backend="stream", num_workers=0)
        assert srv.requests - requests == len(_shards(digits_set))


def test_a_remote_shard_that_is_not_the_one_the_index_pins_is_refused_and_not_cached(digits_set, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(digits_set.root, copy)
    rec = _shards(digits_set)[1]
    tar = copy / rec["tar"]
    data = bytearray(tar.read_bytes())
    data[-1] ^= 0xFF  # the tar's end padding: every member still matches its digest, the shard does not
    tar.write_bytes(bytes(data))
    with RangeServer(copy) as srv:
        cache = tmp_path / "cache"
        remote = ShardSet.open(srv.url, ReadOptions(cache_dir=str(cache)))
        with pytest.raises(DataError, match=r"train-000001\.tar: not the shard its index\.json records"):
            _epoch(remote, num_workers=0)
        assert not (cache / f"{rec['sha256']}.data").exists()
        assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]
