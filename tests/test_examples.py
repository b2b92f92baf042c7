"""The example scripts run as a user runs them, and do what they say."""

import json
import re
import subprocess
import sys
from pathlib import Path

from pipeline.evaluation.records import find
from pipeline.shards.manifest import Manifest
from pipeline.shards.shardset import ShardSet

ROOT = Path(__file__).resolve().parents[1]


def test_own_loop_example_selects_trains_on_the_subset_and_evaluates(tmp_path):
    out = tmp_path / "own"
    done = subprocess.run([sys.executable, "examples/own_loop.py", "--out", str(out), "--epochs", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    first, second = (re.match(r"epoch (\d): (\d+) images", ln) for ln in lines[:2])
    subset = Manifest.load(out / "round-0001.json")
    assert subset.producer["name"] == "rcs" and subset.extra["selection_settings"]["method"] == "acl"
    full = ShardSet.open(out / "shards").count("train")
    assert int(first.group(2)) == full  # epoch 1: all data
    assert int(second.group(2)) == len(subset)  # epoch 2 read only the chosen samples
    assert len(subset) == subset.extra["budget"] and abs(len(subset) - 0.3 * full) <= 1
    results = json.loads((out / "results.json").read_text())  # pipeline eval's record, beside the snapshot
    entry = next(iter(results.values()))
    assert entry["checkpoint"].endswith("epoch-2.pt") and find(entry, "slf-pgd20")
    assert re.search(r"clean [\d.]+%, PGD-20 [\d.]+%", lines[-1])


def test_own_loop_example_answers_bad_input_in_one_line(tmp_path):
    for args, needle in ((["--data", str(tmp_path / "none")], "no such shard-set folder"),
                         (["--epochs", "0"], "--epochs: 0: at least 1"),
                         (["--fraction", "1.5"], "--fraction: 1.5: a share of the data"),
                         (["--arch", "nope"], "model.arch = 'nope' (--arch): choose one of")):
        done = subprocess.run([sys.executable, "examples/own_loop.py", "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode != 0 and needle in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
