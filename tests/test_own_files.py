"""The tool touches only what it wrote, says in one line when a write fails, and refuses hostile input early
(issue 22). Generated data and tiny runs only; each test fails on the code before the issue."""

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from pipeline.atomic import atomic_path, is_temporary, write_json
from pipeline.errors import PipelineError

from conftest import write_image_folder, write_tiny_run
from clirun import pipeline as pipeline_cli

PY = [sys.executable, "-m", "pipeline"]


def run(*args, limit_file_bytes: int | None = None, **kw):
    return pipeline_cli(*args, limit_file_bytes=limit_file_bytes, **kw)


def one_line_error(r, needle):
    assert r.returncode != 0, r.stdout + r.stderr
    said = r.stdout + r.stderr
    assert needle.lower() in said.lower(), said
    assert "Traceback" not in said, said


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if is_temporary(p.name) or ".tmp-" in p.name]


# -- temporary files ------------------------------------------------------------------------------------------
def test_a_temporary_name_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out" / "results.json"
    target.parent.mkdir()
    # the name an older version would have used, planted as a link to somebody else's file
    os.symlink(victim, target.parent / f".{target.name}.tmp-{os.getpid()}")
    write_json(target, {"a": 1})
    assert victim.read_text() == "keep me"
    assert json.loads(target.read_text()) == {"a": 1} and not target.is_symlink()


def test_a_legal_250_character_name_can_be_written(tmp_path):
    target = tmp_path / ("n" * 245 + ".json")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not temporaries(tmp_path)


def test_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    folder = tmp_path / "f"
    folder.mkdir()
    left = folder / f".tmp-{dead_pid}-abcdefgh.tmp"
    left.write_bytes(b"half a file")
    alive = folder / f".tmp-{os.getppid()}-abcdefgh.tmp"  # a writer still running (our parent)
    alive.write_bytes(b"being written")
    foreign = folder / ".tmp-notes"
    foreign.write_text("not ours")
    write_json(folder / "x.json", {})
    assert not left.exists() and alive.exists() and foreign.exists()


def test_a_failed_block_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"old": True} and not temporaries(tmp_path)


