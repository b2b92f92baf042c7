"""pipeline experiment: a grid of arms on digits; its table equals the runs' own files; resume; bad files."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.records import find
from pipeline.experiment import arm_config, load_experiment, run_experiment
from pipeline.trainers import create_trainer

SHARED = """
[experiment]
out = "{out}"
seeds = [0, 1]

[data]
path = "{data}"
batch_size = 64
workers = 0
[model]
arch = "smallcnn"
head_width = 32
proj_dim = 16
[attack]
eps = 0.1
steps = 1
[optim]
optimizer = "sgd"
lr = 0.3
epochs = 2
warmup_epochs = 0
[run]
deterministic = true
[eval]
epochs = 1
lr = 0.1
batch_size = 128
eps = 0.1
limit = 64
"""
ARMS = """
[[arm]]
name = "full"

[[arm]]
name = "random-half"
seeds = [0]
select = {{ selector = "random", fraction = {fraction}, warmup = 1, every = 1, sync = true }}
"""


def _write(tmp_path, data, fraction=0.5, extra=""):
    path = tmp_path / "exp.toml"
    path.write_text(SHARED.format(out=tmp_path / "out", data=data) + ARMS.format(fraction=fraction) + extra)
    return path


def _stamps(out):
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoints/last.pt")}


def test_experiment_table_resume_and_changed_arm(digits_set, tmp_path):
    path = _write(tmp_path, digits_set.root)
    exp = load_experiment(path)
    # An arm interrupted mid-training: its first epoch done before the experiment starts.
    cfg = arm_config(exp, exp.arms[0], 1, str(digits_set.root))
    create_trainer(cfg, progress=False).fit(stop_after=1)
    epoch1 = json.loads((tmp_path / "out/runs/full-s1/metrics.jsonl").read_text().splitlines()[-1])

    # One seed of every arm first (--seeds): the other seed's interrupted run is left as it is.
    rows = run_experiment(exp, progress=False, seeds=[0])
    assert [(r["arm"], r["seed"]) for r in rows] == [("full", 0), ("random-half", 0)]
    assert json.loads((tmp_path / "out/runs/full-s1/metrics.jsonl").read_text().splitlines()[-1]) == epoch1
    with pytest.raises(PipelineError, match="--seeds 7: no arm"):
        run_experiment(exp, progress=False, seeds=[7])

    rows = run_experiment(exp, progress=False)
    assert [(r["arm"], r["seed"]) for r in rows] == [("full", 0), ("full", 1), ("random-half", 0)]
    recs = [json.loads(ln) for ln in (tmp_path / "out/runs/full-s1/metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[0]["time"] == epoch1["time"]  # resumed, not redone

    for r in rows:  # the table's numbers are the runs' own
        run = tmp_path / "out" / "runs" / f"{r['arm']}-s{r['seed']}"
        [saved] = find(json.loads((run / "results.json").read_text())[r["eval"]["checkpoint_sha256"]], "slf-pgd20")
        assert (r["clean"], r["pgd20"], saved["samples"]) == (saved["clean"], saved["pgd20"], 64)
        eps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert r["images"] == sum(e["images"] for e in eps if e["kind"] == "epoch")
    full = [r for r in rows if r["arm"] == "full"]
    mean, std = np.mean([r["clean"] for r in full]), np.std([r["clean"] for r in full], ddof=1)
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| full | acl | - | 1 | 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in table
    arms = json.loads((tmp_path / "out" / "results.json").read_text())["arms"]
    assert arms[0]["clean"] == pytest.approx(mean) and arms[1]["clean_std"] is None  # one seed: no spread
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    assert rows[2]["rounds"] >= 1 and rows[2]["images"] < rows[0]["images"]

    # Run again: nothing is redone. Change one arm: only that arm is.
    before = _stamps(tmp_path / "out")
    run_experiment(load_experiment(path), progress=False)
    assert _stamps(tmp_path / "out") == before
    rows = run_experiment(load_experiment(_write(tmp_path, digits_set.root, fraction=0.3)), progress=False)
    after = _stamps(tmp_path / "out")
    assert {k for k in after if after[k] != before[k]} == {"random-half-s0"}
    assert rows[2]["fraction"] == 0.3


@pytest.mark.parametrize("extra, msg", [
    ('\n[[arm]]\nname = "full"\n', "two arms are named 'full'"),
    ('\n[[arm]]\nname = "x"\noptim = { lr = -1 }\n', "optim.lr = -1"),
    ('\n[[arm]]\nname = "x"\nselect = { selectr = "rcs" }\n', "unknown setting 'select.selectr'"),
    ('\n[[arm]]\nname = "a b"\n', "needs a name"),
])
def test_bad_experiment_files_name_the_problem(tmp_path, extra, msg):
    with pytest.raises(PipelineError, match=msg) as err:
        load_experiment(_write(tmp_path, tmp_path, extra=extra))
    assert "exp.toml" in str(err.value)


def test_rush_arm_smoothed_and_certified_and_eval_change_does_not_retrain(digits_set, tmp_path):
    rush = """
