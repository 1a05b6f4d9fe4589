"""KServe v2 gRPC with ``tritonclient.grpc`` unmodified, against a real ``edgerun serve --grpc-port``."""

from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_fixtures import _save, classifier_reference, free_port, make_manifest
from server_process import start_server, stop_server

from edgebuild.bundle import write_bundle

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "grpc-test-token"


def _two_output_bundle(dest):
    """x float32 [-1,4] -> doubled = 2x (float32), count = row sums cast to int64 [-1]."""
    nodes = [
        helper.make_node("Add", ["x", "x"], ["doubled"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["summed"], keepdims=0),
        helper.make_node("Cast", ["summed"], ["count"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["N"]),
        ],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    manifest = make_manifest(
        "multi",
        inputs=[{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        outputs=[
            {"name": "doubled", "dtype": "float32", "shape": [-1, 4]},
            {"name": "count", "dtype": "int64", "shape": [-1]},
        ],
    )
    return write_bundle(dest, manifest, {"model.onnx": _save(graph)}, force=True)


@pytest.fixture(scope="module")
def servers(bundles, tmp_path_factory):
    """One server with a token (REST and gRPC doors), serving a classifier, an INT64 pair and two outputs."""
    root = tmp_path_factory.mktemp("grpc")
    multi = _two_output_bundle(root / "multi")
    grpc_port = free_port()
    proc, url = start_server(
        [str(bundles["classifier"]), str(bundles["pair"]), str(bundles["image"]), str(multi)]
        + ["--grpc-port", str(grpc_port), "--token", TOKEN],
        root / "cache",
    )
    yield f"127.0.0.1:{grpc_port}", url.removeprefix("http://")
    stop_server(proc)


def auth() -> dict[str, str]:
    """Fresh headers per call: tritonclient.http adds its own entries to the dict it is given."""
    return {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def grpc(servers):
    client = grpcclient.InferenceServerClient(url=servers[0])
    yield client
    client.close()


def _grpc_input(name, array, datatype):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_without_token_and_metadata_with_it(grpc):
    assert grpc.is_server_live() and grpc.is_server_ready()  # health needs no token, as over REST
    assert grpc.is_model_ready("clf", headers=auth())
    meta = grpc.get_server_metadata(headers=auth(), as_json=True)
    assert meta["name"] == "edgerun" and "binary_tensor_data" in meta["extensions"]
    model = grpc.get_model_metadata("clf", headers=auth(), as_json=True)
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]


def test_token_is_required_beyond_health(grpc):
    with pytest.raises(InferenceServerException) as refused:
        grpc.get_model_metadata("clf")
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException):
        grpc.get_model_metadata("clf", headers={"authorization": "Bearer wrong"})


def test_infer_fp32_equals_rest_bit_for_bit(servers, grpc):
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    result = grpc.infer("clf", [_grpc_input("x", x, "FP32")], request_id="req-7", headers=auth())
    assert result.get_response().id == "req-7"
    probs = result.as_numpy("probs")
    np.testing.assert_allclose(probs, classifier_reference(x), rtol=1e-5)
    rest = httpclient.InferenceServerClient(url=servers[1])
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    over_rest = rest.infer("clf", [tensor], headers=auth()).as_numpy("probs")
    assert over_rest.tobytes() == probs.tobytes()


def test_infer_int64_inputs(grpc):
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    inputs = [_grpc_input("input_ids", ids, "INT64"), _grpc_input("attention_mask", mask, "INT64")]
    result = grpc.infer("pair", inputs, headers=auth())
    assert result.as_numpy("score").tolist() == [3.0, 4.0]


def test_several_outputs_in_order_and_output_selection(grpc):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    both = grpc.infer("multi", [_grpc_input("x", x, "FP32")], headers=auth())
    assert [o.name for o in both.get_response().outputs] == ["doubled", "count"]
    np.testing.assert_array_equal(both.as_numpy("doubled"), 2 * x)
    assert both.as_numpy("count").dtype == np.int64 and both.as_numpy("count").tolist() == [6, 22]
    only = grpc.infer(
        "multi", [_grpc_input("x", x, "FP32")], outputs=[grpcclient.InferRequestedOutput("count")], headers=auth()
    )
    assert [o.name for o in only.get_response().outputs] == ["count"]
    assert only.as_numpy("doubled") is None


def test_model_config_in_tritons_shape(grpc):
    config = grpc.get_model_config("img", headers=auth(), as_json=True)["config"]
    assert config["name"] == "img" and config["platform"] == "onnxruntime_onnx"
    assert config["input"][0]["data_type"] == "TYPE_FP32" and config["input"][0]["dims"] == ["-1", "1", "4", "4"]
    metadata = ast.literal_eval(config["parameters"]["metadata"]["string_value"])
    assert metadata["names"] == {0: "top", 1: "bottom", 2: "dark"} and metadata["imgsz"] == [4, 4]


@pytest.mark.parametrize(
    ("model", "array", "datatype", "status", "message"),
    [
        ("nope", np.zeros((1, 4), np.float32), "FP32", "StatusCode.NOT_FOUND", "nope"),
        ("clf", np.zeros((1, 5), np.float32), "FP32", "StatusCode.INVALID_ARGUMENT", "expects shape"),
        ("clf", np.zeros((1, 4), np.float64), "FP64", "StatusCode.INVALID_ARGUMENT", "expects datatype FP32"),
    ],
)
def test_errors_have_the_protocols_status(grpc, model, array, datatype, status, message):
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer(model, [_grpc_input("x", array, datatype)], headers=auth())
    assert refused.value.status() == status
    assert message in refused.value.message()


def test_a_frame_over_grpcs_default_4_mib_passes(grpc):
    """1x3x640x640 FP32 is 4.9 MB: over grpc's default receive limit, under --max-body-mb."""
    frame = np.zeros((1, 3, 640, 640), np.float32)
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer("clf", [_grpc_input("x", frame, "FP32")], headers=auth())
    # Received and decoded (not RESOURCE_EXHAUSTED at the transport): refused for its shape.
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_grpc_is_off_unless_asked(bundles):
    """Without --grpc-port no gRPC server starts and grpc is not even imported (nothing to pay at start-up)."""
    code = (
        "import sys; from fastapi.testclient import TestClient; from edgerun.reload import ModelRepository; "
        "from edgerun.loader import LoadOptions; from edgerun.server import ServerConfig, create_app; "
        f"repo = ModelRepository(LoadOptions(bench=False, threads=1)); repo.load({str(bundles['classifier'])!r}); "
        "client = TestClient(create_app(repo, ServerConfig())); client.__enter__(); "
        "assert client.get('/v2/health/ready').status_code == 200; client.__exit__(None, None, None); "
        "print(sorted(m for m in ('grpc', 'edgerun.grpc_server') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_model_control_follows_the_rest_rules(bundles, tmp_path):
    import shutil

    watch = tmp_path / "watch"
    watch.mkdir()
    shutil.copytree(bundles["classifier"], watch / "clf")
    grpc_port = free_port()
    admin = "admin-secret"
    proc, _ = start_server(
        ["--watch", str(watch), "--model-control", "--admin-token", admin, "--grpc-port", str(grpc_port)],
        tmp_path / "cache",
    )
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    try:
        assert [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]] == ["clf"]
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("clf")  # no admin token
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        client.unload_model("clf", headers={"authorization": f"Bearer {admin}"})
        assert not client.get_model_repository_index(as_json=True).get("models")
        client.load_model("clf", headers={"authorization": f"Bearer {admin}"})
        assert client.is_model_ready("clf")
        with pytest.raises(InferenceServerException) as missing:
            client.load_model("nope", headers={"authorization": f"Bearer {admin}"})
        assert (
            missing.value.status() == "StatusCode.NOT_FOUND" and "has no bundle named 'nope'" in missing.value.message()
        )
    finally:
        client.close()
        stop_server(proc)


def test_model_control_is_off_unless_asked(servers, grpc):
    with pytest.raises(InferenceServerException) as refused:
        grpc.unload_model("clf", headers=auth())
    assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "model control is off" in refused.value.message()
    assert grpc.is_model_ready("clf", headers=auth())


def test_stream_infer_answers_in_order_and_reports_refusals_on_the_stream(servers):
    import queue

    client = grpcclient.InferenceServerClient(url=servers[0])
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=auth())
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        client.async_stream_infer("multi", [_grpc_input("x", x, "FP32")], request_id="a")
        client.async_stream_infer("multi", [_grpc_input("x", np.zeros((1, 5), np.float32), "FP32")], request_id="b")
        client.async_stream_infer("multi", [_grpc_input("x", x + 1, "FP32")], request_id="c")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
        client.close()
    (first, no_error), (_, refused), (third, _) = got
    assert no_error is None and first.get_response().id == "a"
    np.testing.assert_array_equal(first.as_numpy("doubled"), 2 * x)
    assert refused is not None and "expects shape" in refused.message()
    np.testing.assert_array_equal(third.as_numpy("doubled"), 2 * (x + 1))


def test_a_taken_grpc_port_is_one_line_before_any_load(bundles, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "edgerun.cli", "serve", str(bundles["classifier"]), "--no-bench"]
            + ["--grpc-port", str(port), "--cache-dir", str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2, out.stderr
    assert f"--grpc-port {port} on 127.0.0.1 cannot be bound" in out.stderr and "Traceback" not in out.stderr
