"""pipeline train: exact resume, subsets, failure handling, config, and 2-process torchrun on CPU."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.report.runs import load_run
from pipeline.shards.manifest import Manifest, round_path
from pipeline.trainers import StepRecord, TrainConfig, create_trainer, load_config
from clirun import pipeline as pipeline_cli


def tiny_cfg(data, out, **over) -> TrainConfig:
    cfg = TrainConfig()
    settings = {
        "data.path": str(data), "run.out": str(out), "model.arch": "smallcnn", "model.head_width": 32,
        "model.proj_dim": 16, "data.batch_size": 64, "data.workers": 0, "optim.epochs": 2,
        "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.warmup_epochs": 1, "attack.steps": 2,
        "run.deterministic": True, "run.log_every": 5, "run.checkpoint_every": 1,
    }
    settings.update(over)
    for k, v in settings.items():
        cfg.set(k, v)
    return cfg


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_resume_gives_identical_weights(digits_set, tmp_path):
    straight = create_trainer(tiny_cfg(digits_set.root, tmp_path / "a"), progress=False)
    straight.fit()
    first = create_trainer(tiny_cfg(digits_set.root, tmp_path / "b"), progress=False)
    first.fit(stop_after=1)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 1
    time.sleep(3)  # stopped: not training time, and not wall time either
    resumed = create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False)
    assert resumed.start_epoch == 1
    resumed.fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    assert (tmp_path / "b" / "checkpoints" / "epoch-0002.pt").is_file()
    run = load_run(tmp_path / "b")
    first_start_to_last_end = run.epochs[-1]["time"] - run.start
    assert run.wall_seconds < first_start_to_last_end - 2.5 and run.wall_seconds >= run.train_seconds


def test_training_lowers_the_natural_contrastive_loss(digits_set, tmp_path):
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r", **{"optim.epochs": 4, "optim.lr": 0.3}), progress=False)
    t.fit()
    epochs = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "epoch"]
    print([(round(e["loss_nat"], 3), round(e["loss_adv"], 3)) for e in epochs])
    assert epochs[-1]["loss_nat"] < epochs[0]["loss_nat"] - 0.05


def test_manifest_subset_and_manifest_folder(digits_set, tmp_path):
    ids = digits_set.ids("train")
    m = Manifest.for_shardset(digits_set, "train", ids[:200], producer={"name": "test"}, round=1)
    m.save(tmp_path / "subset.json")
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r1", **{"data.manifest": str(tmp_path / "subset.json"),
                                                                        "optim.epochs": 1}), progress=False)
    s = t.fit()
    assert s["subset_size"] == 200 and s["images"] == 192  # 3 full batches of 64
    # a folder of manifests: the trainer takes the newest valid one at each epoch boundary
    mdir = tmp_path / "manifests"
    Manifest.for_shardset(digits_set, "train", ids[:128], round=1).save(round_path(mdir, 1))
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r2", **{"data.manifests": str(mdir), "optim.epochs": 3}),
                       progress=False)
    t.fit(stop_after=1)
    Manifest.for_shardset(digits_set, "train", ids[:256], round=2).save(round_path(mdir, 2))
    (mdir / "round-0003.json").write_text("{broken")  # a half-written or foreign file is skipped
    t.fit(stop_after=1)
    epochs = [json.loads(l) for l in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    rounds = [(r["subset_round"], r["subset_size"]) for r in epochs if r["kind"] == "epoch"]
    assert rounds == [(1, 128), (2, 256)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(digits_set, tmp_path):
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r", **{"optim.epochs": 3}), progress=False)
    t.fit(stop_after=1)
    good = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    t.training_step = lambda batch, epoch: StepRecord(torch.full((len(batch.ids),), float("nan"), requires_grad=True))
    with pytest.raises(PipelineError, match="non-finite loss at epoch 2.*last good checkpoint.*epoch 1"):
        t.fit()
    kept = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_dynacl_schedule(digits_set, tmp_path):
    cfg = tiny_cfg(digits_set.root, tmp_path / "d", **{"method.name": "dynacl", "optim.epochs": 100,
                                                      "dynacl.period": 50})
    t = create_trainer(cfg, progress=False)
    t.on_epoch_start(0)
    assert t.augment.strength == 1.0 and t.adv_weight(0) == 1.0
    t.on_epoch_start(50)
    assert t.augment.strength == 0.5
    assert t.adv_weight(49) == pytest.approx(1 + 0.5 * 2 / 3)


def test_config_file_overrides_and_saved_config(digits_set, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f'[data]\npath = "{digits_set.root}"\nbatch_size = 64\nworkers = 0\n[model]\narch = "smallcnn"\n'
                    'head_width = 32\nproj_dim = 16\n[optim]\nepochs = 1\noptimizer = "sgd"\nlr = 0.05\n[attack]\nsteps = 1\n')
    r = pipeline_cli("train", "--config", conf, "--out", tmp_path / "run",
                        "--set", "optim.warmup_epochs=0", "--lr", "0.02")
    assert r.returncode == 0, r.stderr
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.optim.lr == 0.02 and saved.optim.warmup_epochs == 0 and saved.data.batch_size == 64
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["model_spec"]["arch"] == "smallcnn" and ck["epoch"] == 1


@pytest.mark.parametrize("args,needle", [
    (["--set", "optim.lrr=1"], "unknown setting 'optim.lrr'"),
    (["--set", "optim.epochs=ten"], "not a valid int"),
    (["--method", "byol"], "method 'byol'"),
    (["--arch", "vit"], "model.arch = 'vit' (--arch): choose one of smallcnn"),
    (["--device", "tpu"], "run.device = 'tpu' (--device): must be auto, cpu or cuda"),
])
def test_bad_training_settings_are_one_line(digits_set, tmp_path, args, needle):
    r = pipeline_cli("train", "--data", digits_set.root, "--out",
                        tmp_path / "x", *args)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_torchrun_two_cpu_processes(digits_set, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline",
           "train", "--data", digits_set.root, "--out", tmp_path / "ddp", "--arch", "smallcnn", "--epochs", "2",
           "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.1", "--workers", "0", "--set", "attack.steps=1",
           "--set", "model.head_width=32", "--set", "model.proj_dim=16", "--set", "optim.warmup_epochs=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    per_rank_steps = (digits_set.count("train") // 2) // 64
    assert ck["global_step"] == 2 * per_rank_steps
    epochs = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "epoch"]
    assert [e["steps"] for e in epochs] == [per_rank_steps] * 2  # one writer: rank 0
    assert epochs[0]["images"] == 2 * 64 * per_rank_steps


def test_existing_run_needs_resume_or_overwrite(digits_set, tmp_path):
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r", **{"optim.epochs": 1}), progress=False)
    t.fit()
    t.close()  # the trainer holds the run folder's lock until closed
    base = ["train", "--data", digits_set.root, "--out", tmp_path / "r",
            "--arch", "smallcnn", "--epochs", "1", "--batch-size", "64", "--workers", "0",
            "--set", "attack.steps=1", "--set", "model.head_width=32", "--set", "model.proj_dim=16"]
    r = pipeline_cli(*base)
    assert r.returncode != 0 and "already holds a run" in r.stderr
    r = pipeline_cli(*base, "--overwrite")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines if json.loads(l)["kind"] == "epoch"] == [1]


def _run_straight_and_stopped(data, tmp_path, over: dict, call: int) -> dict:
    """Train run `a` straight through, and run `b` with the same settings until its `call`-th training step
    raises, as a kill would stop it; return b's last checkpoint."""
    create_trainer(tiny_cfg(data, tmp_path / "a", **over), progress=False).fit()
    t = create_trainer(tiny_cfg(data, tmp_path / "b", **over), progress=False)
    real, calls = t.training_step, [0]

    def step(batch, epoch):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(batch, epoch)

    t.training_step = step
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    t.close()
    return load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")