[[arm]]
name = "rush"
seeds = [0]
method = {{ name = "simclr" }}
eval = {{ noise_sigma = 0.25, smoothing = "sigma=0.25,n=10,alpha=0.01,eot=2", attack = "{attack}", certify = "n0=10,n=50,limit=4", limit = 16 }}
"""
    path = tmp_path / "exp.toml"
    path.write_text(SHARED.format(out=tmp_path / "out", data=digits_set.root) + rush.format(attack="pgd20,eot-pgd20"))
    (row,) = run_experiment(load_experiment(path), progress=False)
    assert row["method"] == "simclr" and row["eval"]["smoothing"]["eot"] == 2 and row["eval"]["noise_sigma"] == 0.25
    cert = json.loads(next((tmp_path / "out/runs/rush-s0/certify").glob("*/certify.json")).read_text())
    assert cert["samples"] == 4 and row["certified@0.25"] == cert["certified_accuracy"]["0.25"]
    assert 0 <= row["eot-pgd20"] <= 1
    md = (tmp_path / "out" / "results.md").read_text()
    assert "eot-pgd20" in md and "certified@0.5" in md and "EOT draws 2" in md
    stamps = _stamps(tmp_path / "out")
    path.write_text(SHARED.format(out=tmp_path / "out", data=digits_set.root) + rush.format(attack="pgd20"))
    (again,) = run_experiment(load_experiment(path), progress=False)
    assert _stamps(tmp_path / "out") == stamps  # evaluated again, not retrained
    assert "eot-pgd20" not in again and again["pgd20"] is not None


def test_training_digest_ignores_settings_at_their_defaults_and_method_completion():
    """A setting a later version adds (at its default) must not make finished runs look changed, and the
    config a method completes (pgd-at's milestones) must compare equal to the config.toml it wrote."""
    from pipeline.experiment import _training
    from pipeline.trainers import TRAINERS
    from pipeline.config import TrainConfig

    cfg = TrainConfig()
    cfg.set("method.name", "pgd-at")
    cfg.set("optim.epochs", 20)
    TRAINERS["pgd-at"].complete_config(cfg)
    assert cfg.optim.milestones == [10, 15]
    written = TrainConfig.from_dict(cfg.to_dict())
    assert _training(written) == _training(cfg)
    assert "crop" not in _training(cfg)["data"] and _training(cfg)["optim"]["epochs"] == 20
    cfg.set("data.crop", "random-resized:8")
    assert _training(cfg)["data"]["crop"] == "random-resized:8"


def test_paired_differences_against_random_at_the_same_budget():
    """Hand computation: rcs beats random by 3, 2 and 4 points on seeds 0-2 (mean 3, sd 1: twice its standard
    error is 1.15, beyond the noise); facility by +1, -1, +2 (mixed signs: inside it); a budget without a random
    arm is not paired."""
    from pipeline.experiment.table import paired_against_random, results_markdown, summarize, tradeoff_points

    def row(arm, selector, fraction, seed, pgd, wall):
        return {"arm": arm, "seed": seed, "method": "acl", "selector": selector, "fraction": fraction,
                "clean": 0.5, "pgd20": pgd, "train_s": wall, "wall_s": wall, "images": 10, "rounds": 1,
                "selection_s": 1.0, "selection_process_s": 1.0, "stall_s": 0.0, "eval": {"samples": 1000}}

    base = [0.10, 0.12, 0.11]
    rows = ([row("random-0.2", "random", 0.2, s, p, 100.0) for s, p in enumerate(base)]
            + [row("rcs-0.2", "rcs", 0.2, s, p + d, 130.0 + s) for s, (p, d) in enumerate(zip(base, [0.03, 0.02, 0.04]))]
            + [row("facility-0.2", "facility", 0.2, s, p + d, 110.0) for s, (p, d) in enumerate(zip(base, [0.01, -0.01, 0.02]))]
            + [row("rcs-0.1", "rcs", 0.1, s, 0.1, 50.0) for s in range(3)])
    paired = {p["arm"]: p for p in paired_against_random(rows)}
    assert set(paired) == {"rcs-0.2", "facility-0.2"}
    rcs = paired["rcs-0.2"]["pgd20"]
    assert np.allclose(rcs["diffs"], [0.03, 0.02, 0.04]) and np.isclose(rcs["mean"], 0.03) and np.isclose(rcs["std"], 0.01)
    assert rcs["beyond_noise"] and not paired["facility-0.2"]["pgd20"]["beyond_noise"]
    assert paired["rcs-0.2"]["wall_s"]["diffs"] == [30.0, 31.0, 32.0]
    exp = SimpleNamespace(path=Path("x.toml"))
    md = results_markdown(exp, rows)
    assert "**+3.00 / +2.00 / +4.00 (+3.00 ± 1.00)**" in md and "+1.00 / -1.00 / +2.00 (+0.67 ± 1.53)" in md
    points = tradeoff_points(summarize(rows))
    assert {p["label"] for p in points} == {"random-0.2", "rcs-0.2", "facility-0.2", "rcs-0.1"}
    assert all(p["measure"] == "PGD-20" for p in points)
