"""`python -m pipeline ARGS` for tests, forked from a process that has already imported torch and the pipeline.

A fresh interpreter pays 2-3 s of imports on these cores before the command does anything, and the suite runs
the command line over a hundred times. Here one helper process per test worker imports the heavy stack once,
then forks a child per command; the child takes the caller's working folder, environment (PYTHONPATH entries
included) and file-size limit, points its stdin/stdout/stderr at files, and runs the `pipeline` package as
`python -m` would (runpy, argv, atexit handlers, the exit code or -signal). What it cannot reproduce is what
happens at interpreter start: tests of that (`--help` importing no torch, start-up time) and tests that signal
a process or read its output while it runs use `subprocess` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SERVER = r"""
import json, os, sys
import torch, numpy, pipeline.cli, pipeline.trainers, pipeline.evaluation, pipeline.selectors.run  # noqa: F401
import pipeline.shards.prepare, pipeline.report  # noqa: F401

def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for entry in reversed([p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        for fd, (path, mode) in enumerate(((req["stdin"], os.O_RDONLY), (req["stdout"], os.O_WRONLY),
                                           (req["stderr"], os.O_WRONLY))):
            f = os.open(path, mode)
            os.dup2(f, fd)
            os.close(f)
        if "OMP_NUM_THREADS" in req["env"]:  # read when torch loaded, in this server: set as it would be
            torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
        if req["fsize"] is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        import atexit, runpy, traceback
        sys.argv = ["pipeline", *req["argv"]]
        try:
            runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    finally:
        os._exit(code & 0xFF)

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""

_server: subprocess.Popen | None = None
_pending = bytearray()  # what the server said past the last line read (the pid and the exit code can come in one read)


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _pending.clear()
        _server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   cwd=Path(__file__).resolve().parents[1])
        if _reply(_server) != "ready":
            raise RuntimeError("the pipeline fork server did not start")
    return _server


def _reply(server: subprocess.Popen):
    """The server's next line (JSON, or "ready"). No deadline: the server answers or dies (its pipe closes), and
    a hang is pytest-timeout's to end, as everywhere in the suite."""
    fd = server.stdout.fileno()
    while b"\n" not in _pending:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("the pipeline fork server died")
        _pending.extend(chunk)
    line, _, rest = bytes(_pending).partition(b"\n")
    _pending[:] = rest
    text = line.decode().strip()
    return text if text == "ready" else json.loads(text)


def pipeline(*args, cwd=None, env=None, input: str | None = None,
             limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """What `subprocess.run([python, -m, pipeline, *args], capture_output=True, text=True, ...)` returns."""
    argv = [str(a) for a in args]
    server = _start()
    with tempfile.TemporaryDirectory(prefix="clirun-") as tmp:
        io = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
        Path(io["stdin"]).write_text(input or "")
        for name in ("stdout", "stderr"):
            Path(io[name]).touch()
        req = {"argv": argv, "cwd": str(cwd or os.getcwd()), "env": dict(os.environ if env is None else env),
               "fsize": limit_file_bytes, **io}
        server.stdin.write((json.dumps(req) + "\n").encode())
        server.stdin.flush()
        _reply(server)  # the child's pid
        rc = _reply(server)["rc"]
        out, err = (Path(io[n]).read_text(errors="replace") for n in ("stdout", "stderr"))
    return subprocess.CompletedProcess([sys.executable, "-m", "pipeline", *argv], rc, out, err)
