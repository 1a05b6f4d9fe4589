"""End to end: pack the embedded digits example, serve it with edgerun, infer with tritonclient."""

import json
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "edgebuild.cli", "pack", "--target", "x86", "-o", str(out), "--bench-seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    assert path.endswith("digits-x86")
    return path


@pytest.fixture(scope="module")
def server(digits_bundle, tmp_path_factory):
    port = _free_port()
    cache = tmp_path_factory.mktemp("cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgerun.cli", "serve", digits_bundle, "--port", str(port), "--no-bench"]
        + ["--cache-dir", str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if client.is_server_ready():
                break
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("edgerun serve did not become ready in 60 s")
    yield client, proc
    proc.terminate()
    assert proc.wait(timeout=20) == 0


def test_manifest_records_int8_or_faster_choice_within_budget(digits_bundle):
    manifest = json.loads(open(f"{digits_bundle}/manifest.json").read())
    v = manifest["validation"]
    assert v["metric"] == "accuracy" and v["validated"] and v["samples"] == 450
    assert v["drop"] <= 0.01
    int8 = [c for c in manifest["benchmark"]["candidates"] if c["precision"] == "int8"]
    assert int8 and all(abs(c["drop"]) <= 0.01 for c in int8), "INT8 must stay within 1 point of FP32 on digits"


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_predictions_match_recorded_accuracy(server, digits_bundle, binary):
    import tritonclient.http as httpclient

    from edgebuild.examples.digits import validation_data

    client, _ = server
    manifest = json.loads(open(f"{digits_bundle}/manifest.json").read())
    (inp,), (out,) = manifest["inputs"], manifest["outputs"]
    correct = total = 0
    for x, y in validation_data(batch_size=1):
        if total == 120:
            break
        tensor = httpclient.InferInput(inp["name"], list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(
            "digits", [tensor], outputs=[httpclient.InferRequestedOutput(out["name"], binary_data=binary)]
        )
        correct += int(result.as_numpy(out["name"]).argmax(1)[0] == y[0])
        total += 1
    # 120 of the 450 validated samples: allow sampling noise around the recorded accuracy.
    assert correct / total >= manifest["validation"]["packed"] - 0.03


def test_model_metadata_describes_inputs(server):
    client, _ = server
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]


def test_tampered_bundle_is_refused(digits_bundle, tmp_path):
    import shutil

    copy = tmp_path / "digits-x86"
    shutil.copytree(digits_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for args in (
        ["verify", str(copy), *cache],
        ["serve", str(copy), "--no-bench", "--port", str(_free_port()), *cache],
    ):
        proc = subprocess.run([sys.executable, "-m", "edgerun.cli", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "does not match its checksum" in proc.stderr and "Traceback" not in proc.stderr


def test_runtime_import_leaves_torch_and_builder_out():
    code = "import sys, edgerun.server, edgerun.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'edgebuild')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
