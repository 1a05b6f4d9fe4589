"""One port setting: ``edgerun serve`` takes EDGERUN_PORT/EDGERUN_HOST as its flags' defaults,
records the address it actually bound, and the image's health check follows that address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_fixtures import free_port
from server_process import wait_ready

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def serve(bundle: Path, cache: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgerun.cli", "serve", str(bundle), "--no-bench", "--cache-dir", str(cache), *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def healthcheck(cache: Path, **env: str) -> int:
    """The image's HEALTHCHECK command, with the image's EDGERUN_CACHE_DIR pointing at ``cache``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGERUN_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env={**clean, "EDGERUN_CACHE_DIR": str(cache), **env}
    ).returncode


def recorded(cache: Path) -> dict:
    return json.loads((cache / "run" / "serve.json").read_text())


def wait_for_record(cache: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if (cache / "run" / "serve.json").exists():
            return recorded(cache)
        time.sleep(0.05)
    raise AssertionError(
        f"no address recorded: {proc.stderr.read() if proc.poll() is not None and proc.stderr else ''}"
    )


@pytest.mark.parametrize("given", ["env", "flag", "any-free"])
def test_health_check_follows_the_port_however_it_was_given(bundles, tmp_path, given):
    cache = tmp_path / "cache"
    port = free_port()
    args, env = {
        "env": ([], {"EDGERUN_PORT": str(port)}),
        "flag": (["--port", str(port)], {}),
        "any-free": (["--port", "0"], {}),
    }[given]
    proc = serve(bundles["classifier"], cache, args, {"EDGERUN_HOST": "127.0.0.1", **env})
    try:
        if given == "any-free":  # the record is the only way to learn the port
            port = wait_for_record(cache, proc)["port"]
            assert port != 0
        wait_ready(f"http://127.0.0.1:{port}", proc)
        assert recorded(cache) == {"host": "127.0.0.1", "port": port, "pid": proc.pid}
        # No EDGERUN_PORT in the check's environment (or a wrong one): the record decides.
        assert healthcheck(cache) == 0
        assert healthcheck(cache, EDGERUN_PORT=str(free_port())) == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    assert not (cache / "run" / "serve.json").exists()  # removed on a clean stop
    assert healthcheck(cache, EDGERUN_PORT=str(port)) == 1  # nothing listening any more


def test_health_check_without_a_record_uses_edgerun_port(tmp_path):
    assert healthcheck(tmp_path, EDGERUN_PORT=str(free_port())) == 1
    assert healthcheck(tmp_path, EDGERUN_PORT="not-a-port") == 1  # one exit code, no traceback


def test_edgerun_port_must_be_a_port(bundles, tmp_path):
    proc = serve(bundles["classifier"], tmp_path / "cache", [], {"EDGERUN_PORT": "eighty"})
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "'eighty' is not a valid integer" in stderr, stderr
