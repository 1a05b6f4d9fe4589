"""Build and run the runtime image with podman: the container tests and benchmarks/container_bench.py.

Machines without a Docker engine or a registry get podman and a stand-in base image from
``docker/podman-standin.sh``; it prints the flags every podman call here needs (runc as the
runtime, rlimits no higher than the machine's), which ``.ci/run`` exports as PODMAN_RUNTIME and
PODMAN_FLAGS. Without them the same defaults are computed here.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # docker/ is a folder of the repository
BASE_IMAGE = "docker.io/library/python:3.11-slim"
# What Dockerfile.x86 COPYs from the build context.
CONTEXT = ["pyproject.toml", "README.md", "builder", "runtime", "targets", "docker"]
CACHE_DIR = "/var/cache/edgerun"
UID = 10001


def runtime_flags() -> list[str]:
    return shlex.split(os.environ.get("PODMAN_RUNTIME", "--runtime runc"))


def limit_flags() -> list[str]:
    if "PODMAN_FLAGS" in os.environ:
        return shlex.split(os.environ["PODMAN_FLAGS"])
    flags = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft = resource.getrlimit(limit)[0]
        n = 4096 if soft == resource.RLIM_INFINITY else min(soft, 4096)
        flags += ["--ulimit", f"{name}={n}:{n}"]
    return flags


def unavailable() -> str | None:
    """Why the image cannot be built here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (docker/podman-standin.sh installs it)"
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        return f"the base image {BASE_IMAGE} is missing (docker/podman-standin.sh makes a stand-in)"
    return None


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *runtime_flags(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr[-3000:]}")
    return result


def make_context(dest: Path, bundle: Path | None = None) -> Path:
    """A build context holding what Dockerfile.x86 copies (and a bundle under ``bundle/``)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in CONTEXT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy(src, dest / name)
    if bundle is not None:
        shutil.copytree(bundle, dest / "bundle")
    return dest


def build(context: Path, tag: str, *build_args: str, no_cache: bool = False) -> float:
    """Build Dockerfile.x86 from ``context`` as ``tag``; returns the seconds it took."""
    start = time.perf_counter()
    args = [f"--build-arg={a}" for a in build_args] + (["--no-cache"] if no_cache else [])
    # docker format: the OCI format has no HEALTHCHECK and podman would drop it.
    podman(
        "build",
        "--format",
        "docker",
        *limit_flags(),
        "--network",
        "host",
        "-f",
        "Dockerfile.x86",
        "-t",
        tag,
        *args,
        str(context),
    )
    return time.perf_counter() - start


def added_layers(image: str) -> list[tuple[int, str]]:
    """(bytes, instruction) of each non-empty layer ``image`` adds over the base, largest first."""
    base_rows = len(json.loads(podman("history", "--format", "json", BASE_IMAGE).stdout))
    rows = json.loads(podman("history", "--format", "json", image).stdout)
    own = rows[: len(rows) - base_rows]  # newest first; the base's own rows are the oldest
    return sorted(((int(r["size"]), str(r.get("CreatedBy", ""))) for r in own if int(r["size"])), reverse=True)


@dataclass
class Container:
    name: str

    def exec(self, *cmd: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, check=False, timeout=60)

    def running(self) -> bool:
        out = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return out.stdout.strip() == "true"

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return (out.stdout + out.stderr)[-4000:]

    def signal(self, name: str) -> None:
        podman("kill", "--signal", name, self.name)

    def wait(self, timeout: float) -> int:
        return int(podman("wait", self.name, timeout=timeout).stdout.strip().splitlines()[-1])

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def run(image: str, args: list[str], *, env: dict[str, str] | None = None, bundle: Path | None = None) -> Container:
    """Start ``image`` as the deployment docs say: uid 10001, read-only root, tmpfs cache, host network."""
    name = f"edgerun-test-{uuid.uuid4().hex[:10]}"
    flags = [
        "--name",
        name,
        *limit_flags(),
        "--network",
        "host",
        "--user",
        f"{UID}:{UID}",
        "--read-only",
        "--tmpfs",
        f"{CACHE_DIR}:rw,size=64m,U",  # U: owned by the container user
        # The tests run the image's HEALTHCHECK command themselves (podman's timers need systemd).
        "--no-healthcheck",
    ]
    for key, value in (env or {}).items():
        flags += ["-e", f"{key}={value}"]
    if bundle is not None:
        flags += ["-v", f"{bundle}:/bundle:ro"]
    podman("run", "-d", *flags, image, *args)
    return Container(name)


def healthcheck_command(image: str) -> list[str]:
    """The image's HEALTHCHECK as an argv (``CMD`` form)."""
    test = json.loads(podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image).stdout)["Test"]
    assert test[0] == "CMD", test
    return test[1:]


def wait_ready(port: int, alive: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``/v2/health/ready`` on loopback until it answers 200 (True), ``alive()`` turns false or the
    start-up deadline passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)
    return False
