"""GPU paths, simulated on a CPU-only onnxruntime: per-variant provider options, TensorRT engine
cache keys, the background TensorRT build and swap, and out-of-profile requests.

The available-provider list and the session factory are replaced; a "TensorRT" session is a real
CPU session that reports TensorRT, so golden checks and inference still run for real. Waits are
bounded and nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from runtime_fixtures import (
    CLASSIFIER_IO,
    LABELS,
    classifier_golden,
    classifier_onnx,
    classifier_reference,
    make_manifest,
    model_file,
)

import edgerun.loader as loader_module
import edgerun.session as session_module
import edgerun.tensorrt as tensorrt_module
from edgebuild.bundle import write_bundle
from edgerun.batching import Batcher
from edgerun.cli import main
from edgerun.loader import LoadOptions, load_model
from edgerun.manifest import GoldenSpec, ProviderSpec
from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app
from edgerun.tensorrt import TENSORRT, engine_cache_key, relocate_cache_paths

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
WAIT_S = 30  # upper bound only; every wait returns as soon as its condition holds
TRT_OPTIONS = {
    "device_id": 0,
    "trt_fp16_enable": False,
    "trt_int8_enable": False,
    "trt_engine_cache_enable": True,
    "trt_engine_cache_path": "/var/cache/edgerun/tensorrt",
    "trt_timing_cache_enable": True,
    "trt_timing_cache_path": "/var/cache/edgerun/tensorrt",
    "trt_profile_min_shapes": "x:1x4",
    "trt_profile_opt_shapes": "x:1x4",
    "trt_profile_max_shapes": "x:8x4",
}


def gpu_bundle(
    dest: Path,
    *,
    name: str = "clf",
    variants: dict | None = None,
    model_options: dict | None = None,
    serving: dict | None = None,
    providers=None,
) -> Path:
    """The classifier bundle as a Jetson build writes it: TensorRT -> CPU with options and overrides."""
    files = {
        "model.onnx": classifier_onnx(),
        "labels.txt": "\n".join(LABELS).encode(),
        "golden.npz": classifier_golden(),
    }
    extra = {}
    if variants:
        files.update({path: data for path, (data, _) in variants.items()})
        extra["variants"] = [
            model_file(path, precision="int8", provider_options=options) for path, (_, options) in variants.items()
        ]
    manifest = make_manifest(
        name,
        **CLASSIFIER_IO,
        labels="labels.txt",
        model=model_file(provider_options=model_options or {}),
        golden=GoldenSpec(path="golden.npz", atol=1e-4, rtol=1e-3, min_top1_agreement=1.0),
        providers=providers or [ProviderSpec(name=TENSORRT, options=TRT_OPTIONS), ProviderSpec(name=CPU)],
        serving=serving,
        **extra,
    )
    return write_bundle(dest, manifest, files, force=True)


class ReportsProviders:
    """A real ORT session that reports other providers (what a GPU build would say)."""

    def __init__(self, real, providers: list[str], rows: list[int] | None = None):
        self._real = real
        self._providers = providers
        self.rows = rows

    def get_providers(self):
        return list(self._providers)

    def run(self, output_names, feeds):
        if self.rows is not None:
            self.rows.append(len(next(iter(feeds.values()))))
        return self._real.run(output_names, feeds)

    def __getattr__(self, name):
        return getattr(self._real, name)


class FakeGpuFactory:
    """Stands in for ``_create_inference_session``: records every chain; TensorRT sessions wait for
    ``engine_built`` (the test decides when the build finishes), fail, or come back without TensorRT."""

    def __init__(
        self, *, engine_built: threading.Event | None = None, fail: str | None = None, falls_back: bool = False
    ):
        self.real = session_module._create_inference_session
        self.calls: list[tuple[str, list[tuple[str, dict]]]] = []
        self.engine_built = engine_built
        self.fail = fail
        self.falls_back = falls_back
        self.rows: list[int] = []

    def __call__(self, path, options, providers):
        self.calls.append((Path(path).name, [(n, dict(o)) for n, o in providers]))
        cpu_only = [(CPU, {})]
        if providers[0][0] != TENSORRT:
            return ReportsProviders(self.real(path, options, cpu_only), [n for n, _ in providers], self.rows)
        if self.fail:
            raise RuntimeError(self.fail)
        if self.engine_built is not None and not self.engine_built.wait(WAIT_S):
            raise RuntimeError("test never released the simulated engine build")
        reported = [n for n, _ in providers if n != TENSORRT] if self.falls_back else [n for n, _ in providers]
        return ReportsProviders(self.real(path, options, cpu_only), reported, self.rows)

    def chains(self, provider: str) -> list[tuple[str, dict]]:
        return [(model, dict(chain)[provider]) for model, chain in self.calls if chain[0][0] == provider]


@pytest.fixture()
def fake_gpu(monkeypatch):
    """TensorRT + CPU 'available'; fixed probe results so cache keys are deterministic."""
    monkeypatch.setattr(session_module, "_available_providers", lambda: [TENSORRT, CPU])
    monkeypatch.setattr(tensorrt_module, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(tensorrt_module, "compute_capability", lambda device_id=0: "8.7")

    def install(factory: FakeGpuFactory) -> FakeGpuFactory:
        monkeypatch.setattr(session_module, "_create_inference_session", factory)
        return factory

    return install


def x_request(rows: int) -> dict:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 10
    return {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}


# ---- 1. per-variant provider options ----


def test_variant_provider_options_merge_over_manifest_options(tmp_path, cache_dir, fake_gpu, monkeypatch):
    int8_options = {TENSORRT: {"trt_int8_enable": True, "trt_fp16_enable": True}}
    bundle = gpu_bundle(
        tmp_path / "b",
        model_options={TENSORRT: {"trt_fp16_enable": True}},
        variants={"variants/int8.onnx": (classifier_onnx(), int8_options)},
    )
    factory = fake_gpu(FakeGpuFactory())
    monkeypatch.setattr(
        loader_module,
        "self_benchmark",  # compare both variants without timing anything
        lambda session, max_batch, golden, budget_s=1.0, timer=None: {"batch_1": {"batch": 1, "p50_ms": 1.0}},
    )
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=True, threads=1))
    trt = dict(factory.chains(TENSORRT))
    assert set(trt) == {"model.onnx", "int8.onnx"}
    assert trt["model.onnx"]["trt_fp16_enable"] is True and trt["model.onnx"]["trt_int8_enable"] is False
    assert trt["int8.onnx"]["trt_fp16_enable"] is True and trt["int8.onnx"]["trt_int8_enable"] is True
    for options in trt.values():  # manifest-level options still there
        assert options["trt_profile_max_shapes"] == "x:8x4" and options["trt_engine_cache_enable"] is True
    # Caches keyed per variant, under the cache dir; engine and timing caches still share a directory.
    engine_dirs = {model: Path(options["trt_engine_cache_path"]) for model, options in trt.items()}
    for model, options in trt.items():
        assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
        assert engine_dirs[model].is_dir() and engine_dirs[model].name == "tensorrt"
        assert engine_dirs[model].parent.parent == cache_dir / "providers" / TENSORRT
    assert engine_dirs["model.onnx"] != engine_dirs["int8.onnx"]
    recorded = json.loads((engine_dirs["model.onnx"].parent / "key.json").read_text())
    assert recorded["model_sha256"] == served.manifest.model.sha256
    assert recorded["tensorrt_version"] == "10.3.0" and recorded["compute_capability"] == "8.7"
    assert served.parameters["tensorrt"]["state"] == "ready"  # synchronous mode: built before serving


# ---- 2. engine cache key ----

KEY_PARTS = dict(
    model_sha256="a" * 64,
    onnxruntime_version="1.20.1",
    tensorrt_version="10.3.0",
    compute_capability="8.7",
    profile_shapes={"trt_profile_min_shapes": "x:1x4", "trt_profile_max_shapes": "x:8x4"},
    build_options={"trt_fp16_enable": True},
)


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "b" * 64},
        {"onnxruntime_version": "1.21.0"},
        {"tensorrt_version": "10.7.0"},
        {"compute_capability": "9.0"},
        {"compute_capability": "unknown"},
        {"profile_shapes": {"trt_profile_min_shapes": "x:1x4", "trt_profile_max_shapes": "x:16x4"}},
        {"build_options": {"trt_fp16_enable": False}},
    ],
)
def test_cache_key_changes_with_every_component(change):
    base = engine_cache_key(**KEY_PARTS)
    assert engine_cache_key(**KEY_PARTS) == base  # pure: same inputs, same key
    assert engine_cache_key(**{**KEY_PARTS, **change}) != base


def test_cache_key_ignores_dict_order_and_cache_locations(tmp_path, monkeypatch):
    reordered = dict(KEY_PARTS, profile_shapes=dict(reversed(list(KEY_PARTS["profile_shapes"].items()))))
    assert engine_cache_key(**reordered) == engine_cache_key(**KEY_PARTS)
    monkeypatch.setattr(tensorrt_module, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(tensorrt_module, "compute_capability", lambda device_id=0: "8.7")
    one = relocate_cache_paths(TENSORRT, TRT_OPTIONS, tmp_path, "a" * 64)
    moved = relocate_cache_paths(
        TENSORRT, {**TRT_OPTIONS, "trt_engine_cache_path": "/elsewhere/tensorrt"}, tmp_path, "a" * 64
    )
    assert one["trt_engine_cache_path"] == moved["trt_engine_cache_path"]
    monkeypatch.setattr(tensorrt_module, "compute_capability", lambda device_id=0: "7.2")  # another GPU
    other_gpu = relocate_cache_paths(TENSORRT, TRT_OPTIONS, tmp_path, "a" * 64)
    assert other_gpu["trt_engine_cache_path"] != one["trt_engine_cache_path"]


def test_compute_capability_probe_reads_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '8.9\\n9.0\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    probe = tensorrt_module.compute_capability.__wrapped__
    assert probe(0) == "8.9" and probe(1) == "9.0" and probe(5) == "8.9"
    # Without nvidia-smi, a Jetson's SoC name in the device tree decides; elsewhere it is unknown.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    tree = tmp_path / "compatible"
    monkeypatch.setattr(tensorrt_module, "DEVICE_TREE_COMPATIBLE", tree)
    tree.write_bytes(b"nvidia,p3768-0000+p3767-0005\x00nvidia,tegra234\x00")
    assert probe(0) == "8.7"
    tree.write_bytes(b"raspberrypi,4-model-b\x00brcm,bcm2711\x00")
    assert probe(0) == "unknown"
    tree.unlink()
    assert probe(0) == "unknown"


def test_tensorrt_version_comes_from_package_metadata_first(monkeypatch):
    import importlib.metadata

    def version(dist):
        if dist == "tensorrt-cu12":
            return "10.3.0"
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert tensorrt_module.tensorrt_version.__wrapped__() == "10.3.0"


# ---- 3. background TensorRT build ----


def background_options(cache_dir: Path) -> LoadOptions:
    return LoadOptions(cache_dir=cache_dir, bench=False, threads=1, trt_background=True)


def wait_for_build(repo: ModelRepository, name: str = "clf") -> None:
    build = repo.builds[name]
    build.join(WAIT_S)
    assert not build.is_alive(), "background TensorRT build did not finish"


def test_serves_on_cpu_while_tensorrt_builds_then_swaps_it_in(tmp_path, cache_dir, fake_gpu, caplog):
    engine_built = threading.Event()
    factory = fake_gpu(FakeGpuFactory(engine_built=engine_built))
    bundle = gpu_bundle(tmp_path / "b")
    repo = ModelRepository(background_options(cache_dir))
    try:
        with caplog.at_level(logging.INFO, logger="edgerun"), TestClient(create_app(repo, ServerConfig())) as client:
            repo.load(bundle)  # returns while the engine is still "building"
            before = repo.get("clf")
            assert client.get("/v2/health/ready").json() == {"ready": True}
            meta = client.get("/v2/models/clf").json()["parameters"]
            assert meta["providers"] == [CPU]
            assert meta["tensorrt"] == {"state": "building", "variant": "model.onnx"}
            answer = client.post("/v2/models/clf/infer", json=x_request(2))
            assert answer.status_code == 200, answer.text

            engine_built.set()
            wait_for_build(repo)
            meta = client.get("/v2/models/clf").json()["parameters"]
            assert meta["tensorrt"]["state"] == "ready" and meta["tensorrt"]["seconds"] >= 0
            assert meta["providers"] == [TENSORRT, CPU] and meta["golden"]["passed"] is True
            answer = client.post("/v2/models/clf/infer", json=x_request(2))
            assert answer.status_code == 200, answer.text
            x = np.array(x_request(2)["inputs"][0]["data"], dtype=np.float32).reshape(2, 4)
            np.testing.assert_allclose(
                np.array(answer.json()["outputs"][0]["data"]).reshape(2, 3), classifier_reference(x), rtol=1e-5
            )
            assert 'providers="TensorrtExecutionProvider,CPUExecutionProvider"' in client.get("/metrics").text
    finally:
        engine_built.set()
    after = repo.get("clf")
    assert after is not before and after.version == before.version
    assert before.session.providers == [CPU]  # a request holding the old model still runs on it
    assert before.session.run({"x": np.zeros((1, 4), np.float32)})["probs"].shape == (1, 3)
    # The ready check ran CUDA/CPU first (without TensorRT in the chain), then TensorRT with the fallback.
    assert [chain[0][0] for _, chain in factory.calls] == [CPU, TENSORRT]
    assert "TensorRT ready" in caplog.text


def test_failed_tensorrt_build_keeps_cpu_serving(tmp_path, cache_dir, fake_gpu, caplog):
    fake_gpu(FakeGpuFactory(fail="simulated: engine build ran out of workspace"))
    repo = ModelRepository(background_options(cache_dir))
    with caplog.at_level(logging.ERROR, logger="edgerun"), TestClient(create_app(repo, ServerConfig())) as client:
        repo.load(gpu_bundle(tmp_path / "b"))
        wait_for_build(repo)
        meta = client.get("/v2/models/clf").json()["parameters"]
        assert meta["tensorrt"]["state"] == "failed"
        assert "simulated: engine build ran out of workspace" in meta["tensorrt"]["reason"]
        assert meta["providers"] == [CPU]
        assert client.post("/v2/models/clf/infer", json=x_request(1)).status_code == 200
    assert "still serving on CPUExecutionProvider" in caplog.text


def test_silent_onnxruntime_fallback_counts_as_failed(tmp_path, cache_dir, fake_gpu):
    fake_gpu(FakeGpuFactory(falls_back=True))
    repo = ModelRepository(background_options(cache_dir))
    repo.load(gpu_bundle(tmp_path / "b"))
    wait_for_build(repo)
    state = repo.get("clf").parameters["tensorrt"]
    assert state["state"] == "failed" and "fell back to CPUExecutionProvider" in state["reason"]


def test_build_for_a_replaced_version_is_discarded(tmp_path, cache_dir, fake_gpu):
    engine_built = threading.Event()
    fake_gpu(FakeGpuFactory(engine_built=engine_built))
    repo = ModelRepository(background_options(cache_dir))
    try:
        repo.load(gpu_bundle(tmp_path / "v1"))
        first_build = repo.builds["clf"]
        v2 = repo.load(gpu_bundle(tmp_path / "v2", serving={"max_batch": 8}))  # another bundle, same model
    finally:
        engine_built.set()
    first_build.join(WAIT_S)
    wait_for_build(repo)
    served = repo.get("clf")
    assert served.version == v2.version and served.session.providers[0] == TENSORRT


def test_no_background_flag_builds_before_serving(tmp_path, cache_dir, fake_gpu, monkeypatch):
    fake_gpu(FakeGpuFactory())
    served = load_model(gpu_bundle(tmp_path / "b"), LoadOptions(cache_dir=cache_dir, bench=False, threads=1))
    assert served.tensorrt_build is None
    assert served.parameters["providers"][0] == TENSORRT and served.parameters["tensorrt"] == {"state": "ready"}
    seen = {}
    monkeypatch.setattr(
        "edgerun.reload.ModelRepository.load",
        lambda self, location, **kwargs: seen.setdefault("background", self.options.trt_background),
    )
    monkeypatch.setattr("edgerun.server.serve", lambda *a, **k: None)
    monkeypatch.setattr("edgerun.cli.tune_malloc", lambda: None)
    for flags, expected in (([], True), (["--no-trt-background"], False)):
        seen.clear()
        result = CliRunner().invoke(main, ["serve", str(tmp_path / "b"), "--cache-dir", str(cache_dir), *flags])
        assert seen.get("background") is expected, result.output


# ---- 4. out-of-profile requests ----


def test_batch_over_the_profile_is_refused_and_never_stacked(tmp_path, cache_dir, fake_gpu):
    factory = fake_gpu(FakeGpuFactory())
    bundle = gpu_bundle(
        tmp_path / "b", providers=[ProviderSpec(name=CPU)], serving={"max_batch": 3, "out_of_profile": "reject"}
    )
    repo = ModelRepository(LoadOptions(cache_dir=cache_dir, bench=True, threads=1, max_batch=8, bench_budget_s=0.01))
    repo.load(bundle)
    # Golden (4 samples) and self-benchmark (--max-batch 8) stay within the profile too.
    assert factory.rows and max(factory.rows) <= 3
    assert repo.get("clf").parameters["benchmark"].keys() >= {"batch_1", "batch_3"}
    with TestClient(create_app(repo, ServerConfig(max_batch=8, max_delay_ms=50))) as client:
        refused = client.post("/v2/models/clf/infer", json=x_request(4))
        assert refused.status_code == 400
        assert refused.json()["error"] == (
            "batch 4 exceeds this model's max batch 3 (TensorRT profile); split the request"
        )
        assert client.post("/v2/models/clf/infer", json=x_request(3)).status_code == 200


def test_dynamic_batching_stops_at_the_session_limit():
    class Limited:
        batchable = True
        max_batch = 2

        def __init__(self):
            self.runs: list[int] = []

        def run(self, feeds):
            self.runs.append(len(feeds["x"]))
            return {"y": feeds["x"] * 2}

    session = Limited()

    async def scenario():
        batcher = Batcher(max_batch=8, max_delay_ms=50, max_queue=16)
        inputs = [np.full((1, 3), i, dtype=np.float32) for i in range(7)]
        results = await asyncio.gather(*(batcher.submit(session, {"x": x}) for x in inputs))
        await batcher.close()
        return inputs, results

    inputs, results = asyncio.run(scenario())
    assert sum(session.runs) == 7 and max(session.runs) == 2
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result["y"], x * 2)


def test_serving_without_reject_sets_no_limit(tmp_path, cache_dir):
    bundle = gpu_bundle(tmp_path / "b", providers=[ProviderSpec(name=CPU)], serving={"max_batch": 2})
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, threads=1))
    assert served.session.max_batch is None
    assert served.session.run({"x": np.zeros((5, 4), np.float32)})["probs"].shape == (5, 3)


def test_background_mode_keeps_the_builders_variant_order_instead_of_cpu_timings(tmp_path, cache_dir, fake_gpu):
    engine_built = threading.Event()
    fake_gpu(FakeGpuFactory(engine_built=engine_built))
    bundle = gpu_bundle(
        tmp_path / "b", variants={"variants/int8.onnx": (classifier_onnx(), {TENSORRT: {"trt_int8_enable": True}})}
    )
    options = LoadOptions(cache_dir=cache_dir, bench=True, bench_budget_s=0.05, threads=1, trt_background=True)
    try:
        served = load_model(bundle, options)
        # CPU timings of the variants say nothing about TensorRT: the manifest's first model is served.
        assert served.parameters["variant"] == "model.onnx"
        assert "variants" not in served.parameters.get("benchmark", {})
    finally:
        engine_built.set()
