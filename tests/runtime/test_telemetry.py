"""No phoning home: ONNX Runtime's telemetry is off in every process the project starts.

onnxruntime 1.29+ writes a device-id file ``$TMPDIR/.ses`` at import and sends DNS queries for
its telemetry collector soon after a session exists, unless ``ORT_DISABLE_TELEMETRY=1`` is in
the environment first. The subprocesses here get an environment *without* the opt-out, so what
is tested is that the ``edgerun``/``edgebuild`` packages set it themselves.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from runtime_fixtures import free_port, infer_json
from server_process import wait_ready

from edgerun._privacy import TELEMETRY_OPT_OUT

TESTS = Path(__file__).resolve().parents[1]


def clean_env(tmpdir: Path) -> dict[str, str]:
    """The test session's environment without the opt-out, with a scratch TMPDIR."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OPT_OUT}
    env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def files_in(directory: Path) -> list[str]:
    """Every file below ``directory`` (hidden ones included). Directories alone are not counted:
    torch.export leaves an empty ``torchinductor_root`` directory in TMPDIR, which holds nothing."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())


def test_importing_either_package_sets_the_opt_out_unless_the_user_did(tmp_path):
    env = clean_env(tmp_path)
    show = "import os, {0}; print(os.environ.get('ORT_DISABLE_TELEMETRY'), os.environ.get('ORT_TELEMETRY_DISABLED'))"
    for package in ("edgerun", "edgebuild"):
        out = subprocess.run([sys.executable, "-c", show.format(package)], env=env, capture_output=True, text=True)
        assert out.stdout.split() == ["1", "1"], out.stderr
    out = subprocess.run(
        [sys.executable, "-c", show.format("edgerun")],
        env={**env, "ORT_DISABLE_TELEMETRY": "0"},
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["0", "1"]  # a value the user chose is kept


def test_library_use_leaves_no_device_id_file(tmp_path):
    """Importing any edgerun module and then onnxruntime writes nothing into TMPDIR."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = "import edgerun.session, onnxruntime; print(onnxruntime.__version__)"
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(scratch), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert files_in(scratch) == []


def serve_command(bundle: Path, port: int, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgerun.cli",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--no-bench",
        "--cache-dir",
        str(cache),
        "--log-level",
        "warning",
    ]


@pytest.mark.slow
def test_serve_and_pack_leave_nothing_in_tmpdir(bundles, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = clean_env(scratch)
    port = free_port()
    # Not server_process.start_server: that merges this process's environment, opt-out included.
    proc = subprocess.Popen(
        [*serve_command(bundles["classifier"], port, tmp_path / "cache")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        x = np.ones((1, 4), dtype=np.float32)
        response = httpx.post(f"{url}/v2/models/clf/infer", json=infer_json(x), timeout=30)
        assert response.status_code == 200, response.text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert files_in(scratch) == [], "edgerun serve left files in TMPDIR (ONNX Runtime's .ses device id?)"

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgebuild.cli",
            "pack",
            "tinymodels:tiny_cnn",
            "--calib-data",
            "random",
            "--quantize",
            "none",
            "--bench-seconds",
            "0.05",
            "-o",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert files_in(scratch) == [], "edgebuild pack left files in TMPDIR (ONNX Runtime's .ses device id?)"


# --- the network: strace sees every connect()/sendto() ------------------------------------------

# strace prints socket addresses as {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.2")}
# and {sa_family=AF_INET6, sin6_port=htons(53), ..., inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), ...}.
_INET = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
_INET6 = re.compile(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"')


def outside_traffic(trace: str) -> list[str]:
    """The connect/sendto lines of an strace log that address anything but the loopback."""
    bad = []
    for line in trace.splitlines():
        if "connect(" not in line and "sendto(" not in line:
            continue
        for match in (*_INET.finditer(line), *_INET6.finditer(line)):
            address = ipaddress.ip_address(match.group(2))
            mapped = getattr(address, "ipv4_mapped", None)
            if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
                bad.append(line.strip())
    return bad


def test_outside_traffic_parser():
    trace = "\n".join(
        [
            '12 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
            '12 connect(6, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
            '12 connect(7, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
            '12 sendto(8, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), '
            'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = 1',
            '12 sendto(9, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), '
            'inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 1',
        ]
    )
    bad = outside_traffic(trace)
    assert len(bad) == 2 and "10.255.255.53" in bad[0] and "2001:db8::1" in bad[1]


# ONNX Runtime's uploader made its first lookups within 90 s of a session existing.
WATCH_S = 95


@pytest.mark.slow
def test_serve_makes_no_connection_off_the_machine(bundles, tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        if os.environ.get("CI"):
            pytest.fail("strace is missing: .ci/run installs it")
        pytest.skip("strace is not installed (CI installs it)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    log = tmp_path / "strace.log"
    port = free_port()
    cmd = [
        strace,
        "-f",
        # Stop the server only at the traced calls (not at every system call): start-up under
        # strace then takes seconds, not a minute.
        "--seccomp-bpf",
        "-qq",
        "-e",
        "trace=connect,sendto,accept,accept4",
        "-o",
        str(log),
        *serve_command(bundles["classifier"], port, tmp_path / "cache"),
    ]
    proc = subprocess.Popen(cmd, env=clean_env(scratch), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout_s=120)
        x = np.ones((1, 4), dtype=np.float32)
        assert httpx.post(f"{url}/v2/models/clf/infer", json=infer_json(x), timeout=30).status_code == 200
        time.sleep(WATCH_S)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        # SIGTERM to the server itself (strace's child): it drains and exits, then strace does.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            os.kill(int(pid), signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    trace = log.read_text()
    assert "accept" in trace  # the trace sees the server: it accepted the health checks' connections
    bad = outside_traffic(trace)
    assert bad == [], f"edgerun serve addressed {len(bad)} non-loopback endpoint(s): {bad[:5]}"


def test_no_pydantic_plugin_is_loaded_unless_the_user_turns_them_on(tmp_path):
    """An installed package that declares a pydantic plugin (an observability exporter would see every
    value validated) is not loaded by edgerun; clearing PYDANTIC_DISABLE_PLUGINS loads it."""
    site = tmp_path / "site"
    dist = site / "spyplugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: spyplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pydantic]\nspy = spyplugin:plugin\n")
    marker = tmp_path / "loaded"
    (site / "spyplugin.py").write_text(f"open({str(marker)!r}, 'w').close()\nplugin = object()\n")
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    code = "import edgerun.server; edgerun.server.create_app(edgerun.server.ModelRepository())"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", code], env={**env, "PYDANTIC_DISABLE_PLUGINS": ""}, capture_output=True)
    assert marker.exists()  # the same package, plugins on: loaded
