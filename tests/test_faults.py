"""Faults a hostile but fair user causes: concurrent writers, foreign files, outside links, interrupted
manifest writes, killed parents, hostile shards, bad values, signals. Generated data and tiny runs only."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.shards.manifest import Manifest
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.shards.verify import verify

from conftest import make_prepared, wait_for, write_image_folder
from clirun import pipeline as pipeline_cli

PY = [sys.executable, "-m", "pipeline"]


def run(*args, **kw):
    return pipeline_cli(*args, **kw)


def one_line_error(r, needle):
    assert r.returncode != 0, r.stderr
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# -- 1. one writer per folder --------------------------------------------------------------------------------
def test_a_second_writer_fails_at_once_and_a_dead_owner_is_taken_over(tmp_path):
    out = tmp_path / "set"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline import locks; "
                               f"locks.acquire({str(out)!r}, 'pipeline prepare synthetic'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run("prepare", "digits", "--out", out)
        one_line_error(r, f"in use by `pipeline prepare synthetic` (pid {holder.pid}")
        r = run("train", "--data", out, "--out", out, "--epochs", "1")
        one_line_error(r, "in use by")
    finally:
        holder.kill()
        holder.wait()
    r = run("prepare", "digits", "--out", out)  # the owner died holding it: taken over, with a message
    assert r.returncode == 0, r.stderr
    assert f"taking over the lock left by `pipeline prepare synthetic` (pid {holder.pid}" in r.stderr
    assert verify(out, progress=False) == [] and not (out / ".pipeline.lock").exists()


def test_two_prepares_into_one_folder_leave_a_valid_set(tmp_path):
    out = tmp_path / "race"
    procs = [subprocess.Popen([*PY, "prepare", "synthetic:1500", "--out", str(out), "--shard-size", "100",
                               "--seed", str(s)], stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(rc == 0 for rc, _ in results) == [False, True]  # other seeds: never both
    for rc, err in results:
        if rc != 0:  # the loser says so in one line; the winner's set is intact
            assert ("in use by" in err or "other settings" in err) and "Traceback" not in err
    assert verify(out, progress=False) == []


# -- 2. never delete or replace what the project did not write -----------------------------------------------
def test_foreign_files_are_never_deleted(tmp_path):
    out = tmp_path / "set"
    make_prepared("digits", out, shard_size=400)
    (out / "train-000099.tar").write_bytes(b"not ours")  # matches our naming, listed by no record of ours
    with pytest.raises(PipelineError, match="did not write \\(train-000099.tar\\)"):
        prepare("digits", PrepareOptions(out=out, seed=5, overwrite=True, progress=False))
    assert (out / "train-000099.tar").read_bytes() == b"not ours" and verify(out, progress=False) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"mine": true}')
    with pytest.raises(PipelineError, match="not a shard-set index written by this tool"):
        prepare("digits", PrepareOptions(out=other, overwrite=True, progress=False))
    assert (other / "index.json").read_text() == '{"mine": true}'


def test_train_refuses_a_folder_that_is_not_a_run_and_overwrite_keeps_foreign_files(digits_set, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("mine")
    base = ["train", "--data", digits_set.root, "--arch", "smallcnn", "--epochs", "1", "--batch-size", "128",
            "--workers", "0", "--set", "attack.steps=1", "--set", "model.head_width=16", "--set", "model.proj_dim=8"]
    one_line_error(run(*base, "--out", notes), "holds files that are not a training run (thesis.tex)")
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]
    runs = tmp_path / "run"
    assert run(*base, "--out", runs).returncode == 0
    (runs / "my-plot.png").write_bytes(b"mine")
    r = run(*base, "--out", runs, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (runs / "my-plot.png").read_bytes() == b"mine"


# -- 3. links out of the source tree ------------------------------------------------------------------------
def test_links_leaving_the_source_folder_are_skipped_unless_asked(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, n_per_class=3)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((src / "cat" / "000.png").read_bytes())
    (src / "cat" / "999.png").symlink_to(outside)
    (src / "dog" / "nested").mkdir()
    ss = make_prepared(f"folder:{src}", tmp_path / "a", test_fraction=0.0)
    assert ss.count("train") == 9
    reasons = {e["source"]: e["reason"] for e in ss.index["skipped"]}
    assert "outside the source folder" in reasons["cat/999.png"] and "folder inside" in reasons["dog/nested"]
    assert make_prepared(f"folder:{src}", tmp_path / "b", test_fraction=0.0, follow_symlinks=True).count("train") == 10


# -- 4. manifests switch atomically -------------------------------------------------------------------------
def test_a_rewrite_killed_before_the_header_switch_keeps_the_old_manifest(digits_set, tmp_path, monkeypatch):
    import pipeline.atomic as atomic

    path = tmp_path / "round-0001.json"
    old = Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[:10])
    old.save(path)
    real = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[20:40]).save(path)
    monkeypatch.setattr(atomic.os, "replace", real)
    m = Manifest.load(path)
    np.testing.assert_array_equal(m.ids, digits_set.ids("train")[:10])
    # a complete rewrite removes the old pair it replaced
    Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[20:40]).save(path)
    assert len(Manifest.load(path)) == 20 and len(list(tmp_path.glob("round-0001.*.npy"))) == 1


def test_select_refuses_to_write_onto_foreign_files_and_folders(digits_set, tmp_path):
    one_line_error(run("select", "--data", digits_set.root, "--selector", "random", "--out",
                       Path(digits_set.root) / "index.json"), "is not a manifest; refusing to replace it")
    one_line_error(run("select", "--data", digits_set.root, "--selector", "random", "--out", tmp_path), "is a folder")


# -- 5. workers die with their parent -----------------------------------------------------------------------
def test_prepare_workers_die_when_prepare_is_killed(tmp_path):
    p = subprocess.Popen([*PY, "prepare", "synthetic:40000", "--out", str(tmp_path / "big"), "--workers", "2",
                          "--shard-size", "500"], stderr=subprocess.DEVNULL)
    kids = []

    def two_workers():
        kids[:] = _children(p.pid)
        return len(kids) >= 2

    wait_for(two_workers, p, "prepare started its workers")
    p.kill()
    p.wait()
    wait_for(lambda: not any(_alive(k) for k in kids), what="the workers ended")


# -- 6. hostile shards --------------------------------------------------------------------------------------
def _rewrite_tar(path: Path, members):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, data)


def test_verify_reports_hostile_members_without_traceback_or_big_reads(tmp_path):
    import io

    ss = make_prepared("digits", tmp_path / "h", shard_size=600)
    rec = ss.index["splits"]["train"]["shards"][0]
    tar_path = ss.root / rec["tar"]
    with tarfile.open(tar_path) as tar:
        first = tar.getmembers()[0].name
    link = tarfile.TarInfo(first)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _rewrite_tar(tar_path, [(link, None)])
    problems = verify(ss.root, progress=False)
    assert any("is a symbolic link, not a file" in p for p in problems)
    assert any(str(tar_path) in p for p in problems) and len(problems) >= 2  # the other findings are kept too
    # a tiny tar that declares a 16 GiB member: never allocated, reported
    big = tarfile.TarInfo(first)
    big.size = 16 << 30
    header = big.tobuf(format=tarfile.GNU_FORMAT)
    tar_path.write_bytes(header + b"\0" * 1024)
    tracemalloc.start()
    try:
        problems = verify(ss.root, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20 and any(str(tar_path) in p for p in problems)
    assert io  # noqa


def test_prepare_redoes_a_shard_whose_bytes_changed_at_the_same_size(tmp_path):
    out = tmp_path / "c"
    ss = make_prepared("digits", out, shard_size=600)
    rec = ss.index["splits"]["train"]["shards"][1]
    path = out / rec["tar"]
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify(out, progress=False)
    result = prepare("digits", PrepareOptions(out=out, shard_size=600, progress=False))
    assert result.written == rec["count"] and verify(out, progress=False) == []


# -- 7. results of two checkpoints in one folder ------------------------------------------------------------
def test_results_of_two_checkpoints_are_both_kept(digits_set, tmp_path, monkeypatch):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.evaluation import evaluate
    from pipeline.models import create_model, model_spec

    folder = tmp_path / "ckpts"
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
        save_checkpoint(folder / f"s{seed}.pt", {"model_spec": m.spec, "model": m.state_dict(), "method": "acl"})
    kw = dict(epochs=1, batch_size=256, limit=20, attack="clean", progress=False)
    a = evaluate(digits_set.root, folder / "s0.pt", **kw)
    b = evaluate(digits_set.root, folder / "s1.pt", **kw)
    saved = json.loads((folder / "results.json").read_text())
    assert {a["checkpoint_sha256"], b["checkpoint_sha256"]} == set(saved) and len(saved) == 2
    import pipeline.evaluation.records as ev

    real = ev.write_json

    def unwritable(path, obj):
        if Path(path) == folder / "results.json":
            raise PermissionError(13, "Permission denied")
        return real(path, obj)

    monkeypatch.setattr(ev, "write_json", unwritable)
    c = evaluate(digits_set.root, folder / "s0.pt", **kw)
    assert c["results_path"] != str(folder / "results.json") and Path(c["results_path"]).is_file()


# -- one clear line for every bad value ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, digits_set):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model, model_spec

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.pt").write_bytes(b"")
    m = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
    state = m.state_dict()
    state[next(k for k, v in state.items() if v.is_floating_point())].fill_(float("nan"))
    save_checkpoint(d / "nan.pt", {"model_spec": m.spec, "model": state})
    (d / "latin1.toml").write_bytes("[optim]\n# r\xe9sum\xe9\nlr = 0.1\n".encode("latin-1"))
    (d / "afile").write_text("x")
    return d


@pytest.mark.parametrize("args,needle", [
    (["prepare", "digits", "--workers", "-1", "--out", "{tmp}/p"], "--workers -1"),
    (["stream", "{data}", "--workers", "-1"], "--workers -1"),
    (["train", "--data", "{data}", "--out", "{tmp}/t", "--lr", "0"], "optim.lr = 0.0 (--lr): must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/t", "--epochs", "0"], "optim.epochs = 0 (--epochs)"),
    (["train", "--data", "{data}", "--out", "{tmp}/t", "--workers", "-1"], "data.workers = -1 (--workers)"),
    (["train", "--data", "{data}", "--out", "{tmp}/t", "--set", "attack.eps=-0.1"], "attack.eps = -0.1"),
    (["train", "--data", "{data}", "--out", "{tmp}/t", "--set", "attack.steps=0"], "attack.steps = 0"),
    (["train", "--config", "{bad}/latin1.toml", "--data", "{data}", "--out", "{tmp}/t"], "not UTF-8"),
    (["train", "--data", "{data}", "--out", "{bad}/afile"], "not a folder"),
    (["prepare", "digits", "--out", "{bad}/afile"], "not a folder"),
    (["eval", "--data", "{data}", "--checkpoint", "{bad}/nan.pt", "--eps", "-1"], "eval.eps = -1.0 (--eps)"),
    (["eval", "--data", "{data}", "--checkpoint", "{bad}/nan.pt", "--limit", "0"], "--limit 0"),
    (["eval", "--data", "{data}", "--checkpoint", "{bad}/nan.pt", "--limit", "-3"], "--limit -3"),
    (["eval", "--data", "{data}", "--checkpoint", "{bad}/empty.pt"], "not a readable checkpoint"),
    (["eval", "--data", "{data}", "--checkpoint", "{bad}/nan.pt"], "non-finite weights"),
    (["select", "--data", "{data}", "--checkpoint", "{bad}/nan.pt", "--selector", "rcs", "--out", "{tmp}/m.json"],
     "non-finite weights"),
    (["select", "--data", "{data}", "--checkpoint", "{bad}/empty.pt", "--selector", "rcs", "--out", "{tmp}/m.json"],
     "not a readable checkpoint"),
])
def test_bad_values_are_one_line_and_non_zero(digits_set, bad_files, tmp_path, args, needle):
    fill = {"{data}": str(digits_set.root), "{tmp}": str(tmp_path), "{bad}": str(bad_files)}
    for k, v in fill.items():
        args = [a.replace(k, v) for a in args]
    one_line_error(run(*args), needle)


def test_a_loader_worker_error_shows_its_own_message(tmp_path):
    ss = make_prepared("digits", tmp_path / "w", shard_size=2000)
    table = ss.members("train")
    path = ss.shard_path("train", 0)
    data = bytearray(path.read_bytes())
    off = int(table.offsets[3])
    data[off:off + 16] = b"\0" * 16  # the PNG signature of sample 3 is gone
    path.write_bytes(bytes(data))
    r = run("stream", ss.root, "--workers", "1")
    one_line_error(r, "does not decode")
    assert "DataLoader worker" not in r.stderr and "Original Traceback" not in r.stderr


_EXIT_WITH_LIVE_WORKERS = """
import sys, time
import multiprocessing.popen_fork as popen_fork
from torch.utils.data import DataLoader
from pipeline import runtime
send = popen_fork.Popen._send_signal
def send_then_wait(self, sig):  # the race CI lost, made certain: the worker is dead before the exit hook goes on
    send(self, sig)
    time.sleep(1)
