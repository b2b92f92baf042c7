"""pipeline report: files written, figures decode and are not blank, the table's numbers are the run's."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation import evaluate
from pipeline.evaluation.records import find
from pipeline.trainers import create_trainer

from test_train import tiny_cfg
from clirun import pipeline as pipeline_cli


@pytest.fixture(scope="module")
def selected_run(digits_set, tmp_path_factory):
    run = tmp_path_factory.mktemp("rep") / "rcs-run"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 2, "select.selector": "random", "select.fraction": 0.3,
                                           "select.warmup": 1, "select.every": 1, "select.sync": True})
    with create_trainer(cfg, progress=False) as t:
        t.fit()
    evaluate(digits_set.root, run / "checkpoints" / "last.pt", "slf", "pgd20", epochs=1, batch_size=256, limit=40,
             eps=0.1, progress=False)
    return run


def test_report_of_a_run_with_one_selection_round(selected_run, tmp_path):
    pytest.importorskip("matplotlib", reason="report extra not installed")
    out = tmp_path / "report"
    r = pipeline_cli("report", selected_run, "--out", out)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"tradeoff.png", "rcs-run-training.png", "rcs-run-selection.png"}
    assert "report.md" in r.stderr and "3 figures" in r.stderr
    for p in pngs:
        pixels = np.asarray(Image.open(p).convert("L"), dtype=float)
        assert pixels.shape[0] > 100 and pixels.std() > 5, p  # decodes, and is not a blank canvas
    # the table's numbers are those in the run's files
    [saved] = find(next(iter(json.loads((selected_run / "results.json").read_text()).values())), "slf-pgd20")
    row = next(line for line in md.splitlines() if line.startswith("| rcs-run (random 0.3)"))
    header = next(line for line in md.splitlines() if line.startswith("| run | checkpoint epoch"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["clean"] == f"{100 * saved['clean']:.2f}%" and cells["PGD-20"] == f"{100 * saved['pgd20']:.2f}%"
    assert cells["smoothed"] == "-" and cells["EOT-PGD-20"] == "-"
    epochs = [json.loads(line) for line in (selected_run / "metrics.jsonl").read_text().splitlines()]
    rounds = [e for e in epochs if e["kind"] == "selection"]
    assert len(rounds) == 1 and f"| 1 | 2 | 2 | {rounds[0]['selection_s']:.1f} |" in md
    train_s = sum(e["seconds"] for e in epochs if e["kind"] == "epoch")
    assert cells["train wall s"] == f"{train_s:.1f}"


def test_a_report_again_draws_only_the_figures_whose_data_changed(selected_run, tmp_path):
    """An experiment writes its report after every arm: figures of unchanged runs are kept, not drawn again."""
    pytest.importorskip("matplotlib", reason="report extra not installed")
    import shutil

    from pipeline.report import build_report

    other = tmp_path / "other-run"
    shutil.copytree(selected_run, other)
    out = tmp_path / "report"
    build_report([selected_run, other], out)

    def stamps():
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}

    first = stamps()
    assert {"rcs-run-training.png", "other-run-training.png", "tradeoff.png"} <= set(first)
    build_report([selected_run, other], out)
    assert stamps() == first  # nothing drawn again
    lines = (other / "metrics.jsonl").read_text().splitlines()
    last = json.loads(next(ln for ln in reversed(lines) if json.loads(ln)["kind"] == "epoch"))
    last["loss"] += 1.0  # the other run's numbers change
    (other / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(last)]) + "\n")
    build_report([selected_run, other], out)
    again = stamps()
    changed = {name for name in first if again[name] != first[name]}
    assert "other-run-training.png" in changed and not any(n.startswith("rcs-run") for n in changed)


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    r = pipeline_cli("report", tmp_path / "x", "--out", tmp_path / "o")
    assert r.returncode != 0 and "not a training run" in r.stderr and "Traceback" not in r.stderr


def test_a_run_with_a_held_out_u_logs_rd_u_and_the_report_plots_it(digits_set, tmp_path):
    """RD(U) per epoch from the model of that epoch (recomputed here from the kept checkpoints), the round's
    value the one at its snapshot, the report's line and figure; a run whose rounds come too late says so."""
    pytest.importorskip("matplotlib", reason="report extra not installed")
    from pipeline.checkpoint import load_model
    from pipeline.selectors.proxies import divergence_on
    from pipeline.shards.manifest import Manifest
    from pipeline.shards.shardset import ShardSet

    run = tmp_path / "rd"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 4, "select.selector": "rcs", "select.fraction": 0.3,
                                           "select.warmup": 2, "select.every": 1, "select.lag": 1,
                                           "select.params": "refreshes=2", "select.validation_fraction": 0.05,
                                           "attack.eps": 0.1})
    with create_trainer(cfg, progress=False) as t:
        t.fit()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    start = [r for r in recs if r["kind"] == "divergence"]
    assert len(start) == 1 and start[0]["epoch"] == 0
    ss, val = ShardSet.open(digits_set.root), Manifest.load(run / "selection" / "validation.json").ids
    for e in epochs:  # checkpoint_every = 1: the model after every epoch is kept
        model, _ = load_model(run / "checkpoints" / f"epoch-{e['epoch']:04d}.pt")
        assert e["rd_u"] == pytest.approx(divergence_on(model, ss, "train", val, "acl", 0.1), rel=1e-5)
    rounds = [r for r in recs if r["kind"] == "selection"]
    assert [r["epoch"] for r in rounds] == [3] and rounds[0]["rd_u"] == epochs[1]["rd_u"]  # snapshot after epoch 2
    out = tmp_path / "report"
    r = pipeline_cli("report", run, "--out", out)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert (out / "rd-divergence.png").is_file()
    assert f"{start[0]['rd_u']:.5f} after 0 epochs, {epochs[-1]['rd_u']:.5f} after 4" in md
    assert "warm-up's linear trend" in md and "never trained on a subset" not in md

    late = tmp_path / "late"  # a run whose only round came due after it ended: refused at start since issue 40,
    cfg = tiny_cfg(digits_set.root, late, **{"optim.epochs": 2, "select.selector": "random", "select.fraction": 0.3,
                                            "select.warmup": 1, "select.every": 1, "select.lag": 1})
    from pipeline.trainers import TRAINERS  # so made as earlier versions made it, past create_trainer's check

    TRAINERS.lookup(cfg.method.name).complete_config(cfg)
    with TRAINERS.lookup(cfg.method.name)(cfg.validate(), progress=False) as t:
        t.fit()
    r = pipeline_cli("report", late, "--out", tmp_path / "r2")
    assert r.returncode == 0, r.stderr
    assert "This run never trained on a subset" in (tmp_path / "r2" / "report.md").read_text()