# -- failed writes ------------------------------------------------------------------------------------------------
def test_a_full_disk_during_checkpointing_is_one_line_and_keeps_the_last_checkpoint(digits_set, tmp_path):
    from pipeline.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    base = ["train", "--data", digits_set.root, "--out", run_dir, "--arch", "smallcnn", "--batch-size", "256",
            "--epochs", "2", "--workers", "0", "--set", "model.head_width=32", "--set", "model.proj_dim=16",
            "--set", "attack.steps=1", "--set", "run.checkpoint_every=0", "--stop-after", "1"]
    first = run(*base)
    assert first.returncode == 0, first.stderr
    size = (run_dir / "checkpoints" / "last.pt").stat().st_size
    # the next checkpoint cannot be written: files may not grow past half of one
    r = run("train", "--resume", run_dir, limit_file_bytes=size // 2)
    one_line_error(r, "last.pt: could not be written")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1  # the previous state, intact
    assert not temporaries(run_dir)


def test_a_full_disk_during_prepare_is_one_line_and_leaves_no_temporaries(tmp_path):
    r = run("prepare", "digits", "--out", tmp_path / "d", "--shard-size", "500", limit_file_bytes=100_000)
    one_line_error(r, "could not be written")
    assert not temporaries(tmp_path)


def test_failed_writes_of_select_and_report_are_one_line(digits_set, tmp_path):
    r = run("select", "--data", digits_set.root, "--selector", "random", "--fraction", "0.5", "--out",
            tmp_path / "m" / "round-0001.json", limit_file_bytes=1000)
    one_line_error(r, "could not be written")
    assert not temporaries(tmp_path)
    long_name = tmp_path / ("x" * 300)
    r = run("select", "--data", digits_set.root, "--selector", "random", "--fraction", "0.5", "--out", long_name)
    one_line_error(r, "name too long")
    assert "shorter name" in r.stdout + r.stderr


def test_eval_keeps_its_numbers_when_the_classifier_cannot_be_saved(digits_set, tmp_path, monkeypatch):
    import pipeline.checkpoint as ck
    from pipeline.checkpoint import save_checkpoint
    from pipeline.evaluation import evaluate
    from pipeline.models import create_model, model_spec

    m = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
    save_checkpoint(tmp_path / "c.pt", {"model_spec": m.spec, "model": m.state_dict(), "method": "acl"})

    def full_disk(obj, f, *a, **k):  # what torch raises when the disk fills mid-save
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    r = evaluate(digits_set.root, tmp_path / "c.pt", epochs=1, batch_size=256, limit=20, attack="clean",
                 progress=False)
    assert r["classifier_path"] is None and 0 <= r["clean"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())[r["checkpoint_sha256"]]


# -- records of ours only -------------------------------------------------------------------------------------
def _checkpoint(folder: Path) -> Path:
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model, model_spec

    m = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
    return save_checkpoint(folder / "c.pt", {"model_spec": m.spec, "model": m.state_dict(), "method": "acl"})


def test_eval_refuses_a_foreign_results_file_and_moves_a_damaged_one_aside(digits_set, tmp_path):
    from pipeline.evaluation import evaluate

    kw = dict(epochs=1, batch_size=256, limit=20, attack="clean", progress=False)
    foreign = tmp_path / "a"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"experiment": "somebody else\'s"}')
    with pytest.raises(PipelineError, match="not a results file of this tool"):
        evaluate(digits_set.root, _checkpoint(foreign), **kw)
    assert (foreign / "results.json").read_text() == '{"experiment": "somebody else\'s"}'
    torn = tmp_path / "b"
    torn.mkdir()
    (torn / "results.json").write_text('{"abc": {"checkpoint": "x", "slf-clean": {"clean": 0.5')
    r = evaluate(digits_set.root, _checkpoint(torn), **kw)
    kept = list(torn.glob("results.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text().startswith('{"abc"')
    assert set(json.loads((torn / "results.json").read_text())) == {r["checkpoint_sha256"]}


def test_two_evaluations_at_once_keep_both_results(tmp_path, monkeypatch):
    import pipeline.evaluation.records as ev

    real = json.loads

    def slow_loads(text, *a, **k):  # both read before either writes, unless the record is locked
        time.sleep(0.3)
        return real(text, *a, **k)

    path = tmp_path / "results.json"
    write_json(path, {"d": {"checkpoint": "c.pt", "checkpoint_epoch": 1}})
    monkeypatch.setattr(ev.json, "loads", slow_loads)
    results = [{"protocol": "slf", "noise_sigma": 0, "checkpoint_epoch": 1, "clean": 0.5, "pgd20": 0.1},
               {"protocol": "slf", "noise_sigma": 0, "checkpoint_epoch": 1, "clean": 0.5, "autoattack": 0.05}]
    threads = [threading.Thread(target=ev.save_result, args=(path, "d", "c.pt", ["clean", m], res))
               for m, res in zip(("pgd20", "autoattack"), results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    saved = json.loads(path.read_text())["d"]
    assert ev.find(saved, "slf-pgd20") and ev.find(saved, "slf-autoattack")


def test_certify_takes_its_folder_lock(digits_set, tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.evaluation.certify import certify
    from pipeline.models import create_model, model_spec

    m = create_model(model_spec("smallcnn", 1, 8, heads={"logits": {"kind": "linear", "width": 0, "out": 10}}))
    ckpt = save_checkpoint(tmp_path / "c.pt", {"model_spec": m.spec, "model": m.state_dict(), "method": "pgd-at"})
    out = tmp_path / "cert"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.locks import acquire\n"
                               f"acquire({str(out)!r}, 'pipeline certify')\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match="in use by `pipeline certify`"):
            certify(digits_set.root, ckpt, 0.25, n0=5, n=10, limit=2, out=out, protocol="direct", progress=False)
    finally:
        holder.kill()
        holder.wait()
    summary = certify(digits_set.root, ckpt, 0.25, n0=5, n=10, limit=2, out=out, protocol="direct", progress=False)
    assert summary["samples"] == 2


def test_saving_a_manifest_never_deletes_what_an_old_header_names(digits_set, tmp_path):
    from pipeline.shards.manifest import Manifest

    folder = tmp_path / "m"
    folder.mkdir()
    notes = folder / "notes.txt"
    notes.write_text("mine")
    lookalike = folder / "round-0001.0123456789abcdef.npy"  # our pattern, not our content
    np.save(lookalike, np.arange(3))
    header = {"format": "pipeline.manifest", "format_version": 1, "ids_file": "notes.txt",
              "weights_file": lookalike.name}
    (folder / "round-0001.json").write_text(json.dumps(header))
    Manifest.for_shardset(digits_set, "train", np.arange(10)).save(folder / "round-0001.json")
    assert notes.read_text() == "mine" and lookalike.is_file()
    again = Manifest.for_shardset(digits_set, "train", np.arange(20)).save(folder / "round-0001.json")
    first_ids = [p for p in folder.glob("round-0001.*.npy") if p != lookalike]
    assert len(first_ids) == 1 and Manifest.load(again).ids.tolist() == list(range(20))  # our old pair did go


def test_train_overwrite_keeps_files_a_forged_header_names(digits_set, tmp_path):
    run_dir = tmp_path / "run"
    base = ["train", "--data", digits_set.root, "--out", run_dir, "--arch", "smallcnn", "--batch-size", "256",
            "--epochs", "1", "--workers", "0", "--set", "model.head_width=32", "--set", "model.proj_dim=16",
            "--set", "attack.steps=1"]
    assert run(*base).returncode == 0
    (run_dir / "manifests").mkdir(exist_ok=True)
    precious = run_dir / "manifests" / "thesis.tex"
    precious.write_text("years of work")
    (run_dir / "manifests" / "round-0009.json").write_text(json.dumps(
        {"format": "pipeline.manifest", "format_version": 1, "ids_file": "thesis.tex"}))
    r = run(*base, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert precious.read_text() == "years of work"


def test_pseudo_labels_refuse_to_replace_a_shard_index(digits_set, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_set.root, data)
    before = (data / "index.json").read_bytes()
    from pipeline.pseudolabels import PseudoLabels

    pl = PseudoLabels(np.arange(3), np.zeros((3, 1), np.int32), (2,), "f")
    with pytest.raises(PipelineError, match="not a pseudo-label file of this tool"):
        pl.save(data / "index.json")
    assert (data / "index.json").read_bytes() == before
    header = pl.save(tmp_path / "pl")
    first = json.loads(header.read_text())
    pl2 = PseudoLabels(np.arange(4), np.ones((4, 1), np.int32), (2,), "f")
    pl2.save(tmp_path / "pl")
    second = json.loads(header.read_text())
    assert first["ids_file"] != second["ids_file"] and not (tmp_path / first["ids_file"]).exists()
    assert PseudoLabels.load(header).labels.tolist() == [[1]] * 4


# -- hostile input ---------------------------------------------------------------------------------------------
def _bomb() -> bytes:
    """A 16 x 16 JPEG whose header declares 65000 x 65000 pixels."""
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), quality=90))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 7] = (65000).to_bytes(2, "big")
    data[i + 7:i + 9] = (65000).to_bytes(2, "big")
    return bytes(data)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, n_per_class=4, fmt="jpg")
    (src / "cat" / "bomb.jpg").write_bytes(_bomb())

    def small_memory():  # the bomb would need about 12 GB to decode
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    r = subprocess.run([*PY, "prepare", f"folder:{src}", "--out", tmp_path / "out"], capture_output=True, text=True,
                       preexec_fn=small_memory)
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]
    assert [s["source"].endswith("bomb.jpg") for s in skipped] == [True]
    assert "65000 x 65000" in skipped[0]["reason"] and "refused before decoding" in skipped[0]["reason"]


