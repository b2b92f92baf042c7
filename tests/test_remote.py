"""Shard sets read from URLs: real servers on 127.0.0.1 (an HTTP server with Range support, moto's S3 API),
with faults injected; the local folder is the reference every remote read is compared with."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import DataError, PipelineError
from pipeline.shards import layout
from pipeline.shards.cache import parse_size
from pipeline.shards.shardset import ShardSet
from pipeline.shards.storage import ReadOptions, coalesce
from pipeline.shards.upload import upload
from pipeline.shards.verify import verify

from conftest import wait_for
from servers import FaultyProxy, RangeServer, moto_s3
from clirun import pipeline as pipeline_cli

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


def _images(ss, ids, **kw):
    return np.concatenate([b.images.numpy() for b in ss.loader("train", ids, batch_size=64, shuffle=False, **kw)])


def _set_bytes(ss, split="train"):
    return sum(r["bytes"] for r in ss.index["splits"][split]["shards"])


def _opts(tmp_path, **kw):
    return ReadOptions(cache_dir=str(tmp_path / "cache"), **kw)


def test_coalesced_spans_match_a_reading_of_the_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 50, 40)
        offsets = np.sort(rng.choice(4000, 40, replace=False))
        gap = int(rng.integers(0, 60))
        starts, ends, span = coalesce(offsets, sizes, gap)
        spans, cur = [], None  # by hand: extend while the next member starts within `gap` of what is covered
        for o, s in zip(offsets.tolist(), sizes.tolist()):
            if cur is not None and o - cur[1] <= gap:
                cur[1] = max(cur[1], o + s)
            else:
                cur = [o, o + s]
                spans.append(cur)
        assert [list(x) for x in zip(starts.tolist(), ends.tolist())] == spans
        assert np.all(starts[span] <= offsets) and np.all(offsets + sizes <= ends[span])


def test_a_subset_over_http_is_the_local_subset_and_costs_what_the_subset_costs(digits_set, tmp_path):
    ids = np.random.default_rng(1).choice(digits_set.ids("train"), len(digits_set.ids("train")) // 10, replace=False)
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path))
        assert remote.fingerprint == digits_set.fingerprint
        index_bytes = srv.bytes_sent
        np.testing.assert_array_equal(_images(remote, ids), _images(digits_set, ids))
        first = srv.bytes_sent - index_bytes
        assert first <= 0.15 * _set_bytes(digits_set), (first, _set_bytes(digits_set))
        np.testing.assert_array_equal(_images(remote, ids), _images(digits_set, ids))
        assert srv.bytes_sent - index_bytes == first  # the second epoch came from the cache
        assert remote.store.cache.hits == len(ids)


def test_without_a_cache_every_epoch_downloads_again_and_a_full_epoch_reads_whole_shards(digits_set, tmp_path):
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path, cache_limit="0"))
        assert remote.store.cache is None
        full = np.concatenate([b.images.numpy() for b in remote.loader("train", batch_size=128, shuffle=False)])
        local = np.concatenate([b.images.numpy() for b in digits_set.loader("train", batch_size=128, shuffle=False)])
        np.testing.assert_array_equal(full, local)
        before, requests = srv.bytes_sent, srv.requests
        ids = digits_set.ids("train")[:50]
        _images(remote, ids)
        _images(remote, ids)
        assert srv.bytes_sent > before and srv.requests - requests <= 2


def test_the_cache_stays_within_its_limit_and_evicts_the_least_recently_read(digits_set, tmp_path):
    limit = "600KiB"  # about one shard's worth of 16 px digits in 4 KiB disk blocks
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path, cache_limit=limit))
        ids = digits_set.ids("train")
        for chunk in np.array_split(ids, 6):
            np.testing.assert_array_equal(_images(remote, chunk), _images(digits_set, chunk))
            assert remote.store.cache.usage() <= parse_size(limit)
        kept = sorted(p.stem for p in (tmp_path / "cache").glob("*.data"))
        shas = [r["sha256"] for r in digits_set.index["splits"]["train"]["shards"]]
        assert kept and set(kept) <= set(shas[-2:])  # the last shards read are the ones left


def test_retries_carry_reads_through_503s_and_cut_connections(digits_set, tmp_path):
    ids = digits_set.ids("train")[::7]
    # in this process the faults fall on a fixed pattern of requests: a third answered 503, or a fifth cut off
    for faults in ({"fail_every": 3}, {"drop_every": 5}):
        with RangeServer(digits_set.root, **faults) as srv:
            remote = ShardSet.open(srv.url, _opts(tmp_path, cache_limit="0"))
            np.testing.assert_array_equal(_images(remote, ids), _images(digits_set, ids))
            assert srv.failed + srv.dropped > 10
    # two loader workers, both faults: rarer, so that no read is unlucky six times in a row
    with RangeServer(digits_set.root, fail_every=16, drop_every=25) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path, cache_limit="0"))
        np.testing.assert_array_equal(_images(remote, ids, num_workers=2), _images(digits_set, ids))
        assert srv.failed and srv.dropped
    with RangeServer(digits_set.root, fail_every=1) as srv:
        with pytest.raises(DataError, match=r"index.json: 1 read\(s\) still failing after 2 retries"):
            ShardSet.open(srv.url, _opts(tmp_path, retries=2))


def test_a_slow_server_times_out_into_one_message(digits_set, tmp_path):
    with RangeServer(digits_set.root, delay=1.0) as srv:
        with pytest.raises(DataError, match=f"{srv.url}/index.json: .*still failing after 0 retries"):
            ShardSet.open(srv.url, _opts(tmp_path, retries=0, timeout=0.2))


def test_a_missing_object_is_one_line_naming_its_url(digits_set, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(digits_set.root, copy)
    (copy / digits_set.index["splits"]["train"]["shards"][1]["tar"]).unlink()
    with RangeServer(copy) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path))
        with pytest.raises(DataError, match=r"/train-000001\.tar: missing; check the URL"):
            _images(remote, digits_set.ids("train"))
        with pytest.raises(DataError, match=r"/nothing-here/index.json: missing"):
            ShardSet.open(srv.url + "/nothing-here", _opts(tmp_path))


def test_a_damaged_remote_member_is_refused_and_never_cached(digits_set, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(digits_set.root, copy)
    rec = digits_set.index["splits"]["train"]["shards"][0]
    table = layout.read_member_table(copy / rec["idx"])
    tar = copy / rec["tar"]
    data = bytearray(tar.read_bytes())
    data[int(table["offset"][3]) + 5] ^= 0xFF  # same size, one bit pattern changed inside sample 3's image
    tar.write_bytes(bytes(data))
    with RangeServer(copy) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path))
        ids = digits_set.ids("train")[:10]
        with pytest.raises(DataError, match=r"train-000000\.tar: the member at byte \d+ does not match the digest"):
            _images(remote, ids)
        have = tmp_path / "cache" / f"{rec['sha256']}.have"
        assert not have.exists() or not np.fromfile(have, np.uint8)[3]
        problems = verify(srv.url, progress=False, options=_opts(tmp_path))
        assert any(srv.url in p and "digest" in p for p in problems), problems


def test_format_1_sets_read_locally_but_not_remotely(digits_set, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(digits_set.root, copy)
    index = json.loads((copy / layout.INDEX_NAME).read_text())
    index["format_version"] = 1
    for info in index["splits"].values():
        for rec in info["shards"]:
            t = layout.read_member_table(copy / rec["idx"])
            old = np.zeros(len(t), layout.MEMBER_DTYPE_V1)
            for name in layout.MEMBER_DTYPE_V1.names:
                old[name] = t[name]
            np.save(copy / rec["idx"], old)
            os.replace(copy / (rec["idx"] + ".npy"), copy / rec["idx"])
            del rec["idx_bytes"], rec["idx_sha256"]  # format 1 pinned no member tables
    (copy / layout.INDEX_NAME).write_text(json.dumps(index))
    old_set = ShardSet.open(copy)
    ids = digits_set.ids("train")[:20]
    np.testing.assert_array_equal(_images(old_set, ids), _images(digits_set, ids))
    assert verify(copy, progress=False) == []
    with RangeServer(copy) as srv:
        with pytest.raises(DataError, match="format-1 shard set, whose members carry no digests"):
            ShardSet.open(srv.url, _opts(tmp_path))


def test_upload_verify_and_read_through_s3_with_dropped_connections(digits_set, tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    ids = np.sort(np.random.default_rng(2).choice(digits_set.ids("train"), 150, replace=False))
    with moto_s3() as (host, port):
        result = upload(digits_set.root, "s3://shards/digits", progress=False)
        assert result.kept == 0 and result.uploaded == 1 + 2 * sum(
            len(i["shards"]) for i in digits_set.index["splits"].values())
        assert verify("s3://shards/digits", progress=False) == []
        again = upload(digits_set.root, "s3://shards/digits", progress=False)  # a complete upload, resumed: nothing sent
        assert again.bytes == 0
        with FaultyProxy((host, port), drop_every=3) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            remote = ShardSet.open("s3://shards/digits", _opts(tmp_path, cache_limit="0"))
            np.testing.assert_array_equal(_images(remote, ids, num_workers=2), _images(digits_set, ids))
            assert proxy.connections >= 3
        os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
        other = tmp_path / "other"  # a healthy set of another fingerprint: the same shards, classes renamed
        shutil.copytree(digits_set.root, other)
        index = json.loads((other / layout.INDEX_NAME).read_text())
        index["classes"] = [c + "x" for c in index["classes"]]
        index["fingerprint"] = layout.fingerprint(index["classes"], index["image"], index["splits"])
        (other / layout.INDEX_NAME).write_text(json.dumps(index))
        with pytest.raises(PipelineError, match="already holds another shard set"):
            upload(other, "s3://shards/digits", progress=False)


def test_an_interrupted_upload_resumes_and_a_foreign_prefix_is_refused(digits_set, tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import boto3

    with moto_s3() as _:
        s3 = boto3.client("s3")
        s3.put_object(Bucket="shards", Key="theirs/train-000000.tar", Body=b"someone else's")
        with pytest.raises(PipelineError, match="theirs/train-000000.tar: already exists and this tool did not put"):
            upload(digits_set.root, "s3://shards/theirs", progress=False)
        assert s3.get_object(Bucket="shards", Key="theirs/train-000000.tar")["Body"].read() == b"someone else's"
        upload(digits_set.root, "s3://shards/mine", progress=False)
        s3.delete_object(Bucket="shards", Key="mine/index.json")  # as if it stopped before the last step,
        s3.delete_object(Bucket="shards", Key="mine/test-000000.tar")  # and before one shard
        s3.put_object(Bucket="shards", Key="mine/.pipeline-upload.json",
                      Body=json.dumps({"fingerprint": digits_set.fingerprint}).encode())
        resumed = upload(digits_set.root, "s3://shards/mine", progress=False)
        assert resumed.uploaded == 2 and resumed.kept > 0
        assert verify("s3://shards/mine", progress=False) == []
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="shards", Prefix="mine/")["Contents"]}
        assert "mine/.pipeline-upload.json" not in keys and "mine/index.json" in keys
        for damaged in (b"[1, 2]", b"\xff\xfe", b'{"fingerprint": 5}'):  # issue 39: one line, not a traceback
            s3.put_object(Bucket="shards", Key="torn/.pipeline-upload.json", Body=damaged)
            with pytest.raises(PipelineError, match="torn/.pipeline-upload.json: a damaged upload marker"):
                upload(digits_set.root, "s3://shards/torn", progress=False)


def test_the_cli_verifies_inspects_and_streams_a_url(digits_set, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    with RangeServer(digits_set.root) as srv:
        for args in (["verify", srv.url], ["inspect", srv.url], ["stream", srv.url, "--batch-size", "256"]):
            r = pipeline_cli(*args, env=env)
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        assert "1,438 images" in r.stdout + r.stderr
        r = pipeline_cli("inspect", srv.url + "/absent", env=env)
        assert r.returncode != 0 and "absent/index.json: missing" in r.stdout + r.stderr
        assert "Traceback" not in r.stdout + r.stderr


def test_training_on_a_manifest_of_a_set_in_s3_matches_training_on_the_folder(digits_set, tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.shards.manifest import Manifest
    from pipeline.trainers import create_trainer
    from test_train import tiny_cfg

    ids = np.random.default_rng(3).choice(digits_set.ids("train"), 256, replace=False)
    manifest = Manifest.for_shardset(digits_set, "train", ids, producer={"name": "test"}, round=1)
    manifest.save(tmp_path / "subset.json")
    over = {"data.manifest": str(tmp_path / "subset.json"), "optim.epochs": 1, "data.cache_dir": str(tmp_path / "c")}
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "local", **over), progress=False).fit()
    with moto_s3():
        upload(digits_set.root, "s3://shards/digits", progress=False)
        create_trainer(tiny_cfg("s3://shards/digits", tmp_path / "s3", **over), progress=False).fit()
    a = load_checkpoint(tmp_path / "local" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "s3" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_run_on_s3_killed_inside_an_epoch_resumes_bit_identically(digits_set, tmp_path):
    """The issue's end-to-end case: a 10% manifest of a set in (loopback) S3, `kill -9` in the middle of an epoch,
    `--resume`, and the same weights as an uninterrupted run."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import signal

    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.shards.manifest import Manifest
    from test_train import tiny_cfg

    ids = np.random.default_rng(4).choice(digits_set.ids("train"), 320, replace=False)
    Manifest.for_shardset(digits_set, "train", ids, producer={"name": "test"}, round=1).save(tmp_path / "m.json")
    over = {"data.manifest": str(tmp_path / "m.json"), "optim.epochs": 2, "run.checkpoint_every_steps": 2,
            "data.workers": 2, "data.cache_dir": str(tmp_path / "cache")}
    # the straight run in a process of its own too: all three start from the same interpreter state (an earlier
    # test in this process may have left a global that changes kernels)
    tiny_cfg(digits_set.root, tmp_path / "straight", **over).save(tmp_path / "straight.toml")
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(tmp_path / "straight.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with moto_s3():
        upload(digits_set.root, "s3://shards/digits", progress=False)
        tiny_cfg("s3://shards/digits", tmp_path / "killed", **over).save(tmp_path / "run.toml")
        run = tmp_path / "killed"
        cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(tmp_path / "run.toml")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        last = run / "checkpoints" / "last.pt"

        def mid_epoch():
            ckpt = load_checkpoint(last) if last.exists() else {}
            # a later epoch's first mid-epoch checkpoint (step 2 of 5): 3 steps before the epoch's end
            # replaces last.pt, however slowly the kill arrives
            return ckpt.get("epoch", 0) >= 1 and ckpt.get("step_in_epoch") == 2

        wait_for(mid_epoch, proc, "the mid-epoch checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        stopped = load_checkpoint(last)
        assert stopped["step_in_epoch"] > 0
        r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--resume", str(run)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"step {stopped['step_in_epoch']}" in r.stdout + r.stderr
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


_READER = """
import sys, numpy as np
from pipeline.shards.shardset import ShardSet
from pipeline.shards.storage import ReadOptions
ss = ShardSet.open(sys.argv[1], ReadOptions(cache_dir=sys.argv[2]))
ids = np.load(sys.argv[3])
images = np.concatenate([b.images.numpy() for b in ss.loader("train", ids, batch_size=32, shuffle=True,
                                                              num_workers=2, seed=int(sys.argv[5]))])
order = np.concatenate([b.ids.numpy() for b in ss.loader("train", ids, batch_size=32, shuffle=True,
                                                         num_workers=2, seed=int(sys.argv[5]))])
np.save(sys.argv[4], images[np.argsort(order)])
"""


def test_processes_and_workers_sharing_one_cache_read_correctly_and_fill_it_once(digits_set, tmp_path):
    ids = np.sort(np.random.default_rng(5).choice(digits_set.ids("train"), 400, replace=False))
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "reader.py").write_text(_READER)
    expected = _images(digits_set, ids)
    cache = tmp_path / "shared-cache"
    with RangeServer(digits_set.root, delay=0.002) as srv:
        procs = [subprocess.Popen([sys.executable, str(tmp_path / "reader.py"), srv.url, str(cache),
                                   str(tmp_path / "ids.npy"), str(tmp_path / f"out{k}.npy"), str(k)])
                 for k in range(3)]  # three processes of two workers each, different orders, at once
        assert [p.wait() for p in procs] == [0, 0, 0]
        for k in range(3):
            np.testing.assert_array_equal(np.load(tmp_path / f"out{k}.npy"), expected)
        before = srv.bytes_sent
        remote = ShardSet.open(srv.url, ReadOptions(cache_dir=str(cache)))
        after_index = srv.bytes_sent
        np.testing.assert_array_equal(_images(remote, ids), expected)
        assert srv.bytes_sent - after_index <= sum(  # only the member tables: every image came from the cache
            (digits_set.root / r["idx"]).stat().st_size for r in digits_set.index["splits"]["train"]["shards"])
        assert after_index > before


def test_a_cache_that_cannot_be_written_warns_and_reading_goes_on(digits_set, tmp_path, capsys):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    ids = digits_set.ids("train")[:100]
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, ReadOptions(cache_dir=str(blocked / "cache")))
        np.testing.assert_array_equal(_images(remote, ids), _images(digits_set, ids))
    assert "the shard cache stops here" in capsys.readouterr().err and remote.store.cache is None


