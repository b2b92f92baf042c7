"""Issue 39's battery: the newer surfaces (plugins, records read back, evaluation results, object storage and
HTTP, the cache, loggers) tried as a careless user and as an attacker would. One rule per root cause; every case
makes its own data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.errors import PipelineError

PY = [sys.executable, "-m", "pipeline"]


def run(*args, env=None, **kw):
    return subprocess.run([*PY, *map(str, args)], capture_output=True, text=True, env=env, **kw)


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
