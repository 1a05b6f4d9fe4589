"""Bounded resources: image decoding limited by pixels and by concurrency, measured on a real
server process's peak RSS; the pixel budget and aspect-ratio rules of /v1/predict."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from server_process import start_server

from edgerun.errors import PayloadTooLargeError, RequestError
from edgerun.routes.predict import MAX_IMAGE_PIXELS, MIN_IMAGE_PIXELS, check_image, pixel_budget

LIMIT_MIB = 512  # what `edgebuild deploy k8s` sets as the container's memory limit


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=(200, 30, 30) if mode == "RGB" else 200).save(
        buffer, format="PNG", compress_level=1
    )
    return buffer.getvalue()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_concurrent_large_uploads_keep_the_server_under_the_memory_limit(bundles, cache_dir):
    huge = png(6300, 6300)  # ~120 MB once decoded, a small file
    admitted = png(4000, 4000)  # 16 Mpx: inside the budget, really decoded
    proc, url = start_server([str(bundles["image"])], cache_dir)
    try:
        before = peak_rss_mib(proc.pid)

        def upload(data: bytes) -> httpx.Response:
            return httpx.post(f"{url}/v1/predict", content=data, headers={"Content-Type": "image/png"}, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            refused = list(pool.map(upload, [huge] * 4))
            served = list(pool.map(upload, [admitted] * 4))
        peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for response in refused:
        assert response.status_code == 413, response.text
        assert "6300x6300" in response.json()["error"]
    for response in served:
        assert response.status_code == 200, response.text
    print(f"server peak RSS: {before:.0f} MiB at ready, {peak:.0f} MiB after 4+4 concurrent uploads")
    assert peak < LIMIT_MIB


def test_pixel_budget_follows_the_model_input_within_bounds():
    assert pixel_budget({"size": [4, 4]}) == MIN_IMAGE_PIXELS
    assert pixel_budget({}) == MIN_IMAGE_PIXELS
    assert pixel_budget({"size": [1000, 1100]}) == min(MAX_IMAGE_PIXELS, 16 * 1000 * 1100)
    assert pixel_budget({"size": [4000, 4000]}) == MAX_IMAGE_PIXELS


def test_extreme_aspect_ratios_are_refused_unless_the_resize_policy_keeps_the_aspect():
    spec = {"size": [224, 224]}
    with pytest.raises(RequestError, match=r"37x5000 .* 135\.1x off .* preprocess.resize is 'stretch'"):
        check_image(37, 5000, spec, "m")
    check_image(37, 5000, {**spec, "resize": "letterbox"}, "m")
    check_image(37, 5000, {**spec, "resize": "center-crop"}, "m")
    check_image(400, 224, spec, "m")  # 1.8x: resized as the manifest says
    check_image(5000, 37, {"size": [37, 5000]}, "m")  # the model's own shape
    with pytest.raises(PayloadTooLargeError, match="6300x6300"):
        check_image(6300, 6300, spec, "m")


def test_decoding_runs_few_at_a_time(bundles, load_options, monkeypatch):
    import threading

    from fastapi.testclient import TestClient

    import edgerun.routes.predict as predict_module
    from edgerun.reload import ModelRepository
    from edgerun.server import ServerConfig, create_app

    active, most = [0], [0]
    lock = threading.Lock()
    gate = threading.Event()
    real = predict_module.preprocess_image_with_transform

    def slow(data, spec, *, max_pixels):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        gate.wait(0.2)
        try:
            return real(data, spec, max_pixels=max_pixels)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(predict_module, "preprocess_image_with_transform", slow)
    repo = ModelRepository(load_options)
    repo.load(bundles["image"])
    with TestClient(create_app(repo, ServerConfig(image_decodes=2))) as client, ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: client.post("/v1/predict", content=png(8, 8, "L")).status_code, range(6)))
    assert codes == [200] * 6
    assert most[0] == 2


def test_archive_and_gzip_limits_are_documented_in_errors(bundles, load_options):
    import gzip

    from fastapi.testclient import TestClient

    from edgerun.reload import ModelRepository
    from edgerun.server import ServerConfig, create_app

    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    with TestClient(create_app(repo, ServerConfig(max_body_mb=0.01))) as client:
        bomb = gzip.compress(b" " * (1 << 20))  # 1 KB on the wire, 1 MiB inflated
        response = client.post("/v2/models/clf/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 413 and "decompressed body" in response.json()["error"]