def test_noise_line_is_two_standard_errors_of_a_difference():
    """Hand computation: clean 50% and 30% on 1,000 images, mean p = 0.4: 2 sqrt(2 p (1 - p) / n) = 4.38 points;
    PGD-20 10% and 14%, p = 0.12: 2 sqrt(2 * 0.12 * 0.88 / 1000) = 2.91 points. The natural branch's row and a run
    without PGD-20 do not count."""
    from types import SimpleNamespace

    from pipeline.report import noise_line

    def run(*results):
        return SimpleNamespace(results=list(results))

    runs = [run({"clean": 0.5, "pgd20": 0.10, "samples": 1000}, {"branch_role": "natural", "clean": 0.9, "samples": 1000}),
            run({"clean": 0.3, "pgd20": 0.14, "samples": 1000, "branch_role": "eval"}),
            run({"clean": 0.99, "samples": 1000})]
    line = noise_line(runs)
    assert "1,000 test images" in line and "4.4 points (clean)" in line and "2.9 points (PGD-20)" in line
    assert noise_line(runs[:1]) is None  # one run: no difference to judge


def _evaluated_run(folder, config: str, epochs: int, subset_size: int, result: dict):
    """A run folder as training and `pipeline eval` leave it: config, epoch records, one evaluation."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "epoch", "epoch": e, "loss": 1.0, "lr": 0.1, "images": subset_size, "seconds": 2.0 * e,
         "images_per_s": 100.0, "time": 100.0 + e, "subset_size": subset_size}) + "\n" for e in range(1, epochs + 1)))
    entry = {"protocol": "slf", "eps": 0.1, "data": "/data/digits-16", "dataset_fingerprint": "abcdef1234567890",
             **result}
    (folder / "results.json").write_text(json.dumps({"d1": {"checkpoint": str(folder / "last.pt"),
                                                          "checkpoint_epoch": epochs, "slf-pgd20@x": entry}}))
    return folder


def test_the_report_says_what_was_measured_on_what(tmp_path):
    """Issue 40: a run trained on a manifest is not "(all data)"; AutoAttack and PGD-20 never share an axis; runs
    measured on other test images are not put under one noise note; the data sets are named."""
    pytest.importorskip("matplotlib", reason="report extra not installed")
    from pipeline.report import build_report

    cfg = '[data]\npath = "/data/digits-16"\n{extra}[method]\nname = "acl"\n[model]\narch = "smallcnn"\n'
    subset = _evaluated_run(tmp_path / "subset", cfg.format(extra='manifest = "/m/keep-600.json"\n'), 3, 600,
                            {"clean": 0.8, "pgd20": 0.30, "autoattack": 0.25, "samples": 1000,
                             "measure_samples": {"autoattack": 200}})
    full = _evaluated_run(tmp_path / "full", cfg.format(extra=""), 3, 1438, {"clean": 0.6, "pgd20": 0.35, "samples": 1000})
    quick = _evaluated_run(tmp_path / "quick", cfg.format(extra=""), 1, 1438, {"clean": 0.5, "pgd20": 0.2, "samples": 200})
    md_path, _ = build_report([subset, full, quick], tmp_path / "out")
    md = md_path.read_text()
    assert "## subset (manifest keep-600.json, 600 images)" in md and "subset (all data)" not in md
    assert "## full (all data)" in md and "Trained on digits-16, train split" in md
    assert "| digits-16 (abcdef12) | 1,000 (autoattack 200) |" in md  # the test data and each measure's count
    noise = next(line for line in md.splitlines() if line.startswith("One seed"))
    # subset and full share their 1,000 images: p = 0.7 clean, 0.325 PGD-20; quick's 200 are compared with none
    assert "on the same 1,000 test images of digits-16 (abcdef12), differences below 4.1 points (clean) and 4.2 points (PGD-20)" in noise
    assert "200" not in noise
    panels = Image.open(tmp_path / "out" / "tradeoff.png").info["Description"].split(" || ")
    assert len(panels) == 2
    for panel, measure, where in zip(panels, ("PGD-20", "AutoAttack"), ("test images as labelled", "200 test images of")):
        assert panel.startswith(f"{measure} on") and where in panel and panel.endswith(f"y: {measure} accuracy, %")
