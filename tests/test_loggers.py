"""run.loggers: TensorBoard, W&B (offline) and CSV curves, read back with their own readers and compared with
metrics.jsonl, the record every other part of the tool reads."""

import csv
import json
import shutil
import struct
import sys

import pytest

from pipeline.errors import PipelineError
from pipeline.trainers import create_trainer, load_config

from test_train import tiny_cfg

ALL = ["jsonl", "tensorboard", "wandb", "csv"]


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, its settings and caches in the test's folder (never the user's home, never the network)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """The records of a W&B .wandb file: W&B's LevelDB-log framing (a 7-byte ":W&B" header, 32 KiB blocks,
    7-byte chunk headers: crc32c, length, type full/first/middle/last), each a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, out, parts = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's zero-filled tail
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            out.append(parts + chunk)
    return [pb.Record.FromString(c) for c in out]


def _wandb_history(run):
    """The history rows ({key: value}) of the run's offline W&B files, in order, and the summary updates."""
    rows, summary = [], {}
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in wandb_records(path):
            which = rec.WhichOneof("record_type")
            if which == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
            elif which == "summary":
                for item in rec.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, summary


def _column(rows, key):
    return [r[key] for r in rows if key in r]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_all_four_loggers_write_curves_that_read_back_as_metrics_jsonl(digits_set, tmp_path, offline_wandb):
    from pipeline.evaluation import evaluate

    run = tmp_path / "run"
    cfg = tiny_cfg(digits_set.root, run, **{
        "run.loggers": ALL, "optim.epochs": 3, "select.selector": "random", "select.fraction": 0.3,
        "select.warmup": 1, "select.every": 1, "run.log_every": 3})
    with create_trainer(cfg, progress=False) as trainer:
        trainer.fit()
    steps, epochs, rounds = _records(run, "step"), _records(run, "epoch"), _records(run, "selection")
    assert len(steps) >= 5 and len(epochs) == 3 and rounds
    assert all(0.0 <= s["attack_share"] <= 1.0 for s in steps) and "overlap" in rounds[0]
    result = evaluate(digits_set.root, run / "checkpoints" / "last.pt", "slf", "clean", epochs=1, lr=0.1, limit=64,
                      progress=False)

    tb = _tensorboard(run / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [v for _, v in tb["train/lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    assert [v for _, v in tb["train/attack_share"]] == pytest.approx([r["attack_share"] for r in steps], rel=1e-5)
    assert [v for _, v in tb["epoch/loss_adv"]] == pytest.approx([r["loss_adv"] for r in epochs], rel=1e-6)
    assert [v for _, v in tb["epoch/images_per_s"]] == pytest.approx([r["images_per_s"] for r in epochs], rel=1e-5)
    assert [v for _, v in tb["selection/size"]] == [r["size"] for r in rounds]
    assert [v for _, v in tb["selection/wall_s"]] == pytest.approx([r["wall_s"] for r in rounds], rel=1e-5)
    evaluated = _tensorboard(run / "tensorboard" / "eval-1")
    assert evaluated["eval/slf-clean"][0][1] == pytest.approx(result["clean"])

    rows, summary = _wandb_history(run)
    assert _column(rows, "train/loss") == pytest.approx([r["loss"] for r in steps])
    assert [r["trainer/global_step"] for r in rows if "train/loss" in r] == [r["step"] for r in steps]
    assert _column(rows, "epoch/loss") == pytest.approx([r["loss"] for r in epochs])
    assert _column(rows, "selection/size") == [r["size"] for r in rounds]
    assert summary["eval/slf-clean"] == pytest.approx(result["clean"])
    assert len({p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}) == 1  # one W&B run id

    rows = _csv(run / "logs" / "train.csv")
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in steps])
    assert [int(r["global_step"]) for r in rows] == [r["step"] for r in steps]
    assert [float(r["loss_nat"]) for r in _csv(run / "logs" / "epoch.csv")] == pytest.approx(
        [r["loss_nat"] for r in epochs])
    assert [int(r["size"]) for r in _csv(run / "logs" / "selection.csv")] == [r["size"] for r in rounds]
    ev = _csv(run / "logs" / "eval.csv")
    assert float(ev[0]["eval/slf-clean"]) == pytest.approx(result["clean"]) and ev[0]["optim.lr"] == "0.1"


def test_a_resumed_run_shows_each_step_once(digits_set, tmp_path):
    """Resumed from the epoch-1 checkpoint after 2 epochs were logged: the curves hold epoch 2 once (TensorBoard
    hides the stopped run's records past the checkpoint with purge_step; the CSV drops them), as metrics.jsonl."""
    run = tmp_path / "run"
    cfg = tiny_cfg(digits_set.root, run, **{"run.loggers": ["tensorboard", "csv"], "optim.epochs": 2,
                                             "run.log_every": 4})
    with create_trainer(cfg, progress=False) as trainer:
        trainer.fit()
    shutil.copy(run / "checkpoints" / "epoch-0001.pt", run / "checkpoints" / "last.pt")
    with create_trainer(load_config(run / "config.toml"), resume=True, progress=False) as trainer:
        trainer.fit()
    steps = _records(run, "step")
    assert len(steps) == len({r["step"] for r in steps})  # metrics.jsonl was cut back to the checkpoint
    tb = _tensorboard(run / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [int(r["global_step"]) for r in _csv(run / "logs" / "train.csv")] == [r["step"] for r in steps]
    assert len(_csv(run / "logs" / "epoch.csv")) == 2
    assert len(tb["epoch/loss"]) == 2  # the checkpoint's own step is kept (purging it lost a point per resume)


def test_logger_settings_and_missing_libraries_are_one_line_errors(digits_set, tmp_path, monkeypatch):
    cfg = tiny_cfg(digits_set.root, tmp_path / "a")
    cfg.set("run.loggers", ["jsonl", "mlflow"])
    with pytest.raises(PipelineError, match="run.loggers"):
        cfg.validate()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    cfg = tiny_cfg(digits_set.root, tmp_path / "b", **{"run.loggers": ["wandb"]})
    with pytest.raises(PipelineError, match=r"pipeline\[loggers\]"):
        create_trainer(cfg, progress=False)