def test_the_loaders_refuse_a_bomb_inside_a_shard():
    from pipeline.shards.images import CorruptImage, decode

    with pytest.raises(CorruptImage, match="above the limit"):
        decode(_bomb(), "RGB")


@pytest.mark.parametrize("args,needle", [
    (["--set", "model.head_width=100000000"], "model.head_width = 100000000: must be between 1 and 65536"),
    (["--set", "optim.lr=inf"], "optim.lr = 'inf' is not a valid float"),
    (["--set", "attack.eps=nan"], "attack.eps = 'nan' is not a valid float"),
    (["--set", "run.seed=99999999999999999999999"], "is not a valid int"),
])
def test_bad_values_are_refused_up_front(digits_set, tmp_path, args, needle):
    one_line_error(run("train", "--data", digits_set.root, "--out", tmp_path / "r", *args), needle)


def test_toml_booleans_are_not_integers(tmp_path):
    from pipeline.config import TrainConfig

    with pytest.raises(PipelineError, match="optim.epochs = True"):
        TrainConfig.from_dict({"optim": {"epochs": True}})


def test_an_experiment_naming_a_later_arm_for_pseudo_labels_is_refused_before_anything_runs(tmp_path):
    from pipeline.experiment import load_experiment

    exp = tmp_path / "exp.toml"
    exp.write_text('[experiment]\nseeds = [0]\n[data]\npath = "x"\n'
                   '[[arm]]\nname = "advcl"\nmethod = {name = "advcl"}\nadvcl = {pseudo_labels = "pseudo-labels:simclr"}\n'
                   '[[arm]]\nname = "simclr"\nmethod = {name = "simclr"}\n')
    with pytest.raises(PipelineError, match="arm 'simclr', which comes later"):
        load_experiment(exp)
    exp.write_text(exp.read_text().replace("pseudo-labels:simclr", "pseudo-labels:simclrr"))
    with pytest.raises(PipelineError, match="which is not in the file"):
        load_experiment(exp)


