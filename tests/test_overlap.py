"""Selection overlapping training: steps continue while a round is selected; each new manifest is used."""

import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.shards.manifest import Manifest
from pipeline.trainers import create_trainer, load_config

from test_train import tiny_cfg


def _records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _overlapped_run(root, run):
    cfg = tiny_cfg(root, run, **{"optim.epochs": 6, "select.selector": "facility", "select.fraction": 0.3,
                                 "select.warmup": 1, "select.every": 2, "select.params": "attack_steps=1,draws=1",
                                 "run.log_every": 1, "select.proxies": "fresh"})  # background rounds
    create_trainer(cfg, progress=False).fit()
    return _records(run)


def test_overlapped_selection_runs_beside_training_on_a_fixed_schedule_and_reproduces(digits_set, tmp_path):
    import torch

    recs = _overlapped_run(digits_set.root, tmp_path / "a")
    rounds = [r for r in recs if r["kind"] == "selection"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    steps = [r for r in recs if r["kind"] == "step"]
    # snapshots at the start of epochs 2 and 4, each used one epoch later (select.lag = 1); none at 6: it
    # would be due after the end
    assert [(r["round"], r["epoch"], r["used_from_epoch"], r["stale_epochs"]) for r in rounds] == [(1, 2, 3, 1),
                                                                                                 (2, 4, 5, 1)]
    assert sorted(p.name for p in (tmp_path / "a" / "snapshots").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    # training went on while round 1 was being selected
    r1 = rounds[0]
    assert any(r1["submitted_at"] < s["time"] < r1["ready_at"] for s in steps)
    assert [e["subset_round"] for e in epochs] == [None, None, 1, 1, 2, 2]
    assert all(e["subset_size"] == 431 for e in epochs if e["subset_round"])
    # the same seed again: the same manifests and bit-identical weights, however the rounds were timed
    _overlapped_run(digits_set.root, tmp_path / "b")
    for name in ("round-0001.json", "round-0002.json"):
        a, b = (Manifest.load(tmp_path / r / "manifests" / name) for r in "ab")
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.weights, b.weights)
    wa, wb = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sync_selection_blocks_and_is_used_at_once(digits_set, tmp_path):
    run = tmp_path / "sync"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 3, "select.selector": "random", "select.fraction": 0.2,
                                          "select.warmup": 1, "select.every": 1, "select.sync": True})
    create_trainer(cfg, progress=False).fit()
    recs = _records(run)
    rounds = [r for r in recs if r["kind"] == "selection"]
    assert [r["stale_epochs"] for r in rounds] == [0, 0]
    assert all(r["stall_s"] > 0 for r in rounds)
    assert [e["subset_round"] for e in recs if e["kind"] == "epoch"] == [None, 1, 2]


def test_selection_resumes_with_the_right_round(digits_set, tmp_path):
    run = tmp_path / "res"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 3, "select.selector": "random", "select.fraction": 0.2,
                                          "select.warmup": 1, "select.every": 1, "select.sync": True})
    create_trainer(cfg, progress=False).fit(stop_after=2)
    again = create_trainer(load_config(run / "config.toml"), resume=True, progress=False)
    again.fit()
    epochs = [r for r in _records(run) if r["kind"] == "epoch"]
    assert [e["subset_round"] for e in epochs] == [None, 1, 2]
    assert sorted(p.name for p in (run / "manifests").glob("*.json")) == ["round-0001.json", "round-0002.json"]


def test_selector_and_manifest_together_are_refused(digits_set, tmp_path):
    cfg = tiny_cfg(digits_set.root, tmp_path / "x", **{"select.selector": "rcs", "data.manifests": str(tmp_path)})
    with pytest.raises(PipelineError, match="either --selector"):
        create_trainer(cfg, progress=False)
    cfg = tiny_cfg(digits_set.root, tmp_path / "y", **{"select.selector": "facility", "select.params": "k=5,bogus=1"})
    with pytest.raises(PipelineError, match="takes no bogus"):
        create_trainer(cfg, progress=False)


def test_select_watch_feeds_a_run(digits_set, tmp_path):
    """An external `select --watch` writes rounds into RUN/manifests; a trainer reading that folder uses them."""
    from pipeline.selectors.watch import watch_run

    run = tmp_path / "w"
    create_trainer(tiny_cfg(digits_set.root, run, **{"optim.epochs": 3}), progress=False).fit(stop_after=1)
    assert watch_run(run, digits_set.root, "random", 0.25, {}, 0, "cpu", poll_s=0.01, max_rounds=1) == 1
    cfg = load_config(run / "config.toml")
    cfg.data.manifests = str(run / "manifests")
    t = create_trainer(cfg, resume=True, progress=False)
    t.fit()
    epochs = [r for r in _records(run) if r["kind"] == "epoch"]
    assert [e["subset_round"] for e in epochs] == [None, 1, 1]
    assert epochs[-1]["subset_size"] == round(0.25 * digits_set.count("train"))


