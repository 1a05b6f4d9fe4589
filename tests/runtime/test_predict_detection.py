"""/v1/predict on detection bundles: boxes in the image's own pixels for each resize policy, request
overrides bounded, an empty list when nothing is found; tensor bundles point at the v2 route."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from runtime_fixtures import build_detector_bundle, make_manifest

from edgebuild.bundle import write_bundle
from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app


def png(width: int, height: int, value: int = 255) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value,) * 3).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory, bundles):
    from edgerun.loader import LoadOptions

    root = tmp_path_factory.mktemp("det")
    repo = ModelRepository(LoadOptions(cache_dir=root / "cache", bench=False, threads=1))
    repo.load(build_detector_bundle(root / "stretch", name="stretch"))
    repo.load(build_detector_bundle(root / "centre", name="centre", resize="letterbox"))
    repo.load(build_detector_bundle(root / "corner", name="corner", resize="letterbox", pad="bottom-right", fill=0))
    repo.load(bundles["image"])
    tensor = make_manifest(
        "tensor",
        inputs=[{"name": "image", "dtype": "float32", "shape": [-1, 1, 4, 4]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, 3]}],
        preprocess={"color": "L", "size": [4, 4], "scale": 1 / 255},
        task="tensor",
    )
    from runtime_fixtures import image_onnx

    repo.load(write_bundle(root / "tensor", tensor, {"model.onnx": image_onnx()}, force=True))
    with TestClient(create_app(repo, ServerConfig())) as c:
        yield c


def predict(client, model: str, image: bytes, **params):
    return client.post("/v1/predict", params={"model": model, **params}, content=image)


def boxes_of(response) -> list[tuple[str, list[float]]]:
    assert response.status_code == 200, response.text
    return [(d["label"], d["box"]) for d in response.json()["detections"]]


def test_stretch_maps_boxes_by_each_axis(client):
    # 128x96 into 64x64: x2 horizontally, x1.5 vertically. Anchor 0 (24,16)-(40,32) in the input;
    # anchor 1 overlaps it and is suppressed; anchor 2 (6,46)-(14,54) is class 1 at half the score.
    response = predict(client, "stretch", png(128, 96))
    body = response.json()
    assert body["model"] == "stretch" and body["image_size"] == [128, 96]
    assert [d["score"] for d in body["detections"]] == pytest.approx([1.0, 0.5])
    assert [d["class_id"] for d in body["detections"]] == [0, 1]
    labels, boxes = zip(*boxes_of(response), strict=True)
    assert labels == ("circle", "square")
    np.testing.assert_allclose(boxes, [[48, 24, 80, 48], [12, 69, 28, 81]], atol=1e-3)


def test_centre_letterbox_removes_the_padding_and_clips(client):
    # 128x64 into 64x64: scale 0.5, image in rows 16..48; padding 114 lowers the mean to (255+114)/2/255
    response = predict(client, "centre", png(128, 64))
    scores = [d["score"] for d in response.json()["detections"]]
    assert scores == pytest.approx([(255 + 114) / 2 / 255, (255 + 114) / 4 / 255], abs=1e-5)
    # anchor 2 (6,46)-(14,54) reaches into the bottom padding: clipped at the image's bottom edge
    np.testing.assert_allclose([b for _, b in boxes_of(response)], [[48, 0, 80, 32], [12, 60, 28, 64]], atol=1e-3)


def test_bottom_right_letterbox_keeps_the_top_left_origin(client):
    # image in rows 0..32 of the input, fill 0: mean 0.5; conf 0.3 keeps anchor 0 only
    response = predict(client, "corner", png(128, 64), conf=0.3)
    assert boxes_of(response) == [("circle", pytest.approx([48, 32, 80, 64], abs=1e-3))]
    assert response.json()["detections"][0]["score"] == pytest.approx(0.5)


def test_nothing_detected_is_an_empty_list(client):
    response = predict(client, "stretch", png(64, 64, value=0))
    assert response.status_code == 200 and response.json()["detections"] == []


def test_iou_and_max_det_override_per_request(client):
    assert len(boxes_of(predict(client, "stretch", png(64, 64), iou=0.95))) == 3  # anchors 0/1 overlap 0.88
    assert len(boxes_of(predict(client, "stretch", png(64, 64), max_det=1))) == 1
    assert [b for b, _ in boxes_of(predict(client, "stretch", png(64, 64), conf=0.6))] == ["circle"]
    assert len(boxes_of(predict(client, "stretch", png(64, 64), conf=0.6, iou=0.95))) == 2  # 0 and 1


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"conf": 0}, "conf"),
        ({"conf": 1.5}, "conf"),
        ({"iou": 0}, "iou"),
        ({"max_det": 0}, "max_det"),
        ({"max_det": 1001}, "max_det"),
        ({"conf": "high"}, "conf"),
    ],
)
def test_overrides_out_of_bounds_are_refused_naming_the_parameter(client, params, name):
    response = predict(client, "stretch", png(64, 64), **params)
    assert response.status_code == 400 and f"query.{name}" in response.json()["error"]


def test_detection_overrides_on_a_classifier_are_refused(client):
    response = predict(client, "img", png(4, 4), conf=0.5)
    assert response.status_code == 400
    assert "conf applies only to detection models" in response.json()["error"]
    assert predict(client, "img", png(4, 4)).json()["predictions"][0]["label"] in ("top", "bottom", "dark")


def test_a_tensor_bundle_points_at_the_v2_infer_route(client):
    response = predict(client, "tensor", png(4, 4))
    assert response.status_code == 400
    assert "/v2/models/tensor/infer" in response.json()["error"] and "tensor model" in response.json()["error"]


def test_v2_infer_still_returns_the_raw_head(client):
    x = np.ones((1, 3, 64, 64), np.float32)
    body = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = client.post("/v2/models/stretch/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "output0" and output["shape"] == [1, 6, 3]


def test_openapi_types_both_answers_and_the_bounded_overrides(client):
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/predict"]["post"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    refs = {item["$ref"].rsplit("/", 1)[1] for item in schema["anyOf"]}
    assert refs == {"ClassificationResponse", "DetectionResponse"}
    detection = document["components"]["schemas"]["DetectionResponse"]
    assert set(detection["required"]) == {"model", "image_size", "detections"}
    params = {p["name"]: p["schema"] for p in operation["parameters"]}
    conf = next(s for s in params["conf"]["anyOf"] if s.get("type") == "number")
    assert conf["exclusiveMinimum"] == 0 and conf["maximum"] == 1
    max_det = next(s for s in params["max_det"]["anyOf"] if s.get("type") == "integer")
    assert (max_det["minimum"], max_det["maximum"]) == (1, 1000)


def test_model_metadata_names_the_task(client):
    assert client.get("/v2/models/stretch").json()["parameters"]["task"] == "detection"
    assert client.get("/v2/models/img").json()["parameters"]["task"] == "classification"
