"""A pack stopped by SIGTERM or SIGHUP cleans up as Ctrl-C does: nothing left in TMPDIR, no
bundle (not even a half-written one), exit code 128 + the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def entries(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def wait_for_candidates(tmpdir: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until the pack's own temporary directory holds a file (the exported model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pack ended before it could be stopped: {proc.communicate()[1][-2000:]}")
        if any(p.is_file() for d in tmpdir.glob("edgebuild-*") for p in d.rglob("*")):
            return
        time.sleep(0.02)
    raise AssertionError("pack never wrote into its temporary directory")


@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGTERM,
        # The same path; each case packs for ~20 s on 2 busy cores, so these two run with the slow tests.
        pytest.param(signal.SIGHUP, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    ],
    ids=lambda s: s.name,
)
def test_stopped_pack_leaves_nothing_behind(tmp_path, signum):
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgebuild.cli",
            "pack",
            "tinymodels:tiny_cnn",
            "--calib-data",
            "tinymodels:tiny_images",
            "--val-data",
            "tinymodels:tiny_images",
            "--max-accuracy-drop",
            "0.1",
            "-o",
            str(out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_candidates(scratch, proc)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by {signum.name}" in stderr
    assert stdout == ""  # no bundle path printed
    # torch.export leaves an empty torchinductor_root directory behind; the pack's own are gone.
    assert [e for e in entries(scratch) if e != "torchinductor_root"] == []
    assert not out.exists() or entries(out) == []