def test_a_server_that_ignores_range_is_read_whole_at_once_not_retried(digits_set, tmp_path, capsys):
    """`python -m http.server` answers a Range request with 200 and the whole file (issue 39): detected at the
    first answer, said in one line, and each shard then read whole with one request, never retried."""
    ids = np.random.default_rng(2).choice(digits_set.ids("train"), 200, replace=False)
    with RangeServer(digits_set.root, ignore_range=True) as srv:
        remote = ShardSet.open(srv.url, _opts(tmp_path, cache_limit="0", retries=1))
        before = srv.requests
        np.testing.assert_array_equal(_images(remote, ids), _images(digits_set, ids))
        first = srv.requests - before
        assert first < 64  # fewer than a request per member of the first batch: no retries, no range reads after
        np.testing.assert_array_equal(_images(remote, ids), _images(digits_set, ids))
        assert srv.requests - before == first  # the whole shards were kept: the second pass asked for nothing
    assert "ignores Range requests" in capsys.readouterr().err


def test_a_redirect_to_another_address_is_not_followed(digits_set, tmp_path):
    """A shard server that redirects to another origin (issue 39: a private address, say) is refused in one
    line naming the target, and the other address is never asked."""
    with RangeServer(digits_set.root) as elsewhere:
        with RangeServer(digits_set.root, redirect_to=elsewhere.url) as srv:
            with pytest.raises(DataError, match="redirects it to another address .*127.0.0.1:.*not followed"):
                ShardSet.open(srv.url, _opts(tmp_path, retries=0))
            assert elsewhere.requests == 0


def test_reads_from_a_server_are_bounded(digits_set, tmp_path, monkeypatch):
    """An endless index.json stops at the stated limit (issue 39: one took the client to 7.5 GB), and verify
    never downloads a shard beyond its recorded size (one filled the disk)."""
    import pipeline.shards.remote as storage

    monkeypatch.setattr(storage, "READ_LIMIT", 1 << 20)
    with RangeServer(digits_set.root, endless="index.json") as srv:
        with pytest.raises(DataError, match=r"index.json: larger than the 1,048,576 bytes this tool reads"):
            ShardSet.open(srv.url, _opts(tmp_path, retries=0))
    tar = digits_set.index["splits"]["train"]["shards"][0]["tar"]
    with RangeServer(digits_set.root, endless=tar) as srv:
        problems = verify(srv.url, progress=False)
    assert any(tar in p for p in problems)
    assert not list(tmp_path.rglob(tar))
