"""/v1/predict: a real PNG through the manifest's preprocessing and classification post-processing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from edgerun.preprocess import preprocess_image
from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app
from edgerun.tasks.classification import classify


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode).save(buffer, format="PNG")
    return buffer.getvalue()


def half_bright(top: bool, size: int = 8) -> np.ndarray:
    image = np.zeros((size, size), dtype=np.uint8)
    image[: size // 2 if top else size, :] = 255
    if not top:
        image[: size // 2] = 0
    return image


@pytest.fixture()
def client(bundles, load_options):
    repo = ModelRepository(load_options)
    repo.load(bundles["image"])
    repo.load(bundles["classifier"])
    with TestClient(create_app(repo, ServerConfig())) as c:
        yield c


def test_preprocess_resizes_scales_and_lays_out():
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    x = preprocess_image(
        png(rgb, "RGB"),
        {
            "layout": "NCHW",
            "color": "RGB",
            "size": [4, 5],
            "scale": 1 / 255,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    )
    assert x.shape == (1, 3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[0, 1], -1.0, atol=1e-6)
    nhwc = preprocess_image(png(rgb, "RGB"), {"layout": "NHWC", "color": "L"})
    assert nhwc.shape == (1, 6, 10, 1)


def test_classify_top_k_with_labels():
    top = classify(np.array([[0.0, 3.0, 1.0]]), {"softmax": True, "top_k": 2}, ["a", "b", "c"])
    assert [p["label"] for p in top] == ["b", "c"]
    assert top[0]["score"] == pytest.approx(np.exp(3) / (1 + np.exp(3) + np.exp(1)))


def test_predict_raw_png_and_multipart(client):
    response = client.post(
        "/v1/predict?model=img", content=png(half_bright(top=True)), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and predictions[0]["label"] == "top"
    response = client.post("/v1/predict?model=img", files={"file": ("x.png", png(half_bright(top=False)), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "bottom"
    dark = client.post("/v1/predict?model=img", content=png(np.zeros((4, 4))))
    assert dark.json()["predictions"][0]["label"] == "dark"


def test_predict_errors(client):
    assert client.post("/v1/predict?model=img", content=b"not an image").status_code == 400
    assert client.post("/v1/predict?model=img", content=b"").status_code == 400
    no_pre = client.post("/v1/predict?model=clf", content=png(half_bright(True)))
    assert no_pre.status_code == 400 and "no 'preprocess'" in no_pre.json()["error"]
    assert client.post("/v1/predict?model=zzz", content=png(half_bright(True))).status_code == 404
    form = client.post("/v1/predict?model=img", data={"field": "value"})  # a form, not an image
    assert form.status_code == 415 and "not accepted" in form.json()["error"]
    no_file = client.post("/v1/predict?model=img", files={"field": (None, "value")})
    assert no_file.status_code == 400 and "no file part" in no_file.json()["error"]


def test_predict_refuses_extreme_aspect_ratios_and_names_problems_plainly(client):
    tall = client.post("/v1/predict?model=img", content=png(np.zeros((5000, 37))))
    assert tall.status_code == 400
    assert "37x5000" in tall.json()["error"] and "preprocess.resize" in tall.json()["error"]
    not_image = client.post("/v1/predict?model=img", content=b"not an image")
    assert "not a readable image" in not_image.json()["error"]
    assert "object at 0x" not in not_image.json()["error"] and "BytesIO" not in not_image.json()["error"]
    several = client.post("/v1/predict", content=png(half_bright(True)))
    assert several.status_code == 400 and "img" in several.json()["error"] and "clf" in several.json()["error"]