def test_an_arm_whose_rounds_all_came_too_late_says_so():
    from pipeline.experiment import Arm, Experiment, results_markdown

    row = {"arm": "late", "seed": 0, "run": "r", "method": "acl", "selector": "rcs", "fraction": 0.2, "clean": 0.5,
           "train_s": 1.0, "images": 100, "epochs": 2, "rounds": 0, "selection_s": 0.0, "selection_process_s": 0.0,
           "stall_s": 0.0, "eval": {"protocol": "slf", "samples": 10, "eps": 0.1}}
    table = results_markdown(Experiment(Path("e.toml"), Path("out"), {}, [Arm("late", {}, [0])]), [row])
    assert "rcs (no round used: all data)" in table


# -- resume keeps the bookkeeping ---------------------------------------------------------------------------------
def _bookkeeping(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    selection = [(r["round"], r["epoch"], r["used_from_epoch"], r["size"], r["selector"]) for r in records
                 if r["kind"] == "selection"]
    accounting = [(r["epoch"], r["images_not_attacked"], r["images_not_attacked_total"]) for r in records
                  if r["kind"] == "accounting"]
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    return selection, accounting, epochs


def test_a_resumed_run_keeps_every_selection_and_accounting_record(digits_set, tmp_path):
    from pipeline.report import load_run
    from pipeline.trainers import create_trainer, load_config
    from test_train import tiny_cfg

    over = {"optim.epochs": 5, "select.selector": "random", "select.fraction": 0.3, "select.warmup": 1,
            "select.every": 2, "select.sync": True, "data.batch_size": 128}
    straight = create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False)
    straight.fit()
    straight.close()
    first = create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False)
    first.fit(stop_after=2)
    first.close()
    for _ in range(2):  # stopped twice, at the end of epochs 2 and 4: right after each round was first used
        again = create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False)
        again.fit(stop_after=2)
        again.close()
    a, b = _bookkeeping(tmp_path / "a"), _bookkeeping(tmp_path / "b")
    assert len(a[0]) == 2 and len(a[1]) == 4 and a[2] == [1, 2, 3, 4, 5]
    assert b == a
    ra, rb = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert len(ra.rounds) == len(rb.rounds) and ra.images == rb.images
    assert rb.accounting[-1]["images_not_attacked_total"] == ra.accounting[-1]["images_not_attacked_total"]


def test_a_torn_metrics_line_is_cut_on_resume_and_skipped_by_the_report(digits_set, tmp_path):
    from pipeline.report import load_run
    from pipeline.trainers import create_trainer, load_config
    from test_train import tiny_cfg

    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r", **{"optim.epochs": 2}), progress=False)
    t.fit(stop_after=1)
    t.close()
    metrics = tmp_path / "r" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "step", "epoch": 1, "lo')  # killed mid-write
    assert len(load_run(tmp_path / "r").epochs) == 1
    again = create_trainer(load_config(tmp_path / "r" / "config.toml"), resume=True, progress=False)
    again.fit()
    again.close()
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and [json.loads(x)["epoch"] for x in lines
                                                         if json.loads(x)["kind"] == "epoch"] == [1, 2]


def test_report_replaces_only_what_it_wrote(tmp_path):
    from pipeline.report import build_report

    run_dir = write_tiny_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("# My notes\n\nnot a report\n")
    with pytest.raises(PipelineError, match="report.md, which `pipeline report` did not write"):
        build_report([run_dir], out)
    assert (out / "report.md").read_text() == "# My notes\n\nnot a report\n"
    (out / "report.md").unlink()
    (out / "run-training.png").write_bytes(b"\x89PNG my own figure")
    with pytest.raises(PipelineError, match="run-training.png"):
        build_report([run_dir], out)
    (out / "run-training.png").unlink()
    build_report([run_dir], out)
    build_report([run_dir], out)  # its own report and figures: replaced
    with pytest.raises(PipelineError, match="inside the run folder"):
        build_report([run_dir], run_dir / "report")


