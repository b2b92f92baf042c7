"""Process-wide settings for fast CPU work, applied by the command line and the selection worker; how a signal
stops a command (`interrupt`, `check_interrupt`)."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging  # noqa: F401  (its fork hooks first: ours must enclose them)
import multiprocessing.util  # noqa: F401  (its exit hook first: ours must run before it)
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


def become_worker() -> None:
    """Set up a helper process (a loader worker, a prepare worker, a selection round): it dies with its parent,
    and leaves a stop to the command. A terminal's Ctrl-C reaches the whole process group: a worker ignores it,
    and the command ends its workers itself. A SIGTERM to the group (Slurm signals every process of a job step)
    ends a worker quietly, as multiprocessing's own terminate() expects (ignoring it hung the command's exit in
    multiprocessing's join); the command's handler then no longer listens for its workers' ends (`interrupt`).
    Before this, a worker that raised on either signal made the loader report "worker exited unexpectedly",
    with tracebacks under the command's "interrupted" line. And a command stopped while it was taking a batch
    over hangs up on the worker mid-handover: multiprocessing's fd-sharing thread in the worker printed that
    ConnectionResetError through sys.excepthook (seen in the suite). A hang-up from the command is not news."""
    import signal
    import sys

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler, inherited through fork
    default_hook = sys.excepthook

    def quiet_hangups(kind, value, tb) -> None:
        if not isinstance(value, (ConnectionError, EOFError)):
            default_hook(kind, value, tb)

    sys.excepthook = quiet_hangups


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
    _stop_watching_workers()
    if not _forking[0]:
        raise Interrupted(signum)


def _stop_watching_workers() -> None:
    """A stopping command expects its workers to end (a group's SIGTERM ends them with it): torch's loader
    watches for that with a SIGCHLD handler that raises "worker exited unexpectedly" wherever the command is,
    even while it prints its "interrupted" line. Pending signals run after this one, so a handler that does
    nothing, put in here, also takes a SIGCHLD that came with the stop (SIG_DFL would make Python print
    "Signal 17 ignored due to race condition" for it)."""
    import signal

    if callable(signal.getsignal(signal.SIGCHLD)):
        signal.signal(signal.SIGCHLD, _ignore)


def _ignore(signum: int, frame=None) -> None:
    pass


# A command that ends on an error (a sample that does not decode, a bad value) still holds its loader, whose
# workers multiprocessing's exit hook then ends with SIGTERM; torch's SIGCHLD handler would report that end as
# "worker killed by signal: Terminated", with a traceback under the command's one-line error (seen in CI).
# atexit runs its hooks newest first, so this one runs before multiprocessing's.
atexit.register(_stop_watching_workers)


def check_interrupt() -> None:
    """Raise the stop a signal asked for, if one came: called at every step of long work (progress advances)."""
    if _pending:
        raise Interrupted(_pending[-1])


def signals_seen() -> list[int]:
    return list(_pending)


THREADS_VARIABLE = "PIPELINE_THREADS"  # auto (default) | torch (torch's own defaults) | a number of threads


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPUs this process's cgroup may use per second (its CFS quota / period), the tightest along its path;
    None without a quota. cgroup v2 (`cpu.max`: "QUOTA PERIOD" or "max PERIOD") and v1 (`cpu.cfs_quota_us`)."""
    limits = []
    try:
        lines = open(proc_cgroup).read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hier, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.strip("/")
        parts = path.split("/") if path else []
        if hier == "0" and controllers == "":  # v2: the unified tree, the process's folder and every folder above it
            for depth in range(len(parts), -1, -1):
                limits.append(_quota(os.path.join(root, *parts[:depth], "cpu.max"), v2=True))
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own tree
            base = next((os.path.join(root, d) for d in ("cpu,cpuacct", "cpu") if os.path.isdir(os.path.join(root, d))),
                        os.path.join(root, "cpu"))
            for depth in range(len(parts), -1, -1):
                limits.append(_quota(os.path.join(base, *parts[:depth]), v2=False))
    found = [x for x in limits if x]
    return min(found) if found else None


def _quota(path: str, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = open(path).read().split()[:2]
        else:
            quota = open(os.path.join(path, "cpu.cfs_quota_us")).read().strip()
            period = open(os.path.join(path, "cpu.cfs_period_us")).read().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The cores this process may actually run on: its affinity mask (taskset, Slurm's cpuset), capped by its
    cgroup's CPU quota (a container's --cpus); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota + 0.5)))
    return max(1, cpus)


def prepare_threads() -> str:
    """Before torch loads: intra-op threads from the cores this process may use, and OpenMP threads that sleep
    when they have nothing to do instead of spinning.

    Why: OpenMP's threads spin at every barrier waiting for work (GNU libgomp: 300,000 turns by default). Beside
    another torch process on the same cores they spin against each other's working threads, and a trainer fell
    from about 550 to 9 images/s (issue 40; benchmarks/bench_side_by_side.py). A quota'd container (--cpus 2 on
    a 64-core host) gets 64 threads from torch's defaults. Applied only where the user set nothing: OMP_NUM_THREADS
    and OMP_WAIT_POLICY are theirs to set, PIPELINE_THREADS=torch leaves torch's defaults, PIPELINE_THREADS=N
    sets N threads. Returns what it did, in words (`pipeline.THREADS`; every epoch record has its thread count)."""
    import sys

    choice = os.environ.get(THREADS_VARIABLE, "auto").strip().lower() or "auto"
    if choice == "torch":
        return "torch's defaults (PIPELINE_THREADS=torch)"
    if "torch" in sys.modules:  # too late: libgomp read its settings when torch loaded
        return "torch was imported before pipeline: its defaults"
    if choice != "auto" and not (choice.isdigit() and int(choice) > 0):
        return f"PIPELINE_THREADS={choice!r} is not auto, torch or a number of threads: torch's defaults"
    threads = str(usable_cpus()) if choice == "auto" else choice
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return f"{os.environ['OMP_NUM_THREADS']} threads, OpenMP wait policy {os.environ['OMP_WAIT_POLICY']}"
