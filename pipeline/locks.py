"""One writer per folder: an exclusive lock held while a command writes into a folder.

The lock is `FOLDER/.pipeline.lock`, held with flock(2) (released by the kernel when its holder dies, so a
crash never leaves a folder locked) and naming its owner: pid, host, command and start time; it is removed
on a clean release. A second writer
fails at once with one line naming the owner; a record left by a process that died is taken over with a
message. Within one process a folder's lock is re-entrant (a resumed trainer in the same process, tests).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.progress import console
from pipeline.validate import parse_json

LOCK_NAME = ".pipeline.lock"
_held: dict[str, list] = {}  # real folder path -> [fd, count]


def _record(path: Path) -> dict:
    try:
        return parse_json(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _lock_file(path: Path, wait: float = 0.0) -> int | None:
    """An open descriptor holding flock(LOCK_EX) on `path`, or None when another holder keeps it for `wait`
    seconds. A file its releasing holder removed between our open and our flock is opened again."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PipelineError(f"{path.parent}: not writable ({exc.strerror}); choose another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            continue
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def acquire(folder: str | os.PathLike, command: str) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{folder}: exists and is not a folder; choose another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{folder}: cannot create the folder ({exc.strerror}); choose another one") from None
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        return
    path = folder / LOCK_NAME
    fd = _lock_file(path)
    if fd is None:
        owner = _record(path)
        raise PipelineError(f"{folder}: in use by `{owner.get('command', '?')}` (pid {owner.get('pid', '?')} on "
                            f"{owner.get('host', '?')} since {owner.get('started', '?')}); wait for it to finish "
                            "or choose another folder")
    stale = _record(path)
    if stale.get("pid") and stale.get("pid") != os.getpid():
        console.print(f"{folder}: taking over the lock left by `{stale.get('command', '?')}` (pid {stale['pid']} "
                      f"on {stale.get('host', '?')}), which is no longer running")
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(mine).encode(), 0)
    if not _held:
        atexit.register(release_all)  # an error or Ctrl-C exit releases cleanly too (only kill -9 leaves a record)
    _held[key] = [fd, 1]


def release(folder: str | os.PathLike) -> None:
    key = os.path.realpath(folder)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    try:
        os.unlink(os.path.join(key, LOCK_NAME))  # released cleanly: no record left to take over
    except OSError:
        pass
    finally:
        os.close(entry[0])  # closing the descriptor releases the flock


def release_all() -> None:
    for key in list(_held):
        _held[key][1] = 1
        release(key)


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str | None = None):
    acquire(folder, command or " ".join(["pipeline", *sys.argv[1:2]]))
    try:
        yield
    finally:
        release(folder)


@contextmanager
def record_lock(record: str | os.PathLike, command: str, timeout: float = 120.0):
    """Hold `.NAME.lock` beside the record file NAME for a read-merge-write of it (results.json): writers of
    the same record take turns (waiting up to `timeout` seconds) instead of losing each other's entries;
    unlike the folder lock, a training run holding its folder does not keep an evaluation out."""
    record = Path(record)
    record.parent.mkdir(parents=True, exist_ok=True)
    path = record.with_name(f".{record.name}.lock")
    fd = _lock_file(path, wait=timeout)
    if fd is None:
        owner = _record(path)
        raise PipelineError(f"{record}: held by `{owner.get('command', '?')}` (pid {owner.get('pid', '?')}) "
                            f"for over {timeout:.0f} s; wait for it to finish")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command}).encode(), 0)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
