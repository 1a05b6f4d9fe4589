"""How many intra-op threads fit this box (CPU affinity and the cgroup CPU quota), numpy's BLAS
threads in the server, and the core the start-up load leaves to the importing thread.

ORT defaults to one thread per *host* core, which in a container limited to 2 CPUs out of
64 means 64 threads fighting for 2 cores. We size from what the process may really use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # where the number came from, reported in metadata and the log
    affinity_cpus: int
    quota_cpus: float | None


def parse_cgroup_v2_cpu_max(text: str) -> float | None:
    """``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``; return CPUs or None."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    # Same numbers as v1 once "max" (unlimited) is ruled out; the period defaults to 100 ms.
    return parse_cgroup_v1_quota(parts[0], parts[1] if len(parts) > 1 else "100000")


def parse_cgroup_v1_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu.cfs_period_us``."""
    try:
        quota = int(quota_text.strip())
        period = int(period_text.strip())
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _own_cgroup_v2_dir(root: Path, proc_cgroup: str) -> Path | None:
    for line in proc_cgroup.splitlines():
        # v2 line: "0::/some/path"
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup (v2 first, then v1), or None when unlimited."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    candidates: list[Path] = []
    own = _own_cgroup_v2_dir(root, proc_cgroup)
    if own is not None:
        # Limits may sit on any ancestor; the tightest one wins.
        path = own
        while True:
            candidates.append(path)
            if path == root or root not in path.parents:
                break
            path = path.parent
    candidates.append(root)
    quotas = []
    for directory in dict.fromkeys(candidates):
        try:
            value = parse_cgroup_v2_cpu_max((directory / "cpu.max").read_text())
        except OSError:
            continue
        if value is not None:
            quotas.append(value)
    if quotas:
        return min(quotas)
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            value = parse_cgroup_v1_quota((v1 / "cpu.cfs_quota_us").read_text(), (v1 / "cpu.cfs_period_us").read_text())
        except OSError:
            continue
        if value is not None:
            return value
    return None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(
    override: int | None = None,
    *,
    root: Path = CGROUP_ROOT,
    proc_cgroup: str | None = None,
    affinity: int | None = None,
) -> ThreadChoice:
    """Intra-op threads: ``override`` if given, else min(affinity, ceil(cgroup quota))."""
    cpus = affinity if affinity is not None else affinity_cpus()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if override is not None:
        if override < 1:
            from edgerun.errors import EdgerunError

            raise EdgerunError(f"--threads must be at least 1, got {override}")
        return ThreadChoice(override, "--threads", cpus, quota)
    if quota is not None and math.ceil(quota) < cpus:
        return ThreadChoice(max(1, math.ceil(quota)), "cgroup cpu quota", cpus, quota)
    return ThreadChoice(max(1, cpus), "cpu affinity", cpus, quota)


# numpy's BLAS (OpenBLAS in the numpy wheels) starts a pool of one thread per core when numpy is
# imported, and its threads spin before they sleep. The server does no linear algebra in numpy (ONNX
# Runtime runs the models, with threads of its own), so the pool only takes cores from ORT, the event
# loop and start-up (measured: importing numpy took 200 ms of CPU and 80 ms wall with the pool, 80 ms
# and 45 ms without it, on 2 cores). The variables are read once, when numpy loads its BLAS.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def single_thread_blas() -> None:
    """Give numpy's BLAS one thread, unless the user set a number; call before numpy is imported."""
    for name in BLAS_THREAD_VARIABLES:
        os.environ.setdefault(name, "1")


# While ``edgerun serve``'s main thread imports the web stack (Python, one core), the loading thread
# creates the session and runs the golden check, and ONNX Runtime's pool has one thread per core: on
# 2 cores that made 3 runnable threads for 2 cores, and the imports, which set the pace to ready, could
# get as little as 2/3 of a core while the golden runs lasted. So the loading thread, and the pool threads it
# creates, keep off one core until those imports are done; then every thread left with that mask gets
# the whole set back (Linux: affinity is per thread and inherited by the threads a thread creates).
# Measured side by side on 2 cores (benchmarks/startup_bench.py, 15-21 rounds): 1.00x -> 0.99x,
# 1.03x -> 0.99x and 1.04x -> 1.00x the plain app's cold start, paired.


def spare_a_core() -> tuple[frozenset[int], frozenset[int]] | None:
    """Keep the calling thread off one of the CPUs it may use; returns (all, the narrowed set) to give
    to ``widen``, or None where there is nothing to spare (one CPU, or no affinity on this platform)."""
    try:
        allowed = frozenset(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None
        narrowed = frozenset(sorted(allowed)[1:])
        os.sched_setaffinity(0, narrowed)
    except (AttributeError, OSError):
        return None
    return allowed, narrowed


def widen(spared: tuple[frozenset[int], frozenset[int]] | None) -> None:
    """Give every thread of this process still on the narrowed set (the loading thread and the pool
    threads it created) all of its CPUs back; a thread that set its own affinity is left as it is."""
    if spared is None:
        return
    allowed, narrowed = spared
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = ["0"]  # the calling thread only
    for task in tasks:
        try:
            if frozenset(os.sched_getaffinity(int(task))) == narrowed:
                os.sched_setaffinity(int(task), allowed)
        except (ValueError, OSError):  # the thread ended meanwhile
            continue