def test_an_experiment_refuses_to_replace_foreign_result_files(tmp_path):
    from pipeline.experiment import load_experiment, run_experiment

    exp = tmp_path / "exp.toml"
    exp.write_text(f'[experiment]\nout = "{tmp_path / "out"}"\nseeds = [0]\n[data]\npath = "x"\n'
                   '[[arm]]\nname = "a"\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.md").write_text("my thesis chapter")
    with pytest.raises(PipelineError, match="results.md: exists and is not an experiment table"):
        run_experiment(load_experiment(exp), progress=False)
    assert (tmp_path / "out" / "results.md").read_text() == "my thesis chapter"


def test_ffcv_files_are_checked_by_verify_and_at_open(tmp_path):
    from pipeline.shards import ffcv_io
    from pipeline.shards.prepare import PrepareOptions, prepare
    from pipeline.shards.shardset import ShardSet
    from pipeline.shards.verify import verify

    if not ffcv_io.available():
        pytest.skip("ffcv is not installed (the ffcv extra)")
    root = prepare("digits", PrepareOptions(out=tmp_path / "d", formats=("wds", "ffcv"), progress=False)).out
    index = json.loads((root / "index.json").read_text())
    assert len(index["splits"]["train"]["beton"]["sha256"]) == 64 and not verify(root, progress=False)
    beton = root / "train.beton"
    good = beton.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # a pixel byte: same size
    beton.write_bytes(bytes(flipped))
    assert any("SHA-256" in p for p in verify(root, progress=False))
    beton.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(PipelineError, match="bytes, index.json records"):
        ShardSet.open(root).loader("train", backend="ffcv", batch_size=64)
    # another split's file under this split's name, its size recorded to match
    beton.write_bytes((root / "test.beton").read_bytes())
    index["splits"]["train"]["beton"]["bytes"] = beton.stat().st_size
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="not this split's"):
        ShardSet.open(root).loader("train", backend="ffcv", batch_size=64)


# -- everything read back is validated ------------------------------------------------------------------------------
def _copy_set(digits_set, tmp_path) -> Path:
    import shutil

    root = tmp_path / "set"
    shutil.copytree(digits_set.root, root)
    return root


@pytest.mark.parametrize("edit,needle", [
    (lambda ix: ix["splits"]["train"].update(count=-5), "splits.train.count = -5"),
    (lambda ix: ix["splits"]["train"].update(count=10 ** 15), "splits.train.count = 1000000000000000"),
    (lambda ix: ix["splits"]["train"]["shards"][0].update(tar="../../etc/passwd"), "shards.0.tar"),
    (lambda ix: ix["splits"]["train"]["shards"][0].update(count="300"), "shards.0.count = '300'"),
    (lambda ix: ix["splits"]["test"].update(id_range=[0, 5]), "splits.test.id_range"),
    (lambda ix: ix["image"].update(channels=7), "image.channels = 7"),
    (lambda ix: ix.update(classes=[]), "classes = []"),
])
def test_a_damaged_index_is_one_line_naming_the_field(digits_set, tmp_path, edit, needle):
    from pipeline.shards.shardset import ShardSet

    root = _copy_set(digits_set, tmp_path)
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        ShardSet.open(root)
    one_line_error(run("verify", root), needle)


@pytest.mark.parametrize("column,value,needle", [
    ("offset", 10 ** 12, "inside the"), ("size", -1, "inside the"), ("label", 99, "labels must be class numbers"),
    ("id", 10 ** 9, "ids must increase within"),
])
def test_a_damaged_member_table_is_refused(digits_set, tmp_path, column, value, needle):
    from pipeline.shards.shardset import ShardSet

    root = _copy_set(digits_set, tmp_path)
    idx = root / "train-000000.idx"
    table = np.load(idx)
    table[column][3] = value
    with open(idx, "wb") as f:
        np.save(f, table)
    with pytest.raises(PipelineError, match="train-000000.idx: not the member table index.json records"):
        ShardSet.open(root).members("train")  # index.json pins every .idx by size and SHA-256
    index = json.loads((root / "index.json").read_text())
    for rec in index["splits"]["train"]["shards"]:
        del rec["idx_bytes"], rec["idx_sha256"]  # a set prepared before the pin: its values are still checked
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match=needle):
        ShardSet.open(root).members("train")