popen_fork.Popen._send_signal = send_then_wait
loader = DataLoader(range(100), num_workers=1, worker_init_fn=lambda i: runtime.become_worker(),
                    multiprocessing_context="fork")
batches = iter(loader)
next(batches)
sys.exit(3)  # as a command's error exit does: its loader and the worker are still alive
"""


def test_an_error_exit_with_loader_workers_alive_adds_nothing_to_its_message():
    """multiprocessing's exit hook ends live workers with SIGTERM; torch's SIGCHLD handler reported that as
    "DataLoader worker is killed by signal: Terminated", with a traceback, under a command's one-line error."""
    r = subprocess.run([sys.executable, "-c", _EXIT_WITH_LIVE_WORKERS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr == "", r.stderr


# -- signals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,group,workers", [
    (signal.SIGTERM, False, 0),
    (signal.SIGINT, True, 2),  # a terminal's Ctrl-C: the loader's worker processes get it too
    (signal.SIGTERM, True, 2),  # Slurm's scancel or time limit: every process of the job step gets it
])
def test_a_signal_during_training_says_what_was_kept(digits_set, tmp_path, sig, group, workers):
    out = tmp_path / "sig"
    p = subprocess.Popen([*PY, "train", "--data", str(digits_set.root), "--out", str(out), "--arch", "smallcnn",
                          "--epochs", "50", "--batch-size", "128", "--workers", str(workers), "--set",
                          "data.worker_kind=process", "--set", "attack.steps=1", "--set", "model.head_width=16",
                          "--set", "model.proj_dim=8"],
                         stderr=subprocess.PIPE, text=True, start_new_session=group)
    wait_for((out / "checkpoints" / "last.pt").exists, p, "the first checkpoint")
    if group:
        assert len(_children(p.pid)) >= workers  # the loader's workers are alive when the signal comes
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    err = p.communicate()[1]
    name = signal.Signals(sig).name
    assert p.returncode == 128 + sig, err
    assert f"interrupted ({name})" in err and f"--resume {out}" in err and "Traceback" not in err, err
    assert "exited unexpectedly" not in err and "race condition" not in err, err


