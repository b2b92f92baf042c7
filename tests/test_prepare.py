"""prepare: resume after interruption, corrupt inputs, parallel workers, settings changes."""

import json
import os

import numpy as np
import pytest

from conftest import make_prepared, write_image_folder
from pipeline.errors import PipelineError
from pipeline.shards.prepare import JOURNAL_NAME, PrepareOptions, prepare


def test_truncated_last_shard_resumes_to_same_fingerprint(tmp_path):
    out = tmp_path / "syn"
    first = make_prepared("synthetic:600", out, shard_size=100)
    fp = first.fingerprint
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # Simulate a kill while the last shard was being written: truncated shard, no index.json yet.
    last = out / first.index["splits"]["test"]["shards"][-1]["tar"]
    last.write_bytes(last.read_bytes()[:3000])
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").unlink()
    with open(out / JOURNAL_NAME, "w") as j:
        j.write(json.dumps({"recipe": index["recipe"]}) + "\n")
        for split, info in index["splits"].items():
            for rec in info["shards"]:
                j.write(json.dumps(dict(rec, split=split, skipped=[], shapes=[[32, 32]], exts=["png"])) + "\n")
        j.write('{"split": "test", "shard"')  # a line cut short by the kill
    result = prepare("synthetic:600", PrepareOptions(out=out, shard_size=100, progress=False))
    assert result.index["fingerprint"] == fp
    assert result.written == first.index["splits"]["test"]["shards"][-1]["count"]  # only that shard redone
    redone = {p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert redone == {last.name}
    assert not (out / JOURNAL_NAME).exists()


def test_rerun_of_complete_set_does_nothing(tmp_path):
    make_prepared("digits", tmp_path / "d")
    again = prepare("digits", PrepareOptions(out=tmp_path / "d", progress=False))
    assert again.written == 0


def test_parallel_workers_give_identical_shards(tmp_path):
    a = make_prepared("synthetic:500", tmp_path / "a", shard_size=60, workers=1)
    b = make_prepared("synthetic:500", tmp_path / "b", shard_size=60, workers=2)
    assert a.fingerprint == b.fingerprint
    assert len(a.index["splits"]["train"]["shards"]) == 7


def test_seed_changes_order_not_content(tmp_path):
    a = make_prepared("digits", tmp_path / "a", seed=0)
    b = make_prepared("digits", tmp_path / "b", seed=1)
    assert a.fingerprint != b.fingerprint
    assert a.count("train") == b.count("train")


def test_corrupt_and_truncated_files_are_skipped_and_reported(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, fmt="jpg", n_per_class=5)
    (root / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = (root / "dog" / "000.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "eel" / "notes.txt").write_text("not an image")
    ss = make_prepared(f"folder:{root}", tmp_path / "out", test_fraction=0.0)
    assert ss.count("train") == 15
    reasons = {s["source"]: s["reason"] for s in ss.index["skipped"]}
    assert set(reasons) == {"cat/bad.jpg", "dog/cut.jpg", "eel/notes.txt"}
    assert "truncated" in reasons["dog/cut.jpg"].lower()


def test_all_images_corrupt_is_an_error(tmp_path):
    (tmp_path / "x" / "a").mkdir(parents=True)
    (tmp_path / "x" / "a" / "1.png").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="failed to decode"):
        prepare(f"folder:{tmp_path / 'x'}", PrepareOptions(out=tmp_path / "o", test_fraction=0, progress=False))


def test_other_settings_into_same_folder_refused_unless_overwrite(tmp_path):
    make_prepared("digits", tmp_path / "d")
    with pytest.raises(PipelineError, match=r"other settings \(seed 0 -> 5\).*--overwrite"):
        prepare("digits", PrepareOptions(out=tmp_path / "d", seed=5, progress=False))
    r = prepare("digits", PrepareOptions(out=tmp_path / "d", seed=5, overwrite=True, progress=False))
    assert r.written == 1797


@pytest.mark.parametrize("kw,msg", [
    ({"shard_size": 0}, "--shard-size"), ({"workers": 0}, "--workers"), ({"test_fraction": 1.5}, "--test-fraction"),
    ({"formats": ("tfrecord",)}, "--formats"), ({"image_size": -3}, "--image-size"),
])
def test_bad_options(tmp_path, kw, msg):
    with pytest.raises(PipelineError, match=msg):
        prepare("digits", PrepareOptions(out=tmp_path / "o", progress=False, **kw))


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PipelineError, match="not a folder"):
        prepare("digits", PrepareOptions(out=tmp_path / "f", progress=False))


def test_shards_are_deterministic_bytes(tmp_path):
    a = make_prepared("digits", tmp_path / "a")
    b = make_prepared("digits", tmp_path / "b")
    for split in a.splits:
        for rec in a.index["splits"][split]["shards"]:
            assert (a.root / rec["tar"]).read_bytes() == (b.root / rec["tar"]).read_bytes()
    assert not any(p.name.startswith(".") for p in a.root.iterdir()), os.listdir(a.root)


def test_foreign_files_in_out_are_left_alone(tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "backup.tar").write_bytes(b"mine")
    (out / "notes.idx").write_text("mine")
    with pytest.raises(PipelineError, match="did not write \\(backup.tar, notes.idx\\)"):
        make_prepared("digits", out)
    assert (out / "backup.tar").read_bytes() == b"mine" and (out / "notes.idx").read_text() == "mine"


def test_per_class_keeps_a_fixed_class_balanced_subset(tmp_path):
    from pipeline.shards.prepare import parse_per_class, plan_splits
    from pipeline.shards.sources import open_source

    src = open_source("digits")
    full = plan_splits(src, 0.2, 0)
    plan = plan_splits(src, 0.2, 0, {"train": 30})
    split, idx, labels = plan["train"]
    assert sorted(np.bincount(labels).tolist()) == [30] * 10  # exactly 30 of each class
    assert len(set(idx.tolist())) == 300 and set(idx.tolist()) <= set(full["train"][1].tolist())
    assert np.array_equal(labels, src.labels(split[0])[idx])  # labels are the images' own
    assert sorted(full["test"][1]) == sorted(plan["test"][1])  # other splits keep all their samples
    again = plan_splits(src, 0.2, 0, {"train": 30})["train"][1]
    other = plan_splits(src, 0.2, 1, {"train": 30})["train"][1]
    assert np.array_equal(again, idx) and set(other.tolist()) != set(idx.tolist())
    ss = make_prepared("digits", tmp_path / "d", per_class=parse_per_class("train=30"))
    assert ss.count("train") == 300 and ss.count("test") == len(full["test"][1])
    assert ss.fingerprint != make_prepared("digits", tmp_path / "all").fingerprint
    with pytest.raises(PipelineError, match="expected SPLIT=N"):
        parse_per_class("train:30")
