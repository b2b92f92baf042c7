"""The shape of the package: layers import only downwards, registries describe themselves, parts registered
from outside show up everywhere names are listed, and method state survives a resume."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = str(Path(__file__).resolve().parent / "plugins")


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_no_test_waits_for_an_event_against_a_deadline():
    """A test that waits at most N seconds for an event and goes on fails on a loaded machine (issue 39): tests
    wait with conftest.wait_for, on the event and on the process they watch."""
    import re

    deadline = re.compile(r"time\.(time|monotonic|perf_counter)\(\)\s*\+")
    found = [f"{p.name}:{n}" for p in (ROOT / "tests").glob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if deadline.search(line)]
    assert not found, f"deadline waits in tests: {found}"


def test_no_function_local_imports_of_the_package_outside_the_cli():
    """Imports inside functions hide cycles from the import graph; the CLI keeps its own for start-up time."""
    found = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("pipeline"):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno} {inner.module}")
    assert not found, found


def test_the_help_catalogue_is_the_registries_and_help_imports_no_torch():
    """`pipeline COMMAND --help` reads the names it lists from pipeline/help_catalogue.json (issue 40: help took
    4 s importing torch); the copy must equal what the live registries say."""
    from pipeline.cli import HELP_CATALOGUE, help_catalogue

    assert json.loads(HELP_CATALOGUE.read_text()) == help_catalogue(), \
        "pipeline/help_catalogue.json is stale: run python scripts/help_catalogue.py"
    for args in (["--help"], ["train", "--help"], ["eval", "--help"], ["--version"], ["trian"]):
        code = ("import sys, runpy; sys.argv = ['pipeline', *sys.argv[1:]]\n"
                "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "sys.stderr.write('TORCH=%s' % ('torch' in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if k != "PIPELINE_PLUGINS"})
        assert "TORCH=False" in out.stderr, (args, out.stderr[-500:])
    assert "random | rcs" in subprocess.run([sys.executable, "-m", "pipeline", "select", "--help"],
                                            capture_output=True, text=True, cwd=ROOT).stdout


def test_the_settings_table_in_the_docs_is_the_declarations():
    import pipeline.trainers  # noqa: F401  (the methods' sections)
    from pipeline.config import settings_markdown

    assert (ROOT / "docs" / "SETTINGS.md").read_text() == settings_markdown() + "\n", \
        "docs/SETTINGS.md is stale: run python scripts/settings_doc.py"


def test_every_setting_has_help_and_every_rule_is_enforced():
    import pipeline.trainers  # noqa: F401
    from dataclasses import fields

    from pipeline.config import FIXED, SECTIONS, TrainConfig
    from pipeline.errors import PipelineError

    for name, cls in {**FIXED, **SECTIONS}.items():
        for f in fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    cfg = TrainConfig()
    cfg.set("method.name", "dynacl")
    cfg.set("dynacl.period", 0)  # a method section's rule, checked like the fixed ones
    with pytest.raises(PipelineError, match="dynacl.period = 0: must be at least 1"):
        cfg.validate()
    for key, bad in [("optim.lr", "inf"), ("optim.epochs", True), ("run.seed", 2**70)]:
        with pytest.raises(PipelineError, match=key):
            TrainConfig().set(key, bad)
    table = TrainConfig()
    table.set("select.params", {"k": 20, "unit": "batch"})  # a TOML table, kept as its k=v text
    assert table.select.params == "k=20,unit=batch"


def test_a_selection_round_does_not_import_the_training_stack(synthetic_set, tmp_path):
    code = f"""
import sys
from pipeline.selectors.run import run_selection
run_selection({str(synthetic_set.root)!r}, "rcs", 0.1, {str(tmp_path / 'm.json')!r}, arch="smallcnn", batch_size=128,
              params={{"refreshes": 2, "draws": 1}})
print(sorted(m for m in sys.modules if m.startswith("pipeline.trainers") or m == "pipeline.experiment"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "m.json").is_file()


def test_round_processes_fork_from_a_server_that_imported_torch_and_not_the_training_stack(tmp_path):
    """A round that needs a process of its own starts as a fork of a server that imported torch and the selection
    code once (no `import torch` per round), and never the trainers."""
    (tmp_path / "probe_mod.py").write_text(
        "import sys\n\ndef report(q):\n    q.put(('torch' in sys.modules, 'pipeline.selectors.run' in sys.modules,\n"
        "           sorted(m for m in sys.modules if m.startswith('pipeline.trainers'))))\n")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
import probe_mod
from pipeline.selectors.background import round_context
ctx = round_context()
q = ctx.Queue()
p = ctx.Process(target=probe_mod.report, args=(q,))
p.start()
print(q.get())
p.join()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(True, True, [])"


@pytest.fixture
def toy_parts(monkeypatch):
    """The parts of tests/plugins/toy_parts.py registered here and, through PIPELINE_PLUGINS, in every process."""
    monkeypatch.syspath_prepend(PLUGINS)
    monkeypatch.setenv("PIPELINE_PLUGINS", "toy_parts")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([PLUGINS, os.environ.get("PYTHONPATH", "")]))
    from pipeline.registry import load_plugins

    load_plugins()
    yield
    from pipeline.config import METHOD_SECTIONS
    from pipeline.evaluation.measures import MEASURES
    from pipeline.selectors import SELECTORS
    from pipeline.trainers import TRAINERS

    TRAINERS.remove("test-ema")
    METHOD_SECTIONS.pop("test-ema", None)
    SELECTORS.remove("test-first")
    MEASURES.remove("test-flip")
    sys.modules.pop("toy_parts", None)


