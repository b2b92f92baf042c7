"""pipeline certify and smoothed evaluation on digits: resume equality, settings guard, saved classifiers reused."""

import json

import pytest

from pipeline.checkpoint import save_checkpoint
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation import evaluate
import pipeline.evaluation.certify as certify_mod
from pipeline.evaluation.certify import certify, read_rows
from pipeline.evaluation.records import find
from pipeline.models import create_model, model_spec
from clirun import pipeline as pipeline_cli

FINETUNE = dict(protocol="slf", epochs=1, lr=0.1, batch_size=128)


@pytest.fixture(scope="module")
def encoder(digits_set, tmp_path_factory):
    """A freshly initialised smallcnn saved as a `pipeline train` checkpoint would be (RUN/checkpoints)."""
    import torch

    torch.manual_seed(0)
    spec = model_spec("smallcnn", digits_set.channels, digits_set.image_size)
    path = tmp_path_factory.mktemp("certrun") / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"model": create_model(spec).state_dict(), "model_spec": spec, "method": "acl", "epoch": 0})
    return path


def _without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_certify_rows_summary_and_resume_equal_an_uninterrupted_run(digits_set, encoder, tmp_path, monkeypatch):
    args = dict(sigma=0.25, n0=20, n=300, alpha=0.001, limit=8, progress=False, **FINETUNE)
    whole = certify(digits_set.root, encoder, out=tmp_path / "whole", **args)
    rows = read_rows(tmp_path / "whole" / "certify.tsv")
    assert [r["id"] for r in rows] == digits_set.ids("test")[:8].tolist()
    assert all(r["correct"] == int(r["prediction"] == r["label"]) for r in rows)
    assert all((r["prediction"] == -1) == (r["radius"] == 0.0) for r in rows)
    assert whole["certified_accuracy"]["0"] == pytest.approx(sum(r["correct"] for r in rows) / 8)
    assert whole["certified_accuracy"]["0.25"] == pytest.approx(
        sum(r["correct"] and r["radius"] >= 0.25 for r in rows) / 8)
    d = digits_set.channels * digits_set.image_size ** 2
    assert whole["linf_radius"]["0.5"] == pytest.approx(0.5 / d ** 0.5)
    classifiers = list((encoder.parent.parent / "classifiers").glob("*.pt"))
    assert len(classifiers) == 1 and "noise0.25" in classifiers[0].name  # finetuned once, with noise at sigma

    real, calls = certify_mod.certify_sample, []

    def dies_on_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(certify_mod, "certify_sample", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        certify(digits_set.root, encoder, out=tmp_path / "cut", **args)
    monkeypatch.setattr(certify_mod, "certify_sample", real)
    tsv = tmp_path / "cut" / "certify.tsv"
    assert len(read_rows(tsv)) == 3
    with open(tsv, "a") as f:
        f.write("99\t3\t")  # killed while writing a row
    certify(digits_set.root, encoder, out=tmp_path / "cut", **args)
    assert _without_seconds(read_rows(tsv)) == _without_seconds(rows)
    assert len(list((encoder.parent.parent / "classifiers").glob("*.pt"))) == 1  # reused, not finetuned again

    with pytest.raises(PipelineError, match="alpha 0.001 -> 0.01"):
        certify(digits_set.root, encoder, out=tmp_path / "cut", **{**args, "alpha": 0.01})
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join(lines[:2] + ["12\tx\t3\t0.1\t1\t0.2"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match="line 3"):
        read_rows(tsv)


def test_smoothed_eval_saves_a_classifier_that_measures_the_same_when_reused(digits_set, encoder):
    pytest.importorskip("pyautoattack", reason="attacks extra not installed")
    r = evaluate(digits_set.root, encoder, attack="pgd20,eot-pgd20,autoattack-rand", noise_sigma=0.25, limit=16,
                 smoothing="sigma=0.25,n=20,alpha=0.01,eot=4", eps=0.1, progress=False,
                 **{k: v for k, v in FINETUNE.items()})
    assert r["smoothing"] == {"sigma": 0.25, "n": 20, "alpha": 0.01, "eot": 4, "batch": 4096}
    assert r["finetune"]["noise_sigma"] == 0.25
    assert 0 <= r["eot-pgd20"] <= 1 and 0 <= r["pgd20"] <= r["clean"] + 0.2 and 0 <= r["autoattack-rand"] <= 1
    assert r["attack_settings"]["autoattack-rand"]["apgd_eot"] == 20
    saved = json.loads((encoder.parent.parent / "results.json").read_text())[r["checkpoint_sha256"]]
    assert find(saved, "slf-noise0.25-smoothed0.25-n20-eot-pgd20")
    again = evaluate(digits_set.root, r["classifier_path"], attack="clean", limit=16,
                     smoothing="sigma=0.25,n=20,alpha=0.01,eot=4", progress=False)
    assert again["reused_classifier"] and again["finetune_seconds"] == 0.0
    assert again["clean"] == r["clean"]  # same weights, same seeded noise: the same smoothed predictions


def test_certify_cli_reports_and_refuses_bad_input(digits_set, encoder, tmp_path):
    def cli(*args):
        return pipeline_cli("certify", "--data", str(digits_set.root),
                               "--checkpoint", str(encoder), *map(str, args))

    ok = cli("--sigma", "0.25", "--n0", "10", "--n", "100", "--limit", "3", "--epochs", "1", "--lr", "0.1",
             "--batch-size", "128", "--out", tmp_path / "c", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    said = ok.stdout + ok.stderr
    assert "certified accuracy" in said and "l_inf" in said and "finetuning a classifier" in said
    assert (tmp_path / "c" / "certify.json").is_file() and (tmp_path / "c" / "certified.png").is_file()
    bad = cli("--sigma", "0", "--out", tmp_path / "d")
    assert bad.returncode != 0 and "--sigma 0" in bad.stdout + bad.stderr