def test_manifest_pseudo_label_checkpoint_and_metrics_records_are_validated(digits_set, tmp_path):
    from pipeline.checkpoint import load_model, save_checkpoint
    from pipeline.models import create_model, model_spec
    from pipeline.pseudolabels import PseudoLabels
    from pipeline.report import load_run
    from pipeline.shards.manifest import Manifest

    header = Manifest.for_shardset(digits_set, "train", np.arange(5)).save(tmp_path / "m.json")
    h = json.loads(header.read_text())
    for key, bad in [("count", "5"), ("round", True), ("fraction", 7.0), ("ids_file", "../x.npy")]:
        (tmp_path / "m.json").write_text(json.dumps({**h, key: bad}))
        with pytest.raises(PipelineError, match=f"{key} = "):
            Manifest.load(tmp_path / "m.json")

    pl_header = PseudoLabels(np.arange(4), np.array([[0], [1], [0], [1]], np.int32), (2,), "f").save(tmp_path / "pl")
    forged = PseudoLabels(np.arange(4), np.array([[0], [5], [0], [1]], np.int32), (2,), "f").save(tmp_path / "pl2")
    assert PseudoLabels.load(pl_header).counts == (2,)
    with pytest.raises(PipelineError, match="outside its cluster count"):
        PseudoLabels.load(forged)

    m = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
    spec = {**m.spec, "heads": {"proj": {"kind": "mlp3", "width": 10 ** 9, "out": 8}}}
    save_checkpoint(tmp_path / "c.pt", {"model_spec": spec, "model": m.state_dict(), "method": "acl"})
    with pytest.raises(PipelineError, match=r"model_spec\.heads\.proj\.width = 1000000000"):
        load_model(tmp_path / "c.pt")

    run_dir = write_tiny_run(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "epoch", "epoch": 2, "loss": "low", "images": 10, "seconds": 1.0,
                            "time": 101.0}) + "\n")
    with pytest.raises(PipelineError, match="record 2: loss = 'low'"):
        load_run(run_dir)


def test_results_certification_and_experiment_records_are_validated(tmp_path):
    from pipeline.experiment.run import _read_state
    from pipeline.report import load_run

    run_dir = write_tiny_run(tmp_path / "run")
    (run_dir / "results.json").write_text(json.dumps(
        {"d1": {"checkpoint": "c.pt", "slf-pgd20": {"protocol": "slf", "clean": 0.5, "pgd20": "high"}}}))
    with pytest.raises(PipelineError, match=r"d1\.slf-pgd20\.pgd20 = 'high'"):
        load_run(run_dir)
    (run_dir / "results.json").unlink()
    (run_dir / "certify" / "c").mkdir(parents=True)
    (run_dir / "certify" / "c" / "certify.json").write_text(json.dumps(
        {"settings": {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001}, "samples": -3, "certified_accuracy": {}}))
    with pytest.raises(PipelineError, match="samples = -3"):
        load_run(run_dir)
    state = tmp_path / "experiment.json"
    state.write_text(json.dumps({"format": "pipeline.experiment", "runs": {"a-s0": {"digest": 5, "row": {}}}}))
    with pytest.raises(PipelineError, match=r"runs\.a-s0\.digest = 5"):
        _read_state(state)
    state.write_text('{"format": "pipeline.experiment", "runs": {"a-s0": {"dig')  # torn
    assert _read_state(state)["runs"] == {}
    assert [p.name.startswith("experiment.json.corrupt-") for p in tmp_path.glob("experiment.json.*")] == [True]


def test_certify_refuses_a_foreign_record_in_its_out_folder(digits_set, tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.evaluation.certify import certify
    from pipeline.models import create_model, model_spec

    m = create_model(model_spec("smallcnn", 1, 8, heads={"logits": {"kind": "linear", "width": 0, "out": 10}}))
    ckpt = save_checkpoint(tmp_path / "c.pt", {"model_spec": m.spec, "model": m.state_dict(), "method": "pgd-at"})
    out = tmp_path / "cert"
    out.mkdir()
    (out / "certify.json").write_text('["my", "notes"]')
    with pytest.raises(PipelineError, match="not a certification record of this tool"):
        certify(digits_set.root, ckpt, 0.25, n0=5, n=10, limit=2, out=out, protocol="direct", progress=False)
    assert (out / "certify.json").read_text() == '["my", "notes"]'