def test_a_worker_the_command_hangs_up_on_says_nothing(tmp_path):
    """A command stopped while it takes a batch over from a loader worker hangs up on the worker's fd-sharing
    thread mid-handover; that thread printed the ConnectionResetError through sys.excepthook, under the
    command's "interrupted" line (seen once in the suite). Here the hang-up is made on purpose: a client
    connects to a worker's fd sharer and leaves without answering its challenge."""
    script = """
import os, socket, sys, time
from multiprocessing import resource_sharer
from pipeline.runtime import become_worker
if sys.argv[1] == "worker":
    become_worker()
shared = resource_sharer.DupFd(os.pipe()[0])
client = socket.socket(socket.AF_UNIX)
client.connect(shared._id[0])
time.sleep(0.3)  # the sharer's challenge arrives and is left unread: closing now resets the connection
client.close()
time.sleep(0.5)
print("done")
"""
    plain = subprocess.run([sys.executable, "-c", script, "plain"], capture_output=True, text=True, timeout=60)
    assert "ConnectionResetError" in plain.stderr  # the hang-up this guards against is real
    worker = subprocess.run([sys.executable, "-c", script, "worker"], capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0 and worker.stdout.strip() == "done" and worker.stderr == "", worker.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_prepare_and_its_workers_keeps_finished_shards(tmp_path, sig):
    out = tmp_path / "int"
    p = subprocess.Popen([*PY, "prepare", "synthetic:40000", "--out", str(out), "--workers", "2",
                          "--shard-size", "500"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    journal = out / ".prepare-journal.jsonl"
    wait_for(lambda: journal.exists() and len(journal.read_text().splitlines()) > 1, p, "two finished shards")
    os.killpg(p.pid, sig)  # as a terminal's Ctrl-C and a cluster's SIGTERM come: to the workers too
    err = p.communicate()[1]
    assert p.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"interrupted ({name})" in err and "run the same command again" in err and "Traceback" not in err, err
    assert len(journal.read_text().splitlines()) > 1  # the finished shards are kept for the resume


# -- smaller ---------------------------------------------------------------------------------------------------
def test_sixteen_bit_png_scales_to_eight_bits(tmp_path):
    from PIL import Image

    from pipeline.shards.images import Encoding, decode, transcode_file

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    data, ext, _ = transcode_file(path.read_bytes(), "L")
    got = decode(data, "L")[:, :, 0].astype(int)
    expected = np.round(ramp.astype(float) * 255 / 65535).astype(int)
    assert np.abs(got - expected).max() <= 1  # PIL's own convert clips to 255: nearly all white
    assert decode(transcode_file(path.read_bytes(), "L", Encoding(4))[0], "L").max() < 255


def test_a_class_whose_every_file_fails_is_an_error(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, n_per_class=3)
    for f in (src / "eel").iterdir():
        f.write_bytes(b"\x89PNG broken")
    with pytest.raises(PipelineError, match="every image of class 'eel'"):
        make_prepared(f"folder:{src}", tmp_path / "o", test_fraction=0.0)


def test_skip_reasons_carry_no_object_addresses(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, n_per_class=3)
    (src / "cat" / "bad.png").write_bytes(b"nonsense")
    ss = make_prepared(f"folder:{src}", tmp_path / "o", test_fraction=0.0)
    reason = next(e["reason"] for e in ss.index["skipped"] if e["source"].endswith("bad.png"))
    assert " at 0x" not in reason and reason


def test_training_on_the_test_split_warns(digits_set, tmp_path):
    r = run("train", "--data", digits_set.root, "--out", tmp_path / "t", "--arch", "smallcnn", "--epochs", "1",
            "--batch-size", "128", "--workers", "0", "--set", "data.split=test", "--set", "attack.steps=1",
            "--set", "model.head_width=16", "--set", "model.proj_dim=8")
    assert r.returncode == 0 and "training on the test split" in r.stderr
