"""The data plane on its own: health, metadata, configuration and inference, without HTTP."""

from __future__ import annotations

import ast
import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient
from runtime_fixtures import classifier_reference

from edgerun.batching import Batcher
from edgerun.config import ServerConfig
from edgerun.dataplane import DataPlane
from edgerun.errors import ModelNotFoundError, OverloadedError, RequestError
from edgerun.reload import ModelRepository
from edgerun.server import create_app


@pytest.fixture()
def repo(bundles, load_options):
    repo = ModelRepository(load_options)
    for name in ("classifier", "pair", "image"):
        repo.load(bundles[name])
    yield repo
    repo.close()


def _infer(plane: DataPlane, *args, **kwargs):
    async def run():
        batcher = Batcher(max_batch=1, max_delay_ms=0.0, max_queue=4, timeout_s=30.0)
        batcher.start()
        plane.batcher = batcher
        try:
            return await plane.infer(*args, **kwargs)
        finally:
            plane.batcher = None
            await batcher.close(5.0)

    return asyncio.run(run())


def test_health_and_metadata_without_a_server(repo):
    plane = DataPlane(repo, ServerConfig())
    assert plane.live() and plane.ready()
    assert not DataPlane(ModelRepository(repo.options), ServerConfig()).ready()
    assert plane.model_ready("clf")
    meta = plane.model_metadata("clf")
    assert meta.platform == "onnxruntime_onnx" and meta.inputs[0].datatype == "FP32"
    assert "binary_tensor_data" in plane.server_metadata().extensions
    with pytest.raises(ModelNotFoundError, match="nope"):
        plane.model_metadata("nope")
    with pytest.raises(ModelNotFoundError, match="version 'v0' is not served"):
        plane.model_ready("clf", "v0")


def test_infer_on_decoded_tensors(repo):
    plane = DataPlane(repo, ServerConfig())
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    served, outputs = _infer(plane, "clf", {"x": x})
    assert served.name == "clf" and list(outputs) == ["probs"]
    np.testing.assert_allclose(outputs["probs"], classifier_reference(x), rtol=1e-5)


def test_infer_int64_inputs_and_output_selection(repo):
    plane = DataPlane(repo, ServerConfig())
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    mask = np.array([[1, 1, 0]], dtype=np.int64)
    _, outputs = _infer(plane, "pair", {"input_ids": ids, "attention_mask": mask}, outputs=["score"])
    assert outputs["score"].tolist() == [3.0]


@pytest.mark.parametrize(
    ("feeds", "outputs", "message"),
    [
        ({"x": np.zeros((1, 4), np.float64)}, None, "expects datatype FP32"),
        ({"x": np.zeros((1, 5), np.float32)}, None, r"expects shape \[-1, 4\]"),
        ({"x": np.zeros((1, 4), np.float32), "y": np.zeros(1)}, None, "unknown input 'y'"),
        ({}, None, r"missing inputs \['x'\]"),
        ({"x": np.full((1, 4), np.nan, np.float32)}, None, "NaN or Inf"),
        ({"x": np.zeros((1, 4), np.float32)}, ["logits"], "unknown output 'logits'"),
        ({"x": np.zeros((1, 4), np.float32)}, ["probs", "probs"], "requested twice"),
    ],
)
def test_infer_refuses_what_the_rest_decoder_refuses(repo, feeds, outputs, message):
    with pytest.raises(RequestError, match=message):
        _infer(DataPlane(repo, ServerConfig()), "clf", feeds, outputs=outputs)


def test_infer_before_the_batcher_starts_is_503(repo):
    plane = DataPlane(repo, ServerConfig())
    with pytest.raises(OverloadedError, match="starting"):
        asyncio.run(plane.infer("clf", {"x": np.zeros((1, 4), np.float32)}))


def test_model_config_in_tritons_shape(repo):
    plane = DataPlane(repo, ServerConfig())
    config = plane.model_config("clf")
    assert config["name"] == "clf" and config["platform"] == "onnxruntime_onnx"
    # No batch limit in the manifest: full shapes with -1, as Triton's max_batch_size 0 means.
    assert config["max_batch_size"] == 0
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
    assert config["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [-1, 3]}]
    clf_metadata = ast.literal_eval(config["parameters"]["metadata"]["string_value"])
    assert clf_metadata == {"names": dict(enumerate(repo.get("clf").labels))}  # no task, no image size
    pair = plane.model_config("pair")
    assert [t["data_type"] for t in pair["input"]] == ["TYPE_INT64", "TYPE_INT64"]
    assert "parameters" not in pair  # nothing beyond the tensors to say
    image = plane.model_config("img")
    metadata = ast.literal_eval(image["parameters"]["metadata"]["string_value"])
    assert metadata["names"] == {0: "top", 1: "bottom", 2: "dark"}
    assert metadata["imgsz"] == [4, 4]
    assert metadata["task"] == "classify"


def test_config_route_is_the_data_planes(repo):
    with TestClient(create_app(repo, ServerConfig())) as client:
        response = client.get("/v2/models/img/config")
        assert response.status_code == 200
        assert response.json() == DataPlane(repo, ServerConfig()).model_config("img")
        assert client.get(f"/v2/models/img/versions/{repo.get('img').version}/config").status_code == 200
        missing = client.get("/v2/models/nope/config")
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
