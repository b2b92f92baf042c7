"""Every artefact is written under a temporary name and renamed into place: a reader never sees half a file.

Temporary files are made by `tempfile.mkstemp` in the target's own folder (the rename stays on one file
system): a unique name, created exclusively (an existing file or link of that name is never opened, so no
symlink is followed), short whatever the target's length (`.tmp-PID-XXXXXXXX.tmp`, so a legal 250-character
target name works), removed when the write fails, and swept from a folder by the next writer there once the
process that made it is dead (a kill -9 mid-write leaves nothing behind for long).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.errors import WriteError

TEMP_PATTERN = re.compile(r"^\.tmp-(\d+)-[A-Za-z0-9_]{6,}\.tmp$")  # what `atomic_path` names its files
_swept: set[str] = set()  # folders this process has swept
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's own 0600 would hide shards from other users


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of dead writers from `folder` (only names `atomic_path` makes)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_PATTERN.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def is_temporary(name: str) -> bool:
    return TEMP_PATTERN.match(name) is not None


# Errors of the write itself (not of what the block reads): reported as one WriteError line naming the target.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.EIO, errno.ENOTDIR, errno.EISDIR}


def _is_write_failure(exc: OSError, *paths) -> bool:
    named = exc.filename is not None and str(exc.filename) in {str(p) for p in paths}
    # numpy's short write ("719 requested and 109 written") carries neither errno nor file name
    return named or exc.filename is None and (exc.errno in WRITE_ERRNOS or exc.errno is None)


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror.lower() if exc.errno != errno.EFBIG else "file too large for this disk or limit"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes. A failed write
    (no space, name too long, ...) raises one WriteError naming `path`; the temporary file is removed and
    `path` keeps its previous content."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.path.realpath(path.parent)
        if folder not in _swept:
            _swept.add(folder)
            sweep_temporaries(folder)
        if len(os.fsencode(path.name)) > 255:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
        fd, name = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # torch's own write errors become OSError in checkpoint.save_checkpoint
        if _is_write_failure(exc, path, path.parent, tmp):
            raise WriteError(path, _reason(exc)) from exc
        raise
    finally:
        if tmp is not None and (tmp.exists() or tmp.is_symlink()):
            tmp.unlink()


@contextmanager
def appending(path: str | os.PathLike, newline: str | None = None):
    """`path` opened to append lines to (a journal, a log, a table of results). A failed open or write (a full
    disk, a read-only folder) is one WriteError naming the file; the lines written before stay."""
    try:
        with open(path, "a", newline=newline) as f:
            yield f
            f.flush()
    except OSError as exc:
        raise WriteError(path, _reason(exc), appending=True) from None


def move_aside(path: str | os.PathLike) -> Path:
    """A damaged record of ours is kept, never dropped: renamed to NAME.corrupt-YYYYMMDD-HHMMSS beside it."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    os.replace(path, aside)
    return aside


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    # Through a file object: np.save on a name would append ".npy" to names such as "train-000000.idx".
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
