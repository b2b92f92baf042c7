"""A researcher's day with the tool (issue 40): names users guess, settings written as in the config file,
help at once."""

import json
import tomllib

import pytest

import pipeline.trainers  # noqa: F401  (the methods' sections)
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from clirun import pipeline as pipeline_cli


@pytest.mark.parametrize("item,key,expected", [
    ('run.loggers=["jsonl","tensorboard"]', "run.loggers", ["jsonl", "tensorboard"]),
    ("run.loggers=jsonl,tensorboard", "run.loggers", ["jsonl", "tensorboard"]),  # today's form still works
    ("optim.milestones=[40, 60]", "optim.milestones", [40, 60]),
    ("optim.milestones=40,60", "optim.milestones", [40, 60]),
    ('model.arch="wrn-16-2"', "model.arch", "wrn-16-2"),
    ("model.arch=wrn-16-2", "model.arch", "wrn-16-2"),
    ("select.selector=kcenter", "select.selector", "kcenter"),
])
def test_set_takes_what_the_config_file_takes(item, key, expected):
    by_flag = TrainConfig()
    by_flag.apply_overrides([item])
    by_flag.validate()
    section, _, name = key.partition(".")
    assert getattr(by_flag.section(section), name) == expected
    k, _, v = item.partition("=")
    if v.startswith(("[", '"')):  # the same text in a config file gives the same setting
        by_file = TrainConfig.from_dict(tomllib.loads(f"[{section}]\n{name} = {v}"))
        assert getattr(by_file.section(section), name) == expected


def test_a_wrong_set_value_is_still_one_line():
    cfg = TrainConfig()
    with pytest.raises(PipelineError, match=r"optim.milestones = \['a'\] is not a valid list"):
        cfg.apply_overrides(['optim.milestones=["a"]'])


def test_kcenter_is_the_k_center_greedy_selector_and_is_recorded_as_kcg(digits_set, tmp_path):
    import pipeline.api as pl
    from pipeline.selectors import SELECTORS

    assert SELECTORS.lookup("kcenter") is SELECTORS.lookup("kcg")
    assert "kcenter" not in SELECTORS.names()  # listed once, under its own name
    manifest = pl.select(digits_set, "kcenter", 0.05, tmp_path / "m.json", arch="smallcnn")
    assert manifest.producer["name"] == "kcg"


# -- one line for every mistake, with the right hint ----------------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

PY = [sys.executable, "-m", "pipeline"]


def _run(*args, **kw):
    return pipeline_cli(*args, **kw)


def _one_line(r, needle):
    assert r.returncode != 0, r.stderr
    lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_a_mistyped_flag_is_one_line_naming_the_help(digits_set):
    r = _run("train", "--dat", digits_set.root)
    _one_line(r, "No such option: --dat (Possible options: --data")
    assert r.returncode == 2 and "train --help" in r.stderr
    _one_line(_run("select", "--data", digits_set.root, "--fraction", "x", "--out", "m.json"), "--fraction")
    assert "Usage" in _run().stdout  # `pipeline` alone still lists the commands


def test_a_checkpoint_of_other_images_or_a_manifest_given_as_one_is_one_line(digits_set, synthetic_set, tmp_path):
    import pipeline.api as pl

    model = pl.create_model("smallcnn", digits_set, method="acl", model__head_width=16, model__proj_dim=8)
    grey = pl.save_snapshot(tmp_path / "grey.pt", model, digits_set)
    _one_line(_run("select", "--data", synthetic_set.root, "--selector", "rcs", "--fraction", "0.1", "--checkpoint",
                   grey, "--out", tmp_path / "a.json"), "grey.pt: the model takes 1-channel images")
    manifest = tmp_path / "m.json"
    pl.select(digits_set, "random", 0.1, manifest)
    for command in (["select", "--selector", "rcs", "--fraction", "0.1", "--out", tmp_path / "b.json"], ["eval"]):
        r = _run(command[0], "--data", digits_set.root, "--checkpoint", manifest, *command[1:])
        _one_line(r, "m.json: a JSON record (a manifest, results?), not a checkpoint")
        assert "weights_only" not in r.stderr  # torch's advice would run whatever the file holds


def test_untrusted_model_code_is_refused_with_a_hint_every_command_can_follow():
    from pipeline.models.custom import foreign_body

    with pytest.raises(PipelineError) as info:
        foreign_body("module:someones.models:build")
    assert "PIPELINE_PLUGINS=someones.models" in str(info.value)
    assert "pass --arch" not in str(info.value)  # eval has no --arch


