"""Thread count from CPU affinity and cgroup v1/v2 quotas (fake cgroup trees), and numpy's BLAS threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgerun.errors import EdgerunError
from edgerun.threads import (
    BLAS_THREAD_VARIABLES,
    cgroup_cpu_quota,
    choose_threads,
    parse_cgroup_v1_quota,
    parse_cgroup_v2_cpu_max,
    single_thread_blas,
)


@pytest.mark.parametrize(
    "text, cpus",
    [
        ("max 100000\n", None),
        ("150000 100000\n", 1.5),
        ("50000 100000", 0.5),
        ("200000", 2.0),
        ("", None),
        ("garbage 1", None),
        ("-1 100000", None),
    ],
)
def test_parse_cgroup_v2(text, cpus):
    assert parse_cgroup_v2_cpu_max(text) == cpus


def test_parse_cgroup_v1():
    assert parse_cgroup_v1_quota("-1\n", "100000\n") is None
    assert parse_cgroup_v1_quota("300000\n", "100000\n") == 3.0
    assert parse_cgroup_v1_quota("x", "100000") is None


def test_v2_tightest_ancestor_wins(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    own = tmp_path / "system.slice" / "app.service"
    own.mkdir(parents=True)
    (own.parent / "cpu.max").write_text("150000 100000\n")
    (own / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_quota(tmp_path, "0::/system.slice/app.service\n") == 1.5
    choice = choose_threads(root=tmp_path, proc_cgroup="0::/system.slice/app.service\n", affinity=8)
    assert choice.threads == 2 and choice.source == "cgroup cpu quota"


def test_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    choice = choose_threads(root=tmp_path, proc_cgroup="4:cpu,cpuacct:/docker/abc\n", affinity=4)
    assert (choice.threads, choice.quota_cpus) == (1, 1.0)


def test_affinity_when_unlimited_and_override(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert choose_threads(root=tmp_path, proc_cgroup="0::/\n", affinity=3).threads == 3
    assert choose_threads(root=tmp_path, proc_cgroup="0::/\n", affinity=3).source == "cpu affinity"
    assert choose_threads(5, root=tmp_path, proc_cgroup="0::/\n", affinity=3).threads == 5
    with pytest.raises(EdgerunError, match="at least 1"):
        choose_threads(0, root=tmp_path, proc_cgroup="", affinity=3)


def test_numpy_blas_gets_one_thread_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "4")
    single_thread_blas()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "4"  # the user's number is kept
    assert set(BLAS_THREAD_VARIABLES) == {"OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenBLAS starts no pool to leave out")
def test_the_blas_setting_leaves_out_openblas_threads_when_numpy_loads():
    """OpenBLAS reads the variable once, when numpy loads it: set before, no pool thread is started."""
    count = "import os, numpy; print(len(os.listdir('/proc/self/task')))"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}

    def threads(code: str) -> int:
        return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)

    assert threads(f"from edgerun.threads import single_thread_blas; single_thread_blas(); {count}") == 1
    assert threads(count) > 1


needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="per-thread CPU affinity on 2+ CPUs (Linux): with one there is no core to spare",
)


@needs_two_cpus
def test_a_spared_core_is_kept_by_the_thread_and_the_threads_it_starts_until_widened():
    import threading

    from edgerun.threads import spare_a_core, widen

    allowed = frozenset(os.sched_getaffinity(0))
    seen: dict[str, frozenset[int]] = {}
    release, own_mask_set = threading.Event(), threading.Event()

    def child() -> None:
        release.wait(10)
        seen["child after widen"] = frozenset(os.sched_getaffinity(0))

    def pinned_elsewhere() -> None:  # a thread that chose its own CPUs: left alone
        os.sched_setaffinity(0, {min(allowed)})
        own_mask_set.set()
        release.wait(10)
        seen["own"] = frozenset(os.sched_getaffinity(0))

    def loading() -> None:
        spared = spare_a_core()
        assert spared is not None
        seen["loading"] = frozenset(os.sched_getaffinity(0))
        started = threading.Thread(target=child)
        started.start()
        other = threading.Thread(target=pinned_elsewhere)
        other.start()
        own_mask_set.wait(10)
        widen(spared)
        seen["loading after widen"] = frozenset(os.sched_getaffinity(0))
        release.set()
        started.join()
        other.join()

    thread = threading.Thread(target=loading)
    thread.start()
    thread.join()
    assert len(seen["loading"]) == len(allowed) - 1 and seen["loading"] < allowed
    assert seen["loading after widen"] == allowed and seen["child after widen"] == allowed
    assert seen["own"] == {min(allowed)}
    assert frozenset(os.sched_getaffinity(0)) == allowed  # the caller's thread was never narrowed
