"""Issue 39's battery: the newer surfaces (plugins, records read back, evaluation results, object storage and
HTTP, the cache, loggers) tried as a careless user and as an attacker would. One rule per root cause; every case
makes its own data."""

from __future__ import annotations

import os
import sys

import pytest

from pipeline.errors import PipelineError
from clirun import pipeline as pipeline_cli

PY = [sys.executable, "-m", "pipeline"]


def run(*args, env=None, **kw):
    return pipeline_cli(*args, env=env, **kw)


def one_line_error(r, needle):
    assert r.returncode != 0, r.stderr
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


# -- plugins: a taken name is refused, a plugin's import fails loudly ---------------------------------------
def _plugin_env(folder, name):
    return {**os.environ, "PIPELINE_PLUGINS": name,
            "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def test_a_plugin_cannot_take_a_built_in_name(tmp_path):
    (tmp_path / "takes_random.py").write_text(
        "from pipeline.selectors import Selector, register_selector\n"
        "@register_selector\n"
        "class Mine(Selector):\n"
        "    name = 'random'\n")
    r = run("prepare", "digits", "--out", tmp_path / "set", env=_plugin_env(tmp_path, "takes_random"))
    one_line_error(r, "selector 'random' is taken by pipeline.selectors.random.")
    assert "takes_random.Mine cannot register under it" in r.stderr
    assert not (tmp_path / "set").exists()


def test_a_plugin_that_exits_at_import_is_an_error_not_a_success(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    r = run("prepare", "digits", "--out", tmp_path / "set", env=_plugin_env(tmp_path, "quits"))
    one_line_error(r, "importing plugin 'quits' failed (exited with code 0)")
    (tmp_path / "raises.py").write_text("raise RuntimeError('x' * 10_000_000)\n")
    r = run("prepare", "digits", "--out", tmp_path / "set", env=_plugin_env(tmp_path, "raises"))
    one_line_error(r, "importing plugin 'raises' failed (RuntimeError: xxx")
    assert len(r.stderr) < 2_000  # a huge message is cut, not echoed whole


def test_the_same_definition_registered_twice_is_no_conflict():
    from pipeline.registry import Registry

    r = Registry("widget")

    class Small:
        name = "small"

    r.register(Small)
    r.register(Small)  # a module imported twice
    again = type("Small", (), {"name": "small", "__module__": Small.__module__, "__qualname__": Small.__qualname__})
    r.register(again)  # a module reloaded: the same module and name
    with pytest.raises(PipelineError, match="widget 'small' is taken by"):
        r.register(type("Other", (), {"name": "small"}))


# -- results: every definition kept; numbers printed before anything is saved ---------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model, model_spec

    folder = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    m = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
    save_checkpoint(folder / "enc.pt", {"model_spec": m.spec, "model": m.state_dict(), "method": "acl"})
    return folder / "enc.pt"


def _saved(encoder, digest):
    import json

    return json.loads((encoder.parent / "results.json").read_text())[digest]


def test_results_of_other_sample_sets_and_other_data_are_kept_beside_each_other(digits_set, encoder, tmp_path,
                                                                                capsys):
    from conftest import make_prepared
    from pipeline.evaluation import evaluate
    from pipeline.evaluation.records import find

    kw = dict(epochs=1, batch_size=256, attack="clean", progress=False)
    full = evaluate(digits_set.root, encoder, **kw)
    quick = evaluate(digits_set.root, encoder, limit=20, **kw)
    other = make_prepared("digits", tmp_path / "other", test_fraction=0.3)  # another data set: a transfer
    assert other.fingerprint != digits_set.fingerprint
    transfer = evaluate(other.root, encoder, limit=20, **kw)
    kept = find(_saved(encoder, full["checkpoint_sha256"]), "slf-clean")
    assert sorted((r["samples"], r["dataset_fingerprint"]) for r in kept) == sorted(
        [(full["samples"], digits_set.fingerprint), (20, digits_set.fingerprint), (20, other.fingerprint)])
    assert {r["clean"] for r in kept} == {full["clean"], quick["clean"], transfer["clean"]}
    assert all(r["definition"]["samples"] == r["samples"] for r in kept)
    capsys.readouterr()
    again = evaluate(digits_set.root, encoder, limit=20, **kw)  # the same definition: replaced, said so
    assert "on the same definition (data, samples, settings) was measured before" in capsys.readouterr().err
    kept = find(_saved(encoder, full["checkpoint_sha256"]), "slf-clean")
    assert len(kept) == 3 and again["clean"] in {r["clean"] for r in kept}


def test_the_report_shows_each_definition_in_a_row_of_its_own(digits_set, tmp_path):
    import json

    from conftest import write_tiny_run
    from pipeline.evaluation.records import samples_text
    from pipeline.report import results_table
    from pipeline.report.runs import load_run

    run = write_tiny_run(tmp_path / "run")
    base = {"protocol": "slf", "recipe": "acl", "clean": 0.5, "pgd20": 0.2, "autoattack": 0.1, "eps": 0.03,
            "checkpoint": "x", "data": "/d/cifar10", "dataset_fingerprint": "aaaaaaaa11", "samples": 10000,
            "measure_samples": {"clean": 10000, "pgd20": 10000, "autoattack": 1000}, "date": "1"}
    quick = {**base, "clean": 0.6, "samples": 200, "measure_samples": {"clean": 200, "pgd20": 200}, "date": "2"}
    transfer = {**base, "data": "/d/stl10", "dataset_fingerprint": "bbbbbbbb22", "date": "3"}
    (run / "results.json").write_text(json.dumps({"d1": {"checkpoint": "x", "slf-pgd20@1": base,
                                                         "slf-pgd20@2": quick, "slf-pgd20@3": transfer}}))
    rows = [ln for ln in results_table([load_run(run)]) if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == 3
    assert "10,000 (autoattack 1,000)" in rows[0] and "cifar10 (aaaaaaaa)" in rows[0] and "50.00%" in rows[0]
    assert "| 200 |" in rows[1] and "60.00%" in rows[1]
    assert "stl10 (bbbbbbbb)" in rows[2]
    assert samples_text({"samples": 5, "measure_samples": {"clean": 5}}) == "5"


def test_eval_prints_its_numbers_before_saving_and_falls_back_when_the_folder_is_unwritable(digits_set, encoder,
                                                                                          tmp_path):
    """The plugin makes every write of results.json and of its lock fail as on a read-only folder, then (second
    case) every write anywhere as on a full disk; the numbers are on the screen in both, the fallback file in
    the first, one error line and exit 1 in the second."""
    (tmp_path / "readonly_disk.py").write_text(
        "import errno, os\n"
        "import pipeline.evaluation.records as rec\n"
        "import pipeline.locks as locks\n"
        "real_write, real_lock = rec.write_json, locks._lock_file\n"
        "FULL = os.environ.get('TEST_FULL') == '1'\n"
        "def write_json(path, obj):\n"
        "    if FULL or str(path).endswith(os.sep + 'results.json'):\n"
        "        raise OSError(errno.ENOSPC if FULL else errno.EROFS, 'No space left on device' if FULL else 'Read-only file system')\n"
        "    return real_write(path, obj)\n"
        "def _lock_file(path, *a, **k):\n"
        "    if FULL or str(path).endswith('.results.json.lock'):\n"
        "        raise OSError(errno.EROFS, 'Read-only file system', str(path))\n"
        "    return real_lock(path, *a, **k)\n"
        "rec.write_json, locks._lock_file = write_json, _lock_file\n")
    args = ["eval", "--data", digits_set.root, "--checkpoint", encoder, "--attack", "clean", "--epochs", "1",
            "--limit", "20", "--batch-size", "256"]
    env = {**_plugin_env(tmp_path, "readonly_disk"), "COLUMNS": "200"}
    r = run(*args, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "SLF evaluation" in out and "%" in out and "not writable (Read-only file system)" in out
    assert "results written to" in out and "pipeline-results-" in out
    r = run(*args, env={**env, "TEST_FULL": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout + r.stderr
    assert "SLF evaluation" in out and "%" in out  # printed before the failure
    assert "results.json: could not be written" in out and "failed too" in out


# -- records read back: sealed, linked to their data, finite; what select writes is checked -------------------
def _book(origin="fp-a"):
    import numpy as np
    import torch

    from pipeline.objectives import HeadRows
    from pipeline.selectors.recorded import RowBook

    book = RowBook(np.arange(10, 20), 2, origin)
    rows = HeadRows([torch.randn(3, 5), torch.randn(3, 5)], [torch.randn(3, 2), torch.randn(3, 2)], ["n", "a"])
    book.add(np.array([11, 15, 17]), rows, epoch=1)
    return book


def test_recorded_rows_are_sealed_and_linked_to_their_data_set(tmp_path):
    import io

    import numpy as np

    from pipeline.errors import DataError
    from pipeline.selectors.recorded import RecordedRows, RowBook

    for path in (_book().save(tmp_path / "book.rows"), _book().recorded().save(tmp_path / "round.rows")):
        assert RecordedRows.load(path, "fp-a").origin == "fp-a"
        with pytest.raises(DataError, match="recorded on the data set with fingerprint fp-a, not this one"):
            RecordedRows.load(path, "fp-b")
        data = bytearray(path.read_bytes())
        seal = io.BytesIO()
        np.save(seal, np.array(["0" * 64, "fp-a"], dtype=np.str_))
        data[-len(seal.getvalue()) - 1] ^= 0x01  # the last data byte before the seal, the length unchanged
        bad = path.with_suffix(".bad")
        bad.write_bytes(bytes(data))
        with pytest.raises(DataError, match="do not match their seal"):
            RecordedRows.load(bad)
    with pytest.raises(DataError, match="another run's file"):
        RowBook(range(10, 20), 2, "fp-b").load(tmp_path / "book.rows")


def test_non_finite_recorded_rows_are_refused_not_selected_from(tmp_path):
    import numpy as np

    from pipeline.errors import DataError
    from pipeline.selectors.recorded import RecordedRows

    book = _book()
    book.grads[book.visits > 0] = np.nan  # what a step with a non-finite loss would have recorded
    with pytest.raises(DataError, match="recorded grads hold non-finite values"):
        RecordedRows.load(book.save(tmp_path / "nan.rows"))


def test_select_checks_the_manifest_it_writes(digits_set, tmp_path, monkeypatch):
    import numpy as np

    from pipeline.selectors import Selection
    from pipeline.selectors.random import RandomSelector
    from pipeline.selectors.run import run_selection

    monkeypatch.setattr(RandomSelector, "select", lambda self, ctx: Selection(np.repeat(ctx.pool_ids[:5], 2)))
    with pytest.raises(PipelineError, match="selector 'random' chose 5 ids more than once"):
        run_selection(digits_set.root, "random", 0.1, tmp_path / "m.json", None, seed=0)
    assert not (tmp_path / "m.json").exists()
    monkeypatch.setattr(RandomSelector, "select", lambda self, ctx: Selection(np.array([10**9])))
    with pytest.raises(PipelineError, match="selector 'random' chose 1 ids outside its pool"):
        run_selection(digits_set.root, "random", 0.1, tmp_path / "m.json", None, seed=0)


def test_wrong_shaped_records_are_one_line_each(digits_set, encoder, tmp_path):
    """results.json as a list, a manifest whose producer is text, object-dtype pseudo-label arrays, a saved
    classifier naming a branch its encoder does not have, an experiment record with a wrong-typed column."""
    import json

    import numpy as np

    from conftest import write_tiny_run
    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.evaluation import evaluate
    from pipeline.evaluation.classifiers import load_saved_classifier
    from pipeline.experiment.run import _read_state
    from pipeline.pseudolabels import PseudoLabels, _digest
    from pipeline.shards.manifest import Manifest

    run_dir = write_tiny_run(tmp_path / "run")
    (run_dir / "results.json").write_text("[]")
    one_line_error(run("report", run_dir, "--out", tmp_path / "rep"), "results.json: the record = []: must be a table")

    m = Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[:5], producer={"name": "x"})
    path = m.save(tmp_path / "m.json")
    header = json.loads(path.read_text())
    header["producer"] = "evil"
    path.write_text(json.dumps(header))
    one_line_error(run("inspect", path), "producer = 'evil': must be a table")

    labels = PseudoLabels(np.arange(5), np.zeros((5, 1)), (2,), digits_set.fingerprint).save(tmp_path / "p.json")
    h = json.loads(labels.read_text())
    bad = labels.parent / h["labels_file"]
    np.save(bad, np.array([object()] * 5, dtype=object), allow_pickle=True)
    h["labels_sha256"] = _digest(bad)  # a consistent header: only the array's type is wrong
    labels.write_text(json.dumps(h))
    with pytest.raises(PipelineError, match="not a plain array"):
        PseudoLabels.load(labels)

    r = evaluate(digits_set.root, encoder, epochs=1, batch_size=256, limit=10, attack="clean", progress=False)
    ckpt = load_checkpoint(r["classifier_path"])
    ckpt["branches"] = {"eval": "no-such-branch"}
    save_checkpoint(tmp_path / "clf.pt", ckpt)
    with pytest.raises(PipelineError, match="are not batch-norm branches of its encoder"):
        load_saved_classifier(tmp_path / "clf.pt", digits_set, "cpu")

    state = tmp_path / "experiment.json"
    state.write_text(json.dumps({"format": "pipeline.experiment", "runs": {"a-s0": {"digest": "d", "row": {
        "arm": "a", "seed": 0, "run": "r", "method": "acl", "selector": "-", "fraction": "all", "eval": {}}}}}))
    with pytest.raises(PipelineError, match="runs.a-s0.row.fraction = 'all': must be a finite number"):
        _read_state(state)


# -- secrets: a data URL's credentials are never written down ----------------------------------------------
def test_credentials_in_a_data_url_are_in_no_file_and_no_line(digits_set, tmp_path):
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    from servers import RangeServer

    secret = "s3cretPW"
    with RangeServer(digits_set.root) as srv:
        url = srv.url.replace("http://", f"http://reader:{secret}@")
        small = ["--set", "model.head_width=16", "--set", "model.proj_dim=8", "--set", "attack.steps=1",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]
        runs = [run("train", "--data", url, "--out", tmp_path / "run", "--arch", "smallcnn", "--epochs", "1",
                    "--batch-size", "256", "--workers", "0", *small),
                run("eval", "--data", url, "--checkpoint", tmp_path / "run" / "checkpoints" / "last.pt",
                    "--attack", "clean", "--epochs", "1", "--limit", "20", "--batch-size", "256"),
                run("report", tmp_path / "run", "--out", tmp_path / "report")]
        for r in runs:
            assert r.returncode == 0, r.stderr[-2000:]
        (tmp_path / "exp.toml").write_text(f"""
[experiment]
out = "{tmp_path / 'exp'}"
seeds = [0]
[data]
path = "{url}"
batch_size = 256
workers = 0
[model]
arch = "smallcnn"
head_width = 16
proj_dim = 8
[attack]
steps = 1
[optim]
epochs = 1
[eval]
epochs = 1
limit = 20
attack = "clean"
[[arm]]
name = "full"
""")
        runs.append(run("experiment", tmp_path / "exp.toml"))
        assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
        # an error line that names the URL
        runs.append(run("train", "--data", url + "/nowhere", "--out", tmp_path / "bad", "--epochs", "1"))
        assert runs[-1].returncode != 0
        one_line_error(runs[-1], "***@127.0.0.1")
        # a resume without the URL says how to give it again
        one_line_error(run("train", "--resume", tmp_path / "run", "--epochs", "2"), "resume with --data")
    for r in runs:
        assert secret not in r.stdout + r.stderr
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
              and p.name != "exp.toml"]
    assert not leaked, leaked
    from pipeline.redact import redact

    assert redact("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1") == "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"
    assert redact("https://h/p?sig=zz&sv=2020") == "https://h/p?sig=***&sv=2020"


# -- settings from someone else's files never send data anywhere ---------------------------------------------
FAKE_WANDB = '''
import json, os
class _Run:
    summary = {}
    def define_metric(self, *a, **k): pass
    def log(self, *a, **k): pass
    def finish(self): pass
def init(**kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"mode": kw.get("mode")}) + "\\n")
    return _Run()
'''


def test_online_logging_only_when_the_invoking_command_asks(digits_set, tmp_path):
    """A run whose config.toml says W&B online (someone else's, or an old one): evaluating its checkpoint and
    resuming it log offline; WANDB_MODE in the invoking user's environment still decides."""
    import json

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb-calls.jsonl"
    env = {**os.environ, "FAKE_WANDB_LOG": str(log), "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])}
    env.pop("WANDB_MODE", None)
    args = ["--data", digits_set.root, "--arch", "smallcnn", "--batch-size", "256", "--workers", "0",
            "--set", "model.head_width=16", "--set", "model.proj_dim=8", "--set", "attack.steps=1"]
    r = run("train", *args, "--out", tmp_path / "theirs", "--epochs", "1", "--set", "run.loggers=wandb",
            "--set", "run.wandb_mode=online", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["mode"] for x in log.read_text().splitlines()] == ["online"]  # their own command asked
    log.unlink()
    r = run("eval", "--data", digits_set.root, "--checkpoint", tmp_path / "theirs" / "checkpoints" / "last.pt",
            "--attack", "clean", "--epochs", "1", "--limit", "20", "--batch-size", "256", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train", "--resume", tmp_path / "theirs", "--epochs", "2", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "logs offline unless its command asks" in r.stderr
    assert {json.loads(x)["mode"] for x in log.read_text().splitlines()} == {"offline"}
    log.unlink()
    r = run("eval", "--data", digits_set.root, "--checkpoint", tmp_path / "theirs" / "checkpoints" / "last.pt",
            "--attack", "clean", "--epochs", "1", "--limit", "20", "--batch-size", "256",
            env={**env, "WANDB_MODE": "online"})
    assert r.returncode == 0 and {json.loads(x)["mode"] for x in log.read_text().splitlines()} == {"online"}


# -- one line, never a traceback ----------------------------------------------------------------------------
def test_own_model_code_that_fails_in_any_way_is_one_line(digits_set, tmp_path):
    (tmp_path / "nets.py").write_text("def raises():\n    raise ValueError('boom')\n"
                                      "def needs(a, b):\n    return None\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('import fails')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for arch, needle in [("module:nets:raises", "calling nets.raises() failed (ValueError: boom)"),
                         ("module:nets:needs", "calling nets.needs() failed (TypeError"),
                         ("module:broken:f", "importing 'broken' failed (RuntimeError: import fails)")]:
        one_line_error(run("train", "--data", digits_set.root, "--out", tmp_path / "r", "--arch", arch,
                           "--epochs", "1", "--overwrite", env=env), needle)


def test_deeply_nested_records_and_settings_are_one_line(digits_set, tmp_path):
    from conftest import write_tiny_run

    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("[run]\nseed = " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(run("train", "--config", deep_toml, "--data", digits_set.root, "--out", tmp_path / "r"),
                   "deep.toml")
    runs = write_tiny_run(tmp_path / "run")
    (runs / "results.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    one_line_error(run("report", runs, "--out", tmp_path / "rep"), "results.json: not JSON")


def test_a_negative_seed_is_one_line(digits_set, tmp_path):
    r = run("select", "--data", digits_set.root, "--selector", "random", "--fraction", "0.1", "--out",
            tmp_path / "m.json", "--seed", "-3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "-3" in r.stderr
    from pipeline.selectors.run import run_selection

    with pytest.raises(PipelineError, match="seed -3: a whole number >= 0"):
        run_selection(digits_set.root, "random", 0.1, tmp_path / "m.json", seed=-3)


class FullDisk:
    """A file whose disk fills after `writes["left"]` more writes: each after that raises ENOSPC."""

    def __init__(self, f, writes: dict):
        self.f, self.writes = f, writes

    def write(self, text):
        import errno

        if self.writes["left"] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.writes["left"] -= 1
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# -- messages that name the problem: a full disk during certify ----------------------------------------------
def test_certify_on_a_full_disk_names_its_table_and_the_rerun_continues(digits_set, encoder, tmp_path, monkeypatch):
    import pipeline.evaluation.certify as cert
    from pipeline.errors import WriteError

    args = dict(sigma=0.25, n0=20, n=200, alpha=0.01, limit=4, progress=False, epochs=1, batch_size=256)
    writes = {"left": 3}  # the header and two rows fit, then the disk is full
    monkeypatch.setattr(cert, "open", lambda path, mode="r": FullDisk(open(path, mode), writes), raising=False)
    tsv = tmp_path / "c" / "certify.tsv"
    with pytest.raises(WriteError, match=r"certify.tsv: could not be written \(No space left on device; the rows "
                                         r"already written are kept"):
        cert.certify(digits_set.root, encoder, out=tmp_path / "c", **args)
    assert len(cert.read_rows(tsv)) == 2
    monkeypatch.undo()
    done = cert.certify(digits_set.root, encoder, out=tmp_path / "c", **args)
    assert done["samples"] == 4 and len(cert.read_rows(tsv)) == 4
    # the first write failing leaves an empty table (or a header cut short): the rerun starts it again
    for start in ("", "id\tlab"):
        (tmp_path / "e").mkdir(exist_ok=True)
        (tmp_path / "e" / "certify.tsv").write_text(start)
        assert cert.certify(digits_set.root, encoder, out=tmp_path / "e", **args)["samples"] == 4
        (tmp_path / "e" / "certify.tsv").unlink()


# -- report output -------------------------------------------------------------------------------------------
def test_report_refuses_a_shard_set_folder_and_keeps_same_named_runs_apart(digits_set, tmp_path):
    from conftest import make_prepared, write_tiny_run

    ss = make_prepared("digits", tmp_path / "set")
    before = sorted(p.name for p in ss.root.iterdir())
    one_line_error(run("report", write_tiny_run(tmp_path / "x" / "run"), "--out", ss.root), "is a shard set")
    assert sorted(p.name for p in ss.root.iterdir()) == before
    a, b = write_tiny_run(tmp_path / "a" / "run"), write_tiny_run(tmp_path / "b" / "run")
    (b / "metrics.jsonl").write_text((b / "metrics.jsonl").read_text().replace('"loss": 1.0', '"loss": 2.0'))
    r = run("report", a, b, "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*-training.png"))
    assert pngs == ["a-run-training.png", "b-run-training.png"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "(a-run-training.png)" in md and "(b-run-training.png)" in md


def test_select_watch_stops_when_its_run_folder_is_deleted_or_replaced(digits_set, tmp_path):
    import shutil
    import threading
    import time

    from pipeline.selectors.watch import watch_run

    for replace in (False, True):
        run_dir = tmp_path / f"run{int(replace)}"
        run_dir.mkdir()
        (run_dir / ".pipeline-run.json").write_text('{"method": "acl", "tool": "pipeline"}')  # a started run
        result = {}

        def watch():
            try:
                watch_run(run_dir, digits_set.root, "random", 0.25, {}, 0, "cpu", poll_s=0.01)
            except PipelineError as exc:
                result["error"] = str(exc)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        time.sleep(0.2)  # the watch is polling a run with no checkpoint yet
        if replace:  # another run under the same name, put in place with no moment where the name is missing
            new = tmp_path / "new"  # (rmtree then mkdir leaves one: a watcher polling then rightly says deleted)
            new.mkdir()
            (new / ".pipeline-run.json").write_text('{"method": "acl", "tool": "pipeline", "new": 1}')
            (run_dir / ".pipeline-run.json").unlink()  # an emptied folder: rename(2) replaces it in one step
            os.rename(new, run_dir)
        else:
            shutil.rmtree(run_dir)
        t.join()  # the event itself; a hang is pytest-timeout's
        assert ("was replaced by another folder" if replace else "was deleted") in result["error"]


def test_a_damaged_csv_log_never_stops_a_resume(digits_set, tmp_path):
    from pipeline.trainers import create_trainer, load_config
    from test_train import tiny_cfg

    run_dir = tmp_path / "run"
    cfg = tiny_cfg(digits_set.root, run_dir, **{"run.loggers": ["csv"], "optim.epochs": 2})
    with create_trainer(cfg, progress=False) as trainer:
        trainer.fit(stop_after=1)
    (run_dir / "logs" / "train.csv").write_text("global_step,loss\nnot-a-number,1\n")
    (run_dir / "logs" / "epoch.csv").write_bytes(b"\xff\xfe\x00garbage")
    with create_trainer(load_config(run_dir / "config.toml"), resume=True, progress=False) as trainer:
        trainer.fit()
    assert len(list((run_dir / "logs").glob("train.csv.corrupt-*"))) == 1
    assert len(list((run_dir / "logs").glob("epoch.csv.corrupt-*"))) == 1
    assert (run_dir / "logs" / "epoch.csv").read_text().startswith("global_step")


# -- the shared cache never follows planted links ------------------------------------------------------------
def test_the_cache_never_writes_through_links_planted_under_its_names(digits_set, tmp_path):
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    import numpy as np

    from pipeline.shards.shardset import ShardSet
    from pipeline.shards.storage import ReadOptions
    from servers import RangeServer

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    victims = {}
    shard = digits_set.shard_files("train")[0]
    for name in (f"{shard.sha256}.data", f"{shard.sha256}.have", ".lock"):
        victim = tmp_path / f"victim-{name.strip('.')}"
        victim.write_bytes(b"the victim's own bytes")
        victims[victim] = victim.read_bytes()
        (cache / name).symlink_to(victim)
    ids = digits_set.ids("train")[:50]
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, ReadOptions(cache_dir=str(cache)))
        got = np.concatenate([b.images.numpy() for b in remote.loader("train", ids, batch_size=25, shuffle=False)])
    want = np.concatenate([b.images.numpy() for b in digits_set.loader("train", ids, batch_size=25, shuffle=False)])
    np.testing.assert_array_equal(got, want)  # read all the same, uncached where the cache refused
    for victim, before in victims.items():
        assert victim.read_bytes() == before, victim
    other = tmp_path / "shared"
    other.mkdir()
    other.chmod(0o777)
    with RangeServer(digits_set.root) as srv:
        remote = ShardSet.open(srv.url, ReadOptions(cache_dir=str(other)))
        list(remote.loader("train", ids, batch_size=25, shuffle=False))
    assert not list(other.glob("*.data"))  # a folder others can write to is not used


# -- a full disk while appending names the file, and what was written stays -----------------------------------
def test_a_full_disk_while_appending_names_the_file_and_keeps_its_lines(tmp_path, monkeypatch):
    import errno

    import pipeline.atomic as atomic
    import pipeline.shards.prepare as prep
    from pipeline.errors import WriteError
    from pipeline.loggers.csv_logger import CSVLogger

    real_open = open
    log = CSVLogger(tmp_path / "run", {})
    log.log({"kind": "step", "loss": 1.0}, 1)
    monkeypatch.setattr(atomic, "open", lambda *a, **k: FullDisk(real_open(*a, **k), {"left": 0}), raising=False)
    with pytest.raises(WriteError, match=r"/train.csv: could not be written \(no space left on device\); the "
                                         r"lines already in it are kept"):
        log.log({"kind": "step", "loss": 0.5}, 2)
    monkeypatch.undo()
    assert (log.folder / "train.csv").read_text().count("\n") == 2  # the header and the first row

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.os, "fsync", full)
    r_out = tmp_path / "set"
    with pytest.raises(WriteError, match=r"\.prepare-journal\.jsonl: could not be written \(No space left"):
        prep.prepare("digits", prep.PrepareOptions(out=r_out, shard_size=600, progress=False, workers=1))
