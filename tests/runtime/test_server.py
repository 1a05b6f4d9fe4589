"""KServe v2 REST surface over real ORT sessions, through FastAPI's TestClient."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from runtime_fixtures import build_classifier_bundle, classifier_reference, infer_json

from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app


def make_client(locations, load_options, **config) -> TestClient:
    repo = ModelRepository(load_options)
    for location in locations:
        repo.load(location)
    return TestClient(create_app(repo, ServerConfig(**config)))


@pytest.fixture()
def client(bundles, load_options):
    with make_client([bundles["classifier"], bundles["pair"]], load_options) as c:
        yield c


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "edgerun" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_reports_inputs_providers_threads(client):
    meta = client.get("/v2/models/clf").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]
    assert meta["parameters"]["threads"] == 1
    assert meta["parameters"]["golden"]["passed"] is True
    assert client.get("/v2/models/clf/ready").json()["ready"] is True


def test_infer_json_flat_and_nested(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    flat = client.post("/v2/models/clf/infer", json=infer_json(x, id="r1"))
    assert flat.status_code == 200, flat.text
    body = flat.json()
    assert body["id"] == "r1" and body["model_name"] == "clf"
    (out,) = body["outputs"]
    assert out["name"] == "probs" and out["shape"] == [2, 3] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), classifier_reference(x), rtol=1e-5)
    nested = client.post(
        "/v2/models/clf/infer",
        json={"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}]},
    )
    assert nested.json()["outputs"][0]["data"] == out["data"]


def test_infer_two_int64_inputs(client):
    ids = [[1, 2, 3], [4, 5, 6]]
    mask = [[1, 1, 0], [1, 0, 1]]
    response = client.post(
        "/v2/models/pair/infer",
        json={
            "inputs": [
                {"name": "input_ids", "shape": [2, 3], "datatype": "INT64", "data": ids},
                {"name": "attention_mask", "shape": [2, 3], "datatype": "INT64", "data": mask},
            ]
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [3.0, 10.0]


def binary_request(x: np.ndarray, *, size: int | None = None, outputs=None) -> tuple[bytes, dict]:
    header = {
        "inputs": [
            {
                "name": "x",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes if size is None else size},
            }
        ]
    }
    if outputs is None:
        header["parameters"] = {"binary_data_output": True}
    else:
        header["outputs"] = outputs
    head = orjson.dumps(header)
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def test_infer_binary_without_content_type(client):
    x = np.ones((3, 4), dtype=np.float32)
    body, headers = binary_request(x)
    response = client.post("/v2/models/clf/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    size = int(response.headers["Inference-Header-Content-Length"])
    meta = orjson.loads(response.content[:size])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4
    probs = np.frombuffer(response.content[size:], dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(probs, classifier_reference(x), rtol=1e-5)


def test_binary_output_only_where_requested(client):
    x = np.ones((1, 4), dtype=np.float32)
    body, headers = binary_request(x, outputs=[{"name": "probs", "parameters": {"binary_data": False}}])
    response = client.post("/v2/models/clf/infer", content=body, headers=headers)
    assert "Inference-Header-Content-Length" not in response.headers
    assert len(response.json()["outputs"][0]["data"]) == 3


@pytest.mark.parametrize("size, header_delta", [(15, 0), (17, 0), (16, 5), (16, -100)])
def test_lying_binary_sizes_are_400(client, size, header_delta):
    x = np.ones((1, 4), dtype=np.float32)
    body, headers = binary_request(x, size=size)
    headers["Inference-Header-Content-Length"] = str(int(headers["Inference-Header-Content-Length"]) + header_delta)
    response = client.post("/v2/models/clf/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "unknown input 'y'"),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]},
            "expects datatype FP32",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]},
            "expects shape [-1, 4]",
        ),
        ({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "expects shape"),
        ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "needs 8"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]}, "strings"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], [3]]}]}, "ragged"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, "neither 'data'"),
        ({"inputs": []}, "missing inputs ['x']"),
        ({"nothing": 1}, "inputs"),
        ([1, 2], "JSON object"),
        (
            {
                "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                "outputs": [{"name": "nope"}],
            },
            "unknown output 'nope'",
        ),
    ],
)
def test_bad_requests_are_400_with_a_message(client, payload, needle):
    response = client.post("/v2/models/clf/infer", content=orjson.dumps(payload))
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_int_range_and_float_for_int_are_400(client):
    bad = {
        "inputs": [
            {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1.5]},
            {"name": "attention_mask", "shape": [1, 1], "datatype": "INT64", "data": [1]},
        ]
    }
    assert client.post("/v2/models/pair/infer", json=bad).status_code == 400
    bad["inputs"][0]["data"] = [2**70]
    assert client.post("/v2/models/pair/infer", json=bad).status_code == 400


def test_malformed_and_empty_bodies_are_400(client):
    assert client.post("/v2/models/clf/infer", content=b"{not json").status_code == 400
    response = client.post("/v2/models/clf/infer", content=b"")
    assert response.status_code == 400 and "empty" in response.json()["error"]


def test_nan_in_binary_float_input_is_400(client):
    x = np.array([[1, np.nan, 0, 0]], dtype=np.float32)
    body, headers = binary_request(x)
    response = client.post("/v2/models/clf/infer", content=body, headers=headers)
    assert response.status_code == 400 and "NaN" in response.json()["error"]


def test_unknown_model_and_version_are_404(client):
    assert client.post("/v2/models/nope/infer", json=infer_json(np.ones((1, 4), np.float32))).status_code == 404
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/clf/versions/0/ready").status_code == 404


def test_metrics_count_requests_errors_and_provider(client):
    client.post("/v2/models/clf/infer", json=infer_json(np.ones((2, 4), np.float32)))
    client.post("/v2/models/clf/infer", content=b"")
    text = client.get("/metrics").text
    assert 'edgerun_requests_total{code="200",endpoint="infer",model="clf"} 1.0' in text
    assert 'edgerun_errors_total{code="400",endpoint="infer",model="clf"} 1.0' in text
    assert "edgerun_request_latency_seconds_bucket" in text
    assert "edgerun_batch_size_sum 2.0" in text
    assert "edgerun_queue_depth" in text
    assert 'providers="CPUExecutionProvider"' in text


def test_openapi_describes_infer_request_and_response(client):
    schema = client.get("/openapi.json").json()
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferRequest")
    assert "InferRequest" in schema["components"]["schemas"]
    assert "RequestInput" in schema["components"]["schemas"]
    assert "InferResponse" in schema["components"]["schemas"]


def test_gzip_body_is_accepted(client):
    import gzip

    body = gzip.compress(orjson.dumps(infer_json(np.ones((1, 4), np.float32))))
    response = client.post("/v2/models/clf/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    for broken in (body[:-9], body + b"trailing"):  # cut short; bytes after the stream
        response = client.post("/v2/models/clf/infer", content=broken, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 400 and "complete gzip stream" in response.json()["error"]


def test_a_model_with_a_scalar_input_is_served(tmp_path, load_options):
    from runtime_fixtures import build_scaled_bundle

    with make_client([build_scaled_bundle(tmp_path / "scaled")], load_options) as client:
        body = {
            "inputs": [
                {"name": "scale", "shape": [], "datatype": "FP32", "data": [3.0]},
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 8},
            ]
        }
        response = client.post("/v2/models/scaled/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [3.0] * 8


def test_model_status_is_typed_and_becomes_json_only_at_the_edges(client):
    from edgerun.golden import GoldenResult
    from edgerun.status import ModelStatus

    status = client.app.state.repo.get("clf").status
    assert isinstance(status, ModelStatus) and isinstance(status.golden, GoldenResult)
    assert status.providers == ["CPUExecutionProvider"] and status.threads == 1 and status.tensorrt is None
    parameters = client.get("/v2/models/clf").json()["parameters"]
    assert parameters == {**status.to_json(), "task": "tensor", "max_batch": 1, "max_delay_ms": 2.0}
    assert f'variant="{status.variant}"' in client.get("/metrics").text


def test_metrics_remember_what_happened_before_prometheus_was_imported(tmp_path, load_options):
    import prometheus_client

    from edgerun.metrics import Metrics

    assert Metrics.content_type == prometheus_client.CONTENT_TYPE_LATEST
    metrics = Metrics()
    repo = ModelRepository(load_options)
    served = repo.load(build_classifier_bundle(tmp_path / "m"))
    metrics.describe_model(served.name, served.version, served.status)  # before the registry exists
    metrics.track_queue(lambda: 3)
    assert metrics._live is None
    text = metrics.render().decode()
    assert f'edgerun_model_info{{layout="{served.status.layout.layout.label}"' in text
    assert f'version="{served.version}"' in text
    assert "edgerun_queue_depth 3.0" in text


def test_building_the_app_does_not_import_prometheus_client(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edgerun.reload import ModelRepository\n"
        "from edgerun.server import ServerConfig, create_app\n"
        "create_app(ModelRepository(), ServerConfig())\n"
        "assert 'prometheus_client' not in sys.modules, 'imported at start-up'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
