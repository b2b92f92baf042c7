"""Process-wide settings for fast CPU work, applied by the command line and the selection worker; how a signal
stops a command (`interrupt`, `check_interrupt`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging  # noqa: F401  (its fork hooks first: ours must enclose them)
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator() -> bool:
    """Keep freed memory in the heap instead of returning it to the kernel.

    With glibc's defaults every large tensor of a batch is a fresh mmap that the kernel has to zero, and is
    unmapped when freed: the proxy pass of `pipeline select` spent 12 of its 28 s in the kernel doing that
    (8.5 s in all with this setting). Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_. A no-op
    where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to kill this process when its parent dies (Linux prctl PR_SET_PDEATHSIG), so workers of
    a killed command (`kill -9`) never go on writing; exits at once if the parent is already gone. A no-op
    where prctl does not exist."""
    import os
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError, TypeError):
        return False
    if os.getppid() != parent or os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
    return ok


class Interrupted(BaseException):
    """A stop asked for by a signal (SIGINT, SIGTERM): not KeyboardInterrupt, which click swallows into a silent
    exit. Raised by the command line's signal handler, and again by `check_interrupt` where it was lost."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: list[int] = []  # signals received and not yet acted on
_forking = [0]  # inside os.fork's hooks: logging's releases its lock there, and an exception would leave it held


def _before_fork() -> None:
    _forking[0] += 1


def _after_fork_in_parent() -> None:
    _forking[0] -= 1


def _after_fork_in_child() -> None:
    _forking[0] = 0
    _pending.clear()


# registered after logging's own hooks (imported above), so this window spans them: before-hooks run newest first,
# after-hooks oldest first
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def interrupt(signum: int, frame=None) -> None:
    """The signal handler: note the signal, then stop. Inside a fork's hooks it only notes it (raising there left
    logging's lock held and the loader hung); an exception that lands where it is swallowed (a __del__, a
    callback from C) is lost the same way. Either way the signal stays noted, and `check_interrupt` raises it
    at the next step."""
    _pending.append(signum)
    if not _forking[0]:
        raise Interrupted(signum)


def check_interrupt() -> None:
    """Raise the stop a signal asked for, if one came: called at every step of long work (progress advances)."""
    if _pending:
        raise Interrupted(_pending[-1])


def signals_seen() -> list[int]:
    return list(_pending)
