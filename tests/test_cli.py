"""The command line: real invocations, exit codes, one-line errors, no tracebacks."""


import pytest

from pipeline.shards.manifest import Manifest
from pipeline.shards.shardset import ShardSet
from clirun import pipeline as pipeline_cli


def run(*args, cwd=None):
    return pipeline_cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits"
    r = run("prepare", "digits", "--out", out, "--shard-size", "500", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "1,438" in r.stderr and "images/s" in r.stderr
    return out


def test_verify_healthy_then_damaged(prepared, tmp_path):
    assert run("verify", prepared).returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / "test-000000.idx").unlink()
    r = run("verify", copy)
    assert r.returncode == 1
    assert "train-000001.tar: content digest differs" in r.stderr
    assert "test-000000.idx: missing" in r.stderr
    assert "Traceback" not in r.stderr


def test_inspect_shardset_and_manifest(prepared, tmp_path):
    r = run("inspect", prepared)
    assert r.returncode == 0 and "fingerprint" in r.stderr and "1,438" in r.stderr
    ss = ShardSet.open(prepared)
    Manifest.for_shardset(ss, "train", ss.ids("train")[:100], producer={"name": "random"}, fraction=0.07).save(
        tmp_path / "m.json")
    r = run("inspect", tmp_path / "m.json", "--data", prepared)
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr and "per class" in r.stderr and "7.0%" in r.stderr


def test_stream_command(prepared, tmp_path):
    r = run("stream", prepared, "--split", "test", "--batch-size", "64")
    assert r.returncode == 0, r.stderr
    assert "359 images (1x8x8" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (("prepare", "nope"), "unknown source"),
    (("prepare", "folder:/definitely/missing"), "no such folder"),
    (("verify", "/definitely/missing"), "no such shard-set folder"),
    (("inspect", "/definitely/missing.json"), "no such manifest"),
    (("stream", "/definitely/missing"), "no such shard-set folder"),
])
def test_bad_input_is_one_line_and_non_zero(args, needle):
    r = run(*args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_stale_manifest_refused_by_stream(prepared, tmp_path):
    ss = ShardSet.open(prepared)
    m = Manifest(ids=ss.ids("train")[:10], split="train", dataset_fingerprint="0" * 32)
    m.save(tmp_path / "stale.json")
    r = run("stream", prepared, "--manifest", tmp_path / "stale.json")
    assert r.returncode == 1 and "fingerprint" in r.stderr and "Traceback" not in r.stderr