def _help(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline", *args, "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def test_registered_parts_appear_in_the_help_texts(toy_parts):
    train = _help("train")
    assert "test-ema" in train and "pgd-at" in train and "mart" in train  # every method, the new one too
    assert "test-first" in train and "infobatch" in train
    assert "[select]" in train and "[eval]" in train  # --config names every section
    assert "test-first" in _help("select")
    assert "test-flip" in _help("eval")


def test_registered_parts_appear_in_runs_reports_and_tables(toy_parts, digits_set, tmp_path):
    from pipeline.evaluation import evaluate
    from pipeline.experiment import Arm, Experiment, results_markdown
    from pipeline.report import build_report
    from pipeline.trainers import create_trainer
    from test_train import tiny_cfg

    run = tmp_path / "run"
    cfg = tiny_cfg(digits_set.root, run, **{"method.name": "test-ema", "optim.epochs": 3,
                                            "select.selector": "test-first", "select.fraction": 0.5,
                                            "select.warmup": 1, "select.every": 1, "select.sync": True})
    t = create_trainer(cfg, progress=False)
    try:
        t.fit()
    finally:
        t.close()
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["kind"] == "selection"]
    assert rounds and all(r["selector"] == "test-first" for r in rounds)  # chosen in a spawned process
    result = evaluate(digits_set.root, run / "checkpoints" / "last.pt", "slf", "clean,test-flip", epochs=1, lr=0.1,
                      batch_size=128, limit=64, progress=False)
    assert 0 <= result["test-flip"] <= 1
    md = build_report([run], tmp_path / "report")[0].read_text()
    assert "Flipped (test)" in md and "test-ema" in md and "test-first" in md
    row = {"arm": "toy", "seed": 0, "run": str(run), "method": "test-ema", "selector": "test-first", "fraction": 0.5,
           "clean": result["clean"], "test-flip": result["test-flip"], "train_s": 1.0, "images": 10, "epochs": 3,
           "rounds": len(rounds), "selection_s": 0.1, "selection_process_s": 0.1, "stall_s": 0.0,
           "eval": {"protocol": "slf", "samples": 64, "eps": 0.1}}
    exp = Experiment(tmp_path / "exp.toml", tmp_path / "exp", {}, [Arm("toy", {}, [0])])
    table = results_markdown(exp, [row])
    assert "test-flip" in table and "test-ema" in table and "test-first" in table


def test_method_state_is_checkpointed_and_restored(toy_parts, digits_set, tmp_path):
    """An EMA teacher (state beyond the model) resumes exactly: the same teacher and model as one straight run."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.trainers import create_trainer, load_config
    from test_train import tiny_cfg

    over = {"method.name": "test-ema", "optim.epochs": 2}
    straight = create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False)
    straight.fit()
    straight.close()
    first = create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False)
    first.fit(stop_after=1)
    first.close()
    resumed = create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False)
    resumed.fit()
    resumed.close()
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("a", "b"))
    teacher_a, teacher_b = a["method_state"]["teacher"], b["method_state"]["teacher"]
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_report_never_writes_into_the_run_folders_it_reads(tmp_path):
    """A torn last row of a certification table (a run killed mid-write) is skipped by readers, not cut off:
    only `pipeline certify`, the table's writer, repairs it."""
    from pipeline.evaluation.certify import COLUMNS, read_rows
    from pipeline.report import build_report

    from conftest import write_tiny_run

    run = write_tiny_run(tmp_path / "run")
    (run / "certify" / "c").mkdir(parents=True)
    tsv = run / "certify" / "c" / "certify.tsv"
    tsv.write_text("\t".join(COLUMNS) + "\n1\t0\t0\t0.5\t1\t0.1\n2\t1\t1\t0.2")  # the second row is torn
    summary = {"settings": {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001}, "samples": 1, "abstained": 0,
               "certified_accuracy": {"0": 1.0, "0.25": 1.0}, "linf_radius": {"0": 0.0, "0.25": 0.01}, "dims": 64,
               "linf_eps": 0.1, "l2_radius_covering_linf_eps": 0.8, "certified_accuracy_at_linf_eps": 0.0,
               "seconds_per_sample": 0.1}
    (run / "certify" / "c" / "certify.json").write_text(json.dumps(summary))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert len(read_rows(tsv)) == 1
    md, _ = build_report([run], tmp_path / "report")
    assert "certification" in md.read_text()
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_registry_lists_looks_up_and_names_every_choice():
    from pipeline.errors import PipelineError
    from pipeline.registry import Registry

    r = Registry("widget", flag="--widget")

    @r.register
    class Small:
        name = "small"

    r.register("large")(dict)
    assert r.names() == ["small", "large"] and "small" in r and r.get("huge") is None
    assert r.lookup("small") is Small and r.create("large", a=1) == {"a": 1}
    with pytest.raises(PipelineError, match=r"--widget 'huge': choose one of small, large"):
        r.lookup("huge")
