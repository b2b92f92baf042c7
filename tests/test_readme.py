"""The README's code runs (issue 40): its Python snippets and its `pipeline` commands, on the demo's digits.

Every fenced block is taken: Python is executed; TOML is read as a run configuration; each shell command is
parsed by the command line (a renamed flag or a wrong value fails here), and executed on small data unless
`PARSE_ONLY` says why not (a service, hours of compute, a run the README never makes). Sizes are shrunk by the
rules of `shrink` (epochs to 1, a small network, a few test images); paths point at small sets made here. A
command whose input a later README command makes runs again after the others. A new README command is covered
the day it is written, and one that no rule knows fails the test until it is classified.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
import tomllib
import zlib
from pathlib import Path

import pytest

from clirun import pipeline as pipeline_cli
from conftest import write_cifar_pickles, write_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"

NOT_PIPELINE = {  # shell commands that are not `pipeline ...`, and where they are checked instead
    "make demo": "the fresh-clone check runs it",
    "make test": "it runs this",
    "pip install": "installs; nothing to run",
    "python examples/own_loop.py": "tests/test_examples.py runs it",
    "torchrun": "tests/test_train.py::test_torchrun_two_cpu_processes runs training under torchrun",
}
PARSE_ONLY = {  # pipeline commands parsed, not run: why
    "--watch": "waits for a run's checkpoints until stopped",
    "runs/simclr": "a SimCLR run the README does not make",
    "runs/dyn": "a run of another recipe the README does not make",
    "runs/acl-ext": "a running trainer the README does not make",
    "runs/acl-rcs": "a selecting run the README does not make",
    "s3://": "needs an S3 service (tests/test_remote.py)",
    "https://": "needs an HTTP server (tests/test_remote.py)",
    "pipeline experiment": "an hour or more of training (tests/test_experiment.py runs a small grid, "
                           "tests/test_transfer.py cifar10-transfer.toml at its CPU size)",
    "--data shards/cifar100": "here runs/acl is the grey digits': a colour set is refused (tests/test_transfer.py "
                              "evaluates across data sets)",
    "--data shards/stl10": "as for shards/cifar100",
}


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced block."""
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, start, body = line.strip()[3:].strip() or "text", n, []
            else:
                out.append((start, lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return out


def commands(text: str) -> list[str]:
    """Shell commands of a block: continuations joined, comments cut."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [c for c in (shlex.split(line, comments=True) for line in joined.splitlines()) if c]


def shrink(argv: list[str], paths: dict[str, str]) -> list[str]:
    """The same command at the size of a test: paths to the small sets, 1 epoch, a small network, few images."""
    out, i = [], 0
    argv = [paths.get(a, a) for a in argv]
    argv = [re.sub(r"^(folder|cifar10|cifar100|imagenet32|stl10|hf):(.*)$", lambda m: f"{m.group(1)}:{paths.get(m.group(2), m.group(2))}", a)
            for a in argv]
    selecting = "--selector" in argv and argv[1] == "train"
    sized = {"--epochs": "3" if selecting else "1", "--limit": "20", "--workers": "2", "--image-size": "16",
             "--warmup": "1", "--select-every": "1"}
    while i < len(argv):
        a = argv[i]
        if a in sized:
            out += [a, sized[a]]
            i += 2
            continue
        if a == "--arch" and argv[i + 1] in ("resnet18", "resnet50"):
            out += [a, "smallcnn"]
            i += 2
            continue
        if a == "--out" and argv[1] == "prepare":  # not over the digits that shards/cifar10 stands for here
            out += [a, f"prepared/{zlib.crc32(shlex.join(argv).encode())}"]
            i += 2
            continue
        out.append("synthetic:200" if re.fullmatch(r"synthetic:\d+", a) else a)
        i += 1
    if argv[1] == "prepare" and "--out" not in argv:  # shards/<name> by default: cifar10 is the digits here
        out += ["--out", f"prepared/{zlib.crc32(shlex.join(argv).encode())}"]
    if out[:2] == ["pipeline", "train"] and "--resume" not in out:
        out += ["--epochs", "1"] * ("--epochs" not in out) + ["--set", "attack.steps=1", "--set", "optim.warmup_epochs=0", "--batch-size", "256"]
        if "--config" not in out:
            out += ["--set", "model.head_width=16", "--set", "model.proj_dim=8"]
    if out[:2] == ["pipeline", "eval"]:  # a few test images, one finetuning epoch
        out += ["--limit", "20"] * ("--limit" not in out) + ["--epochs", "1"] * ("--epochs" not in out)
    return out


def parse(argv: list[str]) -> None:
    """Parse a command as the command line would, without running it: unknown flags and bad values fail."""
    import click
    import typer.main

    from pipeline.cli import _USAGE_ERRORS, app

    group = typer.main.get_command(app)
    sub = group.get_command(click.Context(group), argv[1])
    assert sub is not None, f"README: no command {argv[1]!r}"
    try:
        sub.make_context(argv[1], list(argv[2:]))
    except _USAGE_ERRORS as exc:
        pytest.fail(f"README: `{shlex.join(argv)}`: {exc.format_message()}")


@pytest.fixture
def workspace(digits_set, tmp_path):
    """A folder where the README's relative paths mean small sets: shards/cifar10 and shards/digits-16 are the
    digits, the CIFAR and ImageNet sources are a few images of each kind."""
    (tmp_path / "shards").mkdir()
    for name in ("cifar10", "digits-16"):
        (tmp_path / "shards" / name).symlink_to(digits_set.root)
    (tmp_path / "configs").symlink_to(README.parent / "configs")
    (tmp_path / "mymodels").mkdir()  # the README's own model: `module:mymodels.nets:make_encoder`
    (tmp_path / "mymodels" / "__init__.py").write_text("")
    (tmp_path / "mymodels" / "nets.py").write_text(
        "from torch import nn\n\n\ndef make_encoder():\n    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), "
        "nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    write_image_folder(tmp_path / "src" / "cifar10-folder", n_per_class=4)
    write_image_folder(tmp_path / "src" / "imagenet", n_per_class=4, size=20, fmt="jpeg")
    write_cifar_pickles(tmp_path / "src" / "cifar-10-batches-py", n_train=50, n_test=10)
    with tarfile.open(tmp_path / "src" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    write_cifar_pickles(tmp_path / "src" / "cifar-100-python", n_train=50, n_test=10, hundred=True)
    with tarfile.open(tmp_path / "src" / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    from test_sources import _write_imagenet_small, _write_stl10

    _write_imagenet_small(tmp_path / "src" / "Imagenet32_npz")
    from test_wds_index import write_wds

    write_wds(tmp_path / "src" / "imagenet-wds", counts=(("train", 12), ("val", 6)))
    from test_hf_source import _rows, write_saved

    write_saved(tmp_path / "src" / "cifar10-hf", {"train": _rows(12, 0)[1:], "test": _rows(6, 1)[1:]})
    _write_stl10(tmp_path / "src" / "stl10_binary")
    with tarfile.open(tmp_path / "src" / "stl10_binary.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "stl10_binary", arcname="stl10_binary")
    paths = {"../shared/data/cifar10": str(tmp_path / "src" / "cifar10-folder"),
             "/data/Imagenet32_npz": str(tmp_path / "src" / "Imagenet32_npz"),
             "/data/stl10_binary.tar.gz": str(tmp_path / "src" / "stl10_binary.tar.gz"),
             "~/data/cifar-10-python.tar.gz": str(tmp_path / "src" / "cifar-10-python.tar.gz"),
             "/data/cifar-100-python.tar.gz": str(tmp_path / "src" / "cifar-100-python.tar.gz"),
             "/data/imagenet": str(tmp_path / "src" / "imagenet"),
             "/data/imagenet-wds": str(tmp_path / "src" / "imagenet-wds"),
             "/data/cifar10-hf": str(tmp_path / "src" / "cifar10-hf"),
             "/data/cifar-10-batches-py": str(tmp_path / "src" / "cifar-10-batches-py")}
    return tmp_path, paths


def test_every_readme_block_runs(workspace):
    root, paths = workspace
    ran, parsed, later = [], [], []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for line, lang, text in blocks():
        if lang == "python":
            code = text.replace('device="cuda"', 'device="cpu"')  # the same snippet on this machine's device
            r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
            assert r.returncode == 0, f"README line {line}: the Python snippet fails:\n{r.stderr[-3000:]}"
            ran.append(line)
        elif lang == "toml":
            from pipeline.config import TrainConfig

            TrainConfig.from_dict(tomllib.loads(text)).validate()
        elif lang == "bash":
            for argv in commands(text):
                joined = shlex.join(argv)
                if argv[0] != "pipeline":
                    assert any(joined.startswith(k) for k in NOT_PIPELINE), \
                        f"README line {line}: `{joined}` is neither a pipeline command nor classified in NOT_PIPELINE"
                    continue
                parse(argv)
                if any(k in joined for k in PARSE_ONLY):
                    parsed.append(joined)
                    continue
                small = shrink(argv, paths)
                r = pipeline_cli(*small[1:], cwd=root, env=env)
                if r.returncode != 0:
                    later.append((line, small, r))
                else:
                    ran.append(joined)
    for line, small, first in later:  # inputs a later README command makes
        r = pipeline_cli(*small[1:], cwd=root, env=env)
        assert r.returncode == 0, (f"README line {line}: `{shlex.join(small)}` fails:\n{r.stdout[-1500:]}"
                                   f"{r.stderr[-3000:]}\n(first try: {first.stderr[-500:]})")
    assert len(ran) + len(later) >= 15 and parsed  # what a reader copies is what runs