def test_rcs_validation_part_is_held_out_once_and_never_trained_on(digits_set, tmp_path):
    from pipeline.shards.manifest import Manifest

    run = tmp_path / "rcs"
    cfg = tiny_cfg(digits_set.root, run, **{"method.name": "dynacl", "dynacl.period": 1, "optim.epochs": 3,
                                           "select.selector": "rcs", "select.fraction": 0.3, "select.warmup": 1,
                                           "select.every": 1, "select.sync": True, "select.validation_fraction": 0.05})
    t = create_trainer(cfg, progress=False)
    trained = set()
    step = t.training_step
    t.training_step = lambda batch, epoch: (trained.update(batch.ids.tolist()), step(batch, epoch))[1]
    t.fit()
    u = set(Manifest.load(run / "selection" / "validation.json").ids.tolist())
    assert len(u) == round(0.05 * digits_set.count("train"))
    assert not (trained & u)  # not in the warm-up, not in any round
    rounds = [Manifest.load(p) for p in sorted((run / "manifests").glob("round-*.json"))]
    assert len(rounds) == 2
    for r in rounds:
        assert set(r.extra["validation_ids"]) == u and not (set(r.ids.tolist()) & u)
    # the proxy pass used the trainer's augmentation strength at the snapshot (DynACL anneals it)
    assert [r.extra["selection_settings"]["strength"] for r in rounds] == pytest.approx([1 - 1 / 3, 1 - 2 / 3])


def test_selection_accounting_and_the_random_fallback(digits_set, tmp_path):
    """Rounds record their cost; epochs on a subset record the images not attacked and the time saved
    (estimated from the full-data epoch); a round costing more than its subset saves is said once, and with
    select.fallback=random later rounds are random. (On digits every round costs more than it saves: an epoch
    takes about a second, starting a selection process more.)"""
    from pipeline.shards.manifest import Manifest

    run = tmp_path / "acc"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 4, "select.selector": "facility", "select.fraction": 0.3,
                                           "select.warmup": 1, "select.every": 1, "select.sync": True,
                                           "select.fallback": "random", "select.proxies": "fresh"})
    with create_trainer(cfg, progress=False) as t:
        t.fit()
    recs = _records(run)
    rounds = [r for r in recs if r["kind"] == "selection"]
    assert all(r["selection_s"] > 0 and r["process_s"] > 0 and r["device"] == "cpu" for r in rounds)
    warned = [r for r in recs if r["kind"] == "selection_not_worth"]
    assert len(warned) == 1 and warned[0]["round"] == 1 and warned[0]["fallback"] == "random"
    producers = [Manifest.load(p).producer["name"] for p in sorted((run / "manifests").glob("round-*.json"))]
    assert producers[0] == "facility" and set(producers[1:]) == {"random"}
    full = next(e for e in recs if e["kind"] == "epoch" and e["subset_round"] is None)
    acc = [r for r in recs if r["kind"] == "accounting"]
    sub = [e for e in recs if e["kind"] == "epoch" and e["subset_round"] is not None]
    assert len(acc) == len(sub) >= 2
    per_image = full["seconds"] / full["images"]
    expected = sum(full["images"] - e["images"] for e in sub) * per_image
    assert acc[-1]["saved_s_total"] == pytest.approx(expected)
    assert acc[-1]["net_s"] == pytest.approx(acc[-1]["saved_s_total"] - acc[-1]["selection_s_total"])


def test_background_rounds_read_with_loader_workers_and_end_with_the_run(digits_set, tmp_path, monkeypatch):
    """A round's proxy pass may start loader workers of its own (`select.workers`, the ImageNet configuration
    uses 6): the round's process must be allowed children. An interrupted run ends its running round."""
    run = tmp_path / "w"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 2, "select.selector": "facility", "select.fraction": 0.3,
                                          "select.warmup": 1, "select.every": 1, "select.sync": True,
                                          "select.workers": 1, "select.params": "attack_steps=1",
                                          "select.proxies": "fresh"})
    create_trainer(cfg, progress=False).fit()
    rounds = [r for r in _records(run) if r["kind"] == "selection"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["size"] == 431

    run = tmp_path / "stop"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 3, "select.selector": "facility", "select.fraction": 0.3,
                                          "select.warmup": 1, "select.every": 1, "select.workers": 1,
                                          "select.proxies": "fresh"})
    trainer = create_trainer(cfg, progress=False)
    scheduler = trainer.subsets.scheduler
    train_epoch = trainer._train_epoch
    running = []

    def interrupted(epoch):
        if epoch == 1:  # round 1 was submitted at this epoch's start and is running now
            running.extend(scheduler.pending)
            raise KeyboardInterrupt
        return train_epoch(epoch)

    monkeypatch.setattr(trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert len(running) == 1 and scheduler.pending == []
    assert [p.is_alive() for p in running[0].process.procs] == [False]
    assert not (run / "manifests" / "round-0001.json").exists()  # ended before it wrote: resume selects again
