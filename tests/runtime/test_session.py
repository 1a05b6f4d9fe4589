"""Sessions: options from the manifest, golden parity, variant and provider fallback, decision cache."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from runtime_fixtures import W, build_classifier_bundle, classifier_onnx

import edgerun.session as session_module
from edgerun.errors import SessionError
from edgerun.loader import LoadOptions, load_model
from edgerun.manifest import ProviderSpec, SessionOptionsSpec
from edgerun.session import make_session_options


def test_session_options_follow_manifest_and_disable_spinning():
    options = make_session_options(
        SessionOptionsSpec(graph_optimization_level="basic", config={"session.use_env_allocators": "1"}), threads=2
    )
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    assert options.intra_op_num_threads == 2
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_BASIC")


def test_golden_drift_is_refused(tmp_path, load_options):
    bundle = build_classifier_bundle(tmp_path / "b", model=classifier_onnx(weight=W * 1.5))
    with pytest.raises(SessionError, match="drifts from golden"):
        load_model(bundle, load_options)


def test_no_golden_skips_with_a_log_line(tmp_path, load_options, caplog):
    bundle = build_classifier_bundle(tmp_path / "b", golden=False)
    with caplog.at_level(logging.INFO, logger="edgerun"):
        served = load_model(bundle, load_options)
    assert "parity check skipped" in caplog.text
    assert served.parameters["golden"]["samples"] == 0


def test_failing_variants_are_dropped_and_next_tried(tmp_path, load_options, caplog):
    bundle = build_classifier_bundle(
        tmp_path / "b",
        model=classifier_onnx(poison=float("nan")),
        variants={"variants/drift.onnx": classifier_onnx(weight=W * 2), "variants/good.onnx": classifier_onnx()},
    )
    with caplog.at_level(logging.WARNING, logger="edgerun"):
        served = load_model(bundle, load_options)
    assert served.parameters["variant"] == "variants/good.onnx"
    dropped = served.parameters["dropped"]
    assert "NaN" in dropped[0] and "model.onnx" in dropped[0]
    assert "drifts" in dropped[1] and "drift.onnx" in dropped[1]
    assert "dropped model.onnx" in caplog.text


def test_provider_failure_falls_back_to_next(tmp_path, load_options, monkeypatch):
    bundle = build_classifier_bundle(tmp_path / "b", providers=["AzureExecutionProvider", "CPUExecutionProvider"])
    real = session_module._create_inference_session
    tried = []

    def flaky(path, options, providers):
        tried.append([name for name, _ in providers])
        if providers[0][0] == "AzureExecutionProvider":
            raise RuntimeError("simulated: provider library failed to load")
        return real(path, options, providers)

    monkeypatch.setattr(session_module, "_create_inference_session", flaky)
    served = load_model(bundle, load_options)
    assert tried == [["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    assert served.parameters["providers"] == ["CPUExecutionProvider"]
    assert "simulated: provider library failed to load" in served.parameters["dropped"][0]


def test_all_providers_failing_is_a_clear_error(tmp_path, load_options, monkeypatch):
    bundle = build_classifier_bundle(tmp_path / "b")

    def broken(path, options, providers):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(session_module, "_create_inference_session", broken)
    with pytest.raises(SessionError, match="no variant/provider passed.*simulated failure"):
        load_model(bundle, load_options)


def test_unavailable_providers_skipped_and_override(tmp_path, cache_dir):
    bundle = build_classifier_bundle(
        tmp_path / "b",
        providers=[
            ProviderSpec(name="TensorrtExecutionProvider", options={"trt_engine_cache_path": "trt"}),
            "CPUExecutionProvider",
        ],
    )
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False))
    assert served.parameters["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(SessionError, match="none of the providers"):
        load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, providers=["cuda"]))
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, providers=["cpu"]))
    assert served.parameters["providers"] == ["CPUExecutionProvider"]


def test_cache_paths_move_under_cache_dir(tmp_path, bundles):
    from edgerun.bundle import open_bundle
    from edgerun.session import provider_candidates

    manifest = open_bundle(bundles["classifier"]).manifest.model_copy(
        update={
            "providers": [
                ProviderSpec(
                    name="TensorrtExecutionProvider",
                    options={"trt_engine_cache_path": "engines", "trt_timing_cache_path": "/abs/timing"},
                )
            ]
        }
    )
    (chosen,) = provider_candidates(manifest, None, tmp_path, "ab" * 32, available=["TensorrtExecutionProvider"])
    assert chosen.options["trt_engine_cache_path"].startswith(str(tmp_path))
    assert chosen.options["trt_timing_cache_path"].startswith(str(tmp_path))


def test_benchmark_picks_fastest_variant_and_caches_decision(tmp_path, cache_dir, monkeypatch):
    import edgerun.loader as loader

    bundle = build_classifier_bundle(tmp_path / "b", variants={"variants/alt.onnx": classifier_onnx()})
    fake = {"model.onnx": 5.0, "variants/alt.onnx": 1.0}
    calls = []

    def fake_bench(session, max_batch, golden_inputs, budget_s=1.0, timer=None):
        calls.append(session.variant.path)
        return {"batch_1": {"batch": 1, "p50_ms": fake[session.variant.path], "throughput_per_s": 1.0}}

    monkeypatch.setattr(loader, "self_benchmark", fake_bench)
    options = LoadOptions(cache_dir=cache_dir, bench=True, threads=1)
    served = load_model(bundle, options)
    assert calls == ["model.onnx", "variants/alt.onnx"]
    assert served.parameters["variant"] == "variants/alt.onnx"
    assert set(served.parameters["benchmark"]["variants"]) == {"model.onnx", "variants/alt.onnx"}
    assert list((cache_dir / "decisions").glob("*.json"))
    calls.clear()
    served = load_model(bundle, options)  # decision cached: only the chosen variant is loaded, measured never
    assert calls == [] and served.parameters["variant"] == "variants/alt.onnx"
    numbers = served.parameters["benchmark"]
    assert numbers["cached"] is True and numbers["batch_1"]["p50_ms"] == 1.0
    assert {path: n["p50_ms"] for path, n in numbers["variants"].items()} == fake
    served = load_model(bundle, dataclasses.replace(options, remeasure=True))  # edgerun bench's load
    assert calls == ["variants/alt.onnx"] and "cached" not in served.parameters["benchmark"]


def test_a_restart_reuses_the_numbers_of_a_single_variant_bundle(bundles, cache_dir, monkeypatch):
    """A device restarting the bundle it served measures nothing again (same bundle, providers, threads
    and ISA): the numbers its first start measured are served, marked cached."""
    import edgerun.loader as loader

    calls = []
    measure = loader.self_benchmark

    def counted(session, *args, **kwargs):
        calls.append(session.variant.path)
        return measure(session, *args, **kwargs)

    monkeypatch.setattr(loader, "self_benchmark", counted)
    options = LoadOptions(cache_dir=cache_dir, bench=True, max_batch=4, bench_budget_s=0.1)
    first = load_model(bundles["classifier"], options).parameters["benchmark"]
    again = load_model(bundles["classifier"], options).parameters["benchmark"]
    assert calls == ["model.onnx"]
    assert again.pop("cached") is True and "cached" not in first
    assert again == first
    other_threads = load_model(bundles["classifier"], dataclasses.replace(options, threads=1))
    assert calls == ["model.onnx", "model.onnx"]  # another thread count is another key: measured
    assert "cached" not in other_threads.parameters["benchmark"]


def test_damaged_cached_numbers_are_measured_again(bundles, cache_dir):
    options = LoadOptions(cache_dir=cache_dir, bench=True, max_batch=4, bench_budget_s=0.1)
    load_model(bundles["classifier"], options)
    (record,) = [p for p in (cache_dir / "decisions").glob("*.json") if "numbers" in json.loads(p.read_text())]
    decision = json.loads(record.read_text())
    assert "model.onnx" in decision["numbers"]
    decision["numbers"] = {"model.onnx": {"batch_1": "fast"}}
    record.write_text(json.dumps(decision))
    numbers = load_model(bundles["classifier"], options).parameters["benchmark"]
    assert "cached" not in numbers and numbers["batch_1"]["p50_ms"] > 0
    assert json.loads(record.read_text())["numbers"]["model.onnx"]["batch_1"]["p50_ms"] > 0  # mended


def test_real_self_benchmark_numbers(bundles, cache_dir):
    served = load_model(
        bundles["classifier"], LoadOptions(cache_dir=cache_dir, bench=True, max_batch=4, bench_budget_s=0.1)
    )
    numbers = served.parameters["benchmark"]
    assert numbers["batch_1"]["p50_ms"] <= numbers["batch_1"]["p99_ms"]
    assert numbers["batch_4"]["batch"] == 4


@pytest.mark.parametrize("golden_value", [float("inf"), float("-inf"), float("nan")])
def test_golden_check_fails_when_a_non_finite_golden_value_comes_out_finite(tmp_path, golden_value):
    from runtime_fixtures import CLASSIFIER_IO, classifier_reference, golden_x, make_manifest, npz_bytes

    from edgebuild.bundle import write_bundle
    from edgerun.manifest import GoldenSpec

    x = golden_x()
    want = classifier_reference(x)
    want[0, 0] = golden_value  # the model answers with a finite number here
    manifest = make_manifest("clf", **CLASSIFIER_IO, golden=GoldenSpec(atol=1e-4))
    bundle = write_bundle(
        tmp_path / "b",
        manifest,
        {"model.onnx": classifier_onnx(), "golden.npz": npz_bytes(**{"input:x": x, "output:probs": want})},
        force=True,
    )
    with pytest.raises(SessionError, match="golden"):
        load_model(bundle, LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1))