def _resume(tmp_path):
    return create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False)


def _resumed_matches_straight(tmp_path, keys: tuple, resumed=None) -> tuple[list, list]:
    """Resume run `b` to the end; its weights equal a's. Returns both runs' epoch records as tuples of `keys`."""
    (resumed or _resume(tmp_path)).fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def epochs(run):
        return [tuple(r[k] for k in keys) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "epoch"]

    return epochs(tmp_path / "a"), epochs(tmp_path / "b")


@pytest.mark.parametrize("workers,backend,subset", [(0, "stream", False), (2, "stream", True), (2, "indexed", True)])
def test_a_run_stopped_inside_an_epoch_resumes_at_the_next_batch_bit_identically(digits_set, tmp_path, workers,
                                                                                backend, subset):
    over = {"run.checkpoint_every_steps": 4, "data.workers": workers, "data.backend": backend}
    if subset:
        ids = digits_set.ids("train")[::2]
        Manifest.for_shardset(digits_set, "train", ids, producer={"name": "test"}, round=1).save(tmp_path / "m.json")
        over["data.manifest"] = str(tmp_path / "m.json")
    steps = (len(digits_set.ids("train")[::2]) if subset else len(digits_set.ids("train"))) // 64
    # the second epoch's 7th step: the checkpoint after its 4th is the last one
    ckpt = _run_straight_and_stopped(digits_set.root, tmp_path, over, steps + 7)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 4)
    resumed = _resume(tmp_path)
    assert (resumed.start_epoch, resumed.resume_step) == (1, 4)
    straight, stopped = _resumed_matches_straight(tmp_path, ("epoch", "loss", "images", "steps"), resumed)
    assert straight == stopped


