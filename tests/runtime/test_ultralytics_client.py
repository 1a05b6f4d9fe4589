"""Ultralytics' Triton client runs an edgerun detection bundle end to end (it reads the model config first)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from runtime_fixtures import DETECTOR_LABELS, build_detector_bundle
from server_process import start_server, stop_server

pytestmark = pytest.mark.slow  # imports torch and Ultralytics (several seconds)


def _png(value: int = 255) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (value,) * 3).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_yolo_on_a_served_detection_bundle(tmp_path, scheme):
    ultralytics = pytest.importorskip("ultralytics")
    import httpx
    from PIL import Image
    from runtime_fixtures import free_port

    bundle = build_detector_bundle(tmp_path / "det", name="det", resize="letterbox")
    grpc_port = free_port()
    proc, url = start_server([str(bundle), "--grpc-port", str(grpc_port)], tmp_path / "cache")
    try:
        address = url if scheme == "http" else f"grpc://127.0.0.1:{grpc_port}"
        model = ultralytics.YOLO(f"{address}/det", task="detect")
        image = Image.open(io.BytesIO(_png()))
        (result,) = model.predict(np.asarray(image)[:, :, ::-1], imgsz=64, conf=0.25, verbose=False)
        assert result.names == dict(enumerate(DETECTOR_LABELS))  # from the config's parameters.metadata
        theirs = sorted(
            (result.names[int(c)], [round(float(v), 1) for v in box])
            for c, box in zip(result.boxes.cls, result.boxes.xyxy)
        )
        answer = httpx.post(f"{url}/v1/predict", content=_png(), headers={"Content-Type": "image/png"}).json()
        ours = sorted((d["label"], [round(float(v), 1) for v in d["box"]]) for d in answer["detections"])
        assert theirs == ours and theirs  # the same boxes as edgerun's own decode and NMS
    finally:
        stop_server(proc)
