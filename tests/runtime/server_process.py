"""A real ``edgerun serve`` process for black-box tests: started on a free loopback port, waited
for (bounded), stopped with SIGTERM (which must drain and exit 0)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from runtime_fixtures import free_port


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def start_server(
    args: list[str],
    cache_dir: Path,
    env: dict[str, str] | None = None,
    *,
    wait: bool = True,
    log_level: str = "warning",
) -> tuple[subprocess.Popen, str]:
    """``edgerun serve ARGS`` without self-benchmark; returns the process and its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgerun.cli",
            "serve",
            *args,
            "--port",
            str(port),
            "--no-bench",
            "--cache-dir",
            str(cache_dir),
            "--log-level",
            log_level,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    if wait:
        try:
            wait_ready(url, proc)
        except BaseException:
            proc.kill()
            raise
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # SIGTERM drains and exits cleanly