def test_a_selecting_run_stopped_inside_an_epoch_resumes_bit_identically(digits_set, tmp_path):
    """Selection rounds (in the trainer's process, to keep the test short; a round process is restarted the
    same way at an epoch-end resume): the epoch that was running trains on to the end on the subset it began
    with, and the rounds the schedule asks for come out as in an uninterrupted run."""
    over = {"run.checkpoint_every_steps": 2, "optim.epochs": 3, "select.selector": "random", "select.fraction": 0.5,
            "select.warmup": 1, "select.every": 1, "select.lag": 1, "select.processes": 0}
    # the third epoch (the first on a subset), step 3
    ckpt = _run_straight_and_stopped(digits_set.root, tmp_path, over, 2 * (1438 // 64) + 3)
    assert ckpt["step_in_epoch"] == 2
    straight, stopped = _resumed_matches_straight(tmp_path, ("epoch", "subset_round", "subset_size", "loss"))
    assert straight == stopped
    assert [s[1] for s in straight] == [None, None, 1]


def test_selection_rounds_of_different_run_seeds_are_independent_draws(digits_set, tmp_path):
    """Round seeds come from (run seed, round); with `run seed + round`, run seed 1's first round drew exactly the
    subset of run seed 0's second, so an experiment's seeds shared their random subsets a round apart."""
    over = {"optim.epochs": 3, "select.selector": "random", "select.fraction": 0.5, "select.warmup": 1,
            "select.every": 1, "select.lag": 0, "select.processes": 0}
    manifests = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        create_trainer(tiny_cfg(digits_set.root, out, **over, **{"run.seed": seed})).fit()
        manifests[seed] = {n: Manifest.load(round_path(out / "manifests", n)) for n in (1, 2)}
    assert [manifests[0][n].extra["seed"] for n in (1, 2)] == [1, 2]  # run seed 0 keeps its round seeds
    assert [manifests[1][n].extra["seed"] for n in (1, 2)] == [1_000_004, 1_000_005]
    assert set(manifests[1][1].ids.tolist()) != set(manifests[0][2].ids.tolist())
