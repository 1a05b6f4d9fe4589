"""A bundle is data: provider options and session settings pass an allow-list, cache paths stay
under --cache-dir, and what ONNX Runtime gets is the bytes whose checksum was verified."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_fixtures import build_classifier_bundle, classifier_onnx

import edgerun.session as session_module
from edgerun.bundle import open_bundle
from edgerun.cli import main
from edgerun.errors import BundleError
from edgerun.loader import load_model
from edgerun.manifest import ProviderSpec, SessionOptionsSpec
from edgerun.provider_options import check_provider_options
from edgerun.session import provider_candidates

TRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"


@pytest.mark.parametrize(
    "provider, key",
    [
        (TRT, "trt_extra_plugin_lib_paths"),
        (TRT, "trt_engine_decryption_lib_path"),
        (TRT, "trt_dump_subgraphs"),
        (TRT, "trt_ep_context_file_path"),
        ("CUDAExecutionProvider", "gpu_external_alloc"),
        ("OpenVINOExecutionProvider", "load_config"),
        (CPU, "anything"),
        ("SomeOtherExecutionProvider", "device_id"),
    ],
)
def test_provider_options_that_are_not_tuning_refuse_the_bundle(tmp_path, load_options, provider, key):
    bundle = build_classifier_bundle(
        tmp_path / "b",
        providers=[ProviderSpec(name=provider, options={key: "/tmp/libevil.so"}), ProviderSpec(name=CPU)],
    )
    with pytest.raises(BundleError, match=f"provider option '{key}' of {provider} is not allowed"):
        load_model(bundle, load_options)
    result = CliRunner().invoke(main, ["verify", str(bundle), "--cache-dir", str(load_options.cache_dir)])
    assert result.exit_code == 2 and key in result.output and result.output.count("\n") == 1


def rewritten(bundle: Path, dest: Path, change) -> Path:
    """The bundle with its manifest changed by ``change``, re-written by the builder so checksums stay right."""
    from edgebuild.bundle import write_bundle

    manifest = open_bundle(bundle).manifest
    change(manifest)
    files = {p: (bundle / p).read_bytes() for p in manifest.files}
    return write_bundle(dest, manifest, files)


def test_variant_provider_options_pass_the_same_list(tmp_path, load_options):
    bundle = build_classifier_bundle(tmp_path / "b", variants={"variants/v.onnx": classifier_onnx()})

    def change(manifest):
        manifest.variants[0].provider_options = {TRT: {"trt_int8_enable": True, "trt_extra_plugin_lib_paths": "/x.so"}}

    with pytest.raises(BundleError, match="'variants/v.onnx' provider_options: provider option 'trt_extra_plugin"):
        load_model(rewritten(bundle, tmp_path / "c", change), load_options)


@pytest.mark.parametrize("key", ["ep.context_enable", "ep.context_file_path", "session.load_model_format"])
def test_session_config_entries_that_are_not_tuning_are_refused(tmp_path, load_options, key):
    bundle = build_classifier_bundle(tmp_path / "b")

    def change(manifest):
        manifest.model.session_options = SessionOptionsSpec(config={key: "1"})

    with pytest.raises(BundleError, match=f"session config entry '{key}' is not allowed"):
        load_model(rewritten(bundle, tmp_path / "c", change), load_options)


def test_tuning_options_pass():
    check_provider_options(TRT, {"trt_fp16_enable": True, "trt_profile_max_shapes": "x:8x4"}, "test")
    check_provider_options("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}, "test")


@pytest.mark.parametrize("value", ["../../../../etc", "/etc/..", "..", "", "/var/cache/edgerun/tensorrt"])
def test_cache_paths_are_confined_to_the_cache_dir(tmp_path, value, monkeypatch):
    bundle = build_classifier_bundle(
        tmp_path / "b",
        providers=[
            ProviderSpec(name=TRT, options={"trt_engine_cache_path": value, "trt_timing_cache_path": value}),
            ProviderSpec(name="OpenVINOExecutionProvider", options={"cache_dir": value}),
            ProviderSpec(name=CPU),
        ],
    )
    manifest = open_bundle(bundle).manifest
    cache_dir = tmp_path / "cache"
    chosen = provider_candidates(manifest, None, cache_dir, available=[TRT, "OpenVINOExecutionProvider", CPU])
    for spec in chosen:
        for key, path in spec.options.items():
            if key.endswith(("_cache_path", "cache_dir")):
                assert Path(path).resolve().is_relative_to(cache_dir.resolve()), (key, path)
    # The engine directory of the session is keyed under the cache dir too.
    from edgerun.bundle import VerifiedFile

    chain = session_module.provider_chain(
        chosen[:1], manifest.model, VerifiedFile("model.onnx", b"", "a" * 64), cache_dir
    )
    engine = Path(chain[0][1]["trt_engine_cache_path"])
    assert engine.is_dir() and engine.resolve().is_relative_to((cache_dir / "providers" / TRT).resolve())


def test_sessions_are_made_from_the_verified_bytes(tmp_path, load_options, monkeypatch):
    bundle = build_classifier_bundle(tmp_path / "b")
    given = []
    real = session_module._create_inference_session

    def spy(model, options, providers):
        given.append(model)
        return real(model, options, providers)

    monkeypatch.setattr(session_module, "_create_inference_session", spy)
    opened = open_bundle(bundle)
    served = load_model(bundle, load_options)
    assert [m.relpath for m in given] == ["model.onnx"]
    assert given[0].data == (bundle / "model.onnx").read_bytes()
    assert given[0].sha256 == opened.manifest.model.sha256 == opened.manifest.files["model.onnx"]
    assert served.labels == ["cat", "dog", "bird"]


def test_a_file_swapped_after_verification_is_never_loaded(tmp_path, load_options):
    bundle_dir = build_classifier_bundle(tmp_path / "b")
    bundle = open_bundle(bundle_dir)  # verified here ...
    original = (bundle_dir / "model.onnx").read_bytes()
    (bundle_dir / "model.onnx").write_bytes(classifier_onnx(poison=float("nan")))  # ... replaced afterwards
    (bundle_dir / "golden.npz").unlink()
    # The files the load uses first were read by the verification: those bytes are the ones used.
    assert bundle.read_verified("model.onnx") == original
    assert bundle.read_verified("golden.npz")
    bundle.forget_cached()
    # Any read after those reads the disk again, and checks it again.
    with pytest.raises(BundleError, match="'model.onnx' does not match its checksum"):
        bundle.read_verified("model.onnx")
    with pytest.raises(BundleError, match="cannot be read"):
        bundle.read_verified("golden.npz")
