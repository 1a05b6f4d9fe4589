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


def test_a_stop_whose_exception_was_lost_still_publishes_no_bundle(tmp_path, monkeypatch):
    """The handler's exception raised inside a weakref callback (garbage collection can run one at any
    point) is printed as "Exception ignored" and lost; the bundle is still not moved into place."""
    import weakref

    import click

    from edgebuild.bundle import write_bundle
    from edgebuild.signals import stop_cleanly
    from edgerun.manifest import FORMAT_VERSION, Manifest, ModelFile, TensorSpec

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name="m",
        created="2026-01-01T00:00:00+00:00",
        model=ModelFile(path="model.onnx", sha256="", size_bytes=0, precision="fp32", opset=18),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 2])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 2])],
    )

    class Collected:
        pass

    def signalled_while_collected(ref) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs here, and its exception cannot leave the callback
            pass

    lost: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: lost.append(unraisable.exc_value))
    with pytest.raises(click.exceptions.Exit) as stopped, stop_cleanly("edgebuild", "no bundle written"):
        thing = Collected()
        ref = weakref.ref(thing, signalled_while_collected)
        del thing
        assert ref() is None
        write_bundle(tmp_path / "b", manifest, {"model.onnx": b"abc"})
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert [type(e).__name__ for e in lost] == ["Stopped"]  # the handler's exception was indeed lost
    assert entries(tmp_path) == []  # no bundle, no staging directory