def test_an_empty_data_set_says_what_was_skipped_and_why(tmp_path):
    from conftest import write_image_folder

    real = tmp_path / "elsewhere"
    write_image_folder(real, n_per_class=2)
    src = tmp_path / "src"
    src.mkdir()
    for cls in ("cat", "dog", "eel"):
        os.symlink(real / cls, src / cls)
    _one_line(_run("prepare", f"folder:{src}", "--out", tmp_path / "out"), "--follow-symlinks to read it")
    assert _run("prepare", f"folder:{src}", "--out", tmp_path / "out", "--follow-symlinks").returncode == 0


def test_uploading_to_a_missing_bucket_names_the_bucket(digits_set):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from servers import moto_s3

    with moto_s3():
        r = _run("upload", digits_set.root, "s3://no-such-bucket/set", env=dict(os.environ))
    assert r.returncode != 0 and "the bucket 'no-such-bucket' does not exist" in r.stderr, r.stderr
    assert "upload DIR URL" not in r.stderr


# -- progress in logs: lines at a steady pace when stderr is not a terminal ---------------------------------
def test_long_commands_log_progress_lines_when_stderr_is_a_file(digits_set, tmp_path):
    env = {**os.environ, "PIPELINE_LOG_EVERY": "0", "OMP_NUM_THREADS": "1"}  # a line per step, for the test
    r = _run("train", "--data", digits_set.root, "--out", tmp_path / "run", "--epochs", "1", "--arch", "smallcnn",
             "--batch-size", "256", "--set", "model.head_width=16", "--set", "model.proj_dim=8", env=env)
    assert r.returncode == 0, r.stderr
    import re

    lines = re.findall(r"^acl epoch 1/1 loss [\d.]+: ([\d,]+)/([\d,]+) \(\d+%\), [\d,]+ img/s, (?:ETA|done)",
                       r.stderr, re.M)
    assert len(lines) >= 3, r.stderr  # one per step at this pace (5 steps of 256)
    assert lines[-1][0] == lines[-1][1]  # the last says the epoch is complete
    r = _run("eval", "--data", digits_set.root, "--checkpoint", tmp_path / "run" / "checkpoints" / "last.pt",
             "--attack", "pgd20", "--limit", "100", "--epochs", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^measure clean, pgd20: 100/100 \(100%\), [\d,]+ img/s", r.stderr, re.M), r.stderr


def test_log_lines_keep_their_pace():
    import io

    from pipeline.progress import LogLines

    out = io.StringIO()
    with LogLines("img/s", every=3600, stream=out) as bar:
        task = bar.add_task("work", total=10)
        for _ in range(10):
            bar.advance(task, 1)
    assert out.getvalue().count("\n") == 1 and "work: 10/10 (100%)" in out.getvalue()  # only the end, in an hour
    out = io.StringIO()
    with LogLines("img/s", every=0, stream=out) as bar:
        task = bar.add_task("work", total=4)
        for _ in range(4):
            bar.advance(task, 1)
    assert out.getvalue().count("\n") == 4 and "ETA" in out.getvalue().splitlines()[0]


# -- schedules that do not fit the run are announced ---------------------------------------------------------
def test_a_warm_up_longer_than_the_run_and_a_dropped_tail_are_announced(digits_set, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    small = ["--arch", "smallcnn", "--set", "model.head_width=16", "--set", "model.proj_dim=8"]
    r = _run("train", "--data", digits_set.root, "--out", tmp_path / "a", "--epochs", "1", "--batch-size", "512",
             *small, env=env)
    assert r.returncode == 0, r.stderr
    n = digits_set.count("train")
    assert "warning: optim.warmup_epochs = 10 is not below optim.epochs = 1: the learning rate only rises" in r.stderr
    assert f"trains on {n - n % 512:,} of the split's {n:,} samples an epoch" in r.stderr
    [epoch] = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
               if '"kind": "epoch"' in line]
    assert epoch["threads"] == 1  # images/s depends on it: every epoch says how many threads made it
    r = _run("train", "--data", digits_set.root, "--out", tmp_path / "b", "--epochs", "1", "--batch-size",
             str(n // 2 if n % 2 == 0 else n // 3), "--set", "optim.warmup_epochs=0", *small, env=env)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


# -- no dead ends: a run stopped before its first epoch ended starts again, by either road ------------------
def _interrupted_before_its_first_epoch(digits_set, run, env):
    import signal

    from conftest import wait_for

    proc = subprocess.Popen([*PY, "train", "--data", str(digits_set.root), "--out", str(run), "--epochs", "50",
                             "--arch", "smallcnn", "--batch-size", "64"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "metrics.jsonl").is_file() or (run / "config.toml").is_file(), proc, "the run started")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130 and "Traceback" not in err, err[:3000]
    assert "run the same command again to start it afresh" in err, err
    assert not (run / "checkpoints" / "last.pt").exists()


def test_a_run_stopped_before_its_first_epoch_starts_again_by_rerun_or_resume(digits_set, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    _interrupted_before_its_first_epoch(digits_set, run, env)
    again = _run("train", "--data", digits_set.root, "--out", run, "--epochs", "1", "--arch", "smallcnn",
                 "--batch-size", "256", "--set", "attack.steps=1", env=env)
    assert again.returncode == 0, again.stderr
    assert "no epoch of the run there had finished (no checkpoint); starting it afresh" in again.stderr
    assert (run / "checkpoints" / "last.pt").is_file()
    other = tmp_path / "other"
    _interrupted_before_its_first_epoch(digits_set, other, env)
    resumed = _run("train", "--resume", other, "--epochs", "1", "--batch-size", "256", "--set", "attack.steps=1",
                   env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "no epoch of it had finished (no checkpoint); starting it from the beginning" in resumed.stderr
    assert (other / "checkpoints" / "last.pt").is_file()
    refused = _run("train", "--data", digits_set.root, "--out", run, "--epochs", "1", env=env)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr  # a run with an epoch done is kept


def test_selection_rounds_that_could_never_land_are_refused_before_any_work(digits_set, tmp_path):
    r = _run("train", "--data", digits_set.root, "--out", tmp_path / "r", "--epochs", "3", "--selector", "rcs",
             "--fraction", "0.3", "--set", "select.warmup=2")
    _one_line(r, "its first round is taken at epoch 3 and trained on from epoch 4, after this run's 3 epochs")
    assert not (tmp_path / "r" / "checkpoints").exists()
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""[experiment]
out = "{tmp_path / 'exp'}"
seeds = [0]
[data]
path = "{digits_set.root}"
[optim]
epochs = 2
[[arm]]
name = "full"
[[arm]]
name = "late"
select = {{selector = "random", fraction = 0.3, warmup = 1}}
""")
    r = _run("experiment", exp, "--dry-run")
    _one_line(r, "arm late: select.selector = 'random': its first round is taken at epoch 2")


# -- threads: a fair share beside other work -----------------------------------------------------------------
def test_the_cpu_quota_is_read_from_cgroup_v2_and_v1_files(tmp_path):
    """Hand-written cgroup trees: v2 takes the tightest cpu.max along the process's path ("max" is none), v1
    cpu.cfs_quota_us / cpu.cfs_period_us (-1 is none); no quota anywhere is None."""
    from pipeline.runtime import cgroup_cpu_limit

    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "job" / "cpu.max").write_text("250000 100000\n")
    (v2 / "job" / "step" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "self-v2").write_text("0::/job/step\n")
    assert cgroup_cpu_limit(str(v2), str(tmp_path / "self-v2")) == 2.5
    (v2 / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(v2), str(tmp_path / "self-v2")) is None
    v1 = tmp_path / "v1" / "cpu,cpuacct" / "docker"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "self-v1").write_text("12:memory:/docker\n4:cpu,cpuacct:/docker\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1"), str(tmp_path / "self-v1")) == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1"), str(tmp_path / "self-v1")) is None
    assert cgroup_cpu_limit(str(tmp_path / "none"), str(tmp_path / "missing")) is None


def _threads_in_child(env_extra: dict, affinity=None, torch_first=False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PIPELINE_THREADS")}
    env.update(env_extra)
    code = ("import json, os\n" + ("import torch\n" if torch_first else "")
            + "import pipeline, torch\nprint(json.dumps({'threads': torch.get_num_threads(), "
            "'policy': os.environ.get('OMP_WAIT_POLICY'), 'said': pipeline.THREADS}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_importing_pipeline_gives_torch_the_usable_cores_and_threads_that_sleep_while_they_wait():
    """Spinning OpenMP threads beside another torch process took a trainer to a third of its share
    (benchmarks/bench_side_by_side.py); pipeline sets the wait policy before torch loads, and leaves alone
    whatever the user set: their OMP_* variables, PIPELINE_THREADS=torch or a count, or a torch imported first."""
    auto = _threads_in_child({})
    assert auto["policy"] == "PASSIVE" and auto["threads"] == len(os.sched_getaffinity(0))
    one_core = _threads_in_child({}, affinity={sorted(os.sched_getaffinity(0))[0]})
    assert one_core["threads"] == 1
    assert _threads_in_child({"OMP_WAIT_POLICY": "ACTIVE"})["policy"] == "ACTIVE"
    theirs = _threads_in_child({"PIPELINE_THREADS": "torch"})
    assert theirs["policy"] is None and "torch's defaults" in theirs["said"]
    assert _threads_in_child({"PIPELINE_THREADS": "1"})["threads"] == 1
    assert "torch was imported before pipeline" in _threads_in_child({}, torch_first=True)["said"]
