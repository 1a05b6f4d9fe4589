"""ONNX Runtime sessions built the way the bundle was validated.

A session is created from one model file (the selected model or a variant) with the
manifest's session options and a provider chain. ``ModelSession.run`` is the only place
inference happens; the server, the batcher, the golden check (``edgerun.golden``) and the
self-benchmark all go through it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.bundle import VerifiedFile
from edgerun.errors import RequestError, SessionError
from edgerun.external_data import check_self_contained
from edgerun.manifest import Manifest, ModelFile, ProviderSpec, SessionOptionsSpec, TensorSpec
from edgerun.provider_options import CACHE_ENABLE_KEYS, cache_path_keys, confined_cache_path
from edgerun.tensorrt import relocate_cache_paths, serving_batch_limit

log = logging.getLogger("edgerun")

_OPT_LEVELS = {
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# ORT tensor type strings -> numpy, to cast feeds when a variant's IO differs from the manifest.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

CPU = "CPUExecutionProvider"  # every onnxruntime build has it; the builder validates on it
_SHORT_PROVIDER_NAMES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


def canonical_provider_name(name: str) -> str:
    name = name.strip()
    return _SHORT_PROVIDER_NAMES.get(name.lower(), name)


def make_session_options(spec: SessionOptionsSpec, threads: int):
    """SessionOptions exactly as the builder validated them, sized for this box."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[spec.graph_optimization_level])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Spinning workers burn ~0.35 core between requests on a small CPU for no latency gain.
    if "session.intra_op.allow_spinning" not in spec.config:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in spec.config.items():
        options.add_session_config_entry(key, str(value))
    return options


def _available_providers() -> list[str]:
    """Indirection so tests can simulate an onnxruntime build with GPU providers."""
    import onnxruntime as ort

    return ort.get_available_providers()


def provider_candidates(
    manifest: Manifest,
    override: list[str] | None,
    cache_dir: Path,
    bundle_id: str | None = None,
    available: list[str] | None = None,
) -> list[ProviderSpec]:
    """The manifest's providers (or ``override``) that this ORT build has, in order.

    Options naming a cache path (TensorRT engine/timing caches) are moved under
    ``<cache_dir>/providers/<provider>/`` so the bundle directory stays read-only and caches
    survive restarts; ``provider_chain`` then keys them per model file (``bundle_id`` is not
    part of the path: the same model file in a re-issued bundle reuses its engine). Only the
    last component of a manifest's cache path is kept, and never one that leaves the cache dir.
    """
    if available is None:
        available = _available_providers()
    by_name = {p.name: p for p in manifest.providers}
    if override:
        wanted = [
            by_name.get(canonical_provider_name(n), ProviderSpec(name=canonical_provider_name(n))) for n in override
        ]
    else:
        wanted = list(manifest.providers)
    chosen = []
    for spec in wanted:
        if spec.name not in available:
            log.info(
                "provider %s skipped: not available in this onnxruntime build (available: %s)",
                spec.name,
                ", ".join(available),
            )
            continue
        options = dict(spec.options)
        for key in cache_path_keys(spec.name, options):
            leaf = Path(str(options[key])).name
            options[key] = str(confined_cache_path(cache_dir, "providers", spec.name, leaf))
        chosen.append(ProviderSpec(name=spec.name, options=options))
    if not chosen:
        names = [p.name for p in wanted]
        raise SessionError(
            f"none of the providers {names} is available in this onnxruntime build (available: {available}); "
            f"pass --providers CPUExecutionProvider or install the matching onnxruntime package"
        )
    return chosen


def provider_chain(
    providers: list[ProviderSpec], variant: ModelFile, model: VerifiedFile, cache_dir: Path | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The (name, options) chain ORT gets for one variant.

    The variant's own options (e.g. ``trt_int8_enable`` for an INT8 QDQ file) go over the
    manifest-level ones; then cache paths are keyed by the sha256 of the verified bytes ORT
    gets and the engine's environment (see ``edgerun.tensorrt``), so no variant or upgrade
    loads another's engine.
    """
    chain = []
    for spec in providers:
        options = {**spec.options, **variant.provider_options.get(spec.name, {})}
        switches = CACHE_ENABLE_KEYS.get(spec.name, {})
        for enable, path_key in switches.items():
            if str(options.get(enable, "")).lower() not in ("", "0", "false") and path_key not in options:
                options[path_key] = "cache"  # not the working directory, TensorRT's default: moved below
        paths = cache_path_keys(spec.name, options)
        if paths and cache_dir is not None:
            options = relocate_cache_paths(spec.name, options, cache_dir, model.sha256, paths)
        elif paths:  # no cache dir: caches stay off rather than land where the manifest says
            options = {k: v for k, v in options.items() if k not in paths and k not in switches}
        chain.append((spec.name, options))
    return chain


def _create_inference_session(model: VerifiedFile, options, providers: list[tuple[str, dict]]):
    """Indirection so tests can simulate a provider that fails to initialise.

    The session is made from the verified bytes, never by re-opening the file.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(model.data, sess_options=options, providers=providers)
    # onnxruntime's wrapper keeps the bytes for re-creating the session on a provider reset, which
    # edgerun never asks for: holding them would cost one more copy of the model in RSS.
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session


class ModelSession:
    """One ORT session plus the manifest's view of its inputs and outputs."""

    def __init__(self, session: Any, manifest: Manifest, variant: ModelFile, threads: int):
        self.session = session
        self.manifest = manifest
        self.variant = variant
        self.threads = threads
        self.providers: list[str] = list(session.get_providers())
        self.inputs: list[TensorSpec] = list(manifest.inputs)
        self.outputs: list[TensorSpec] = list(manifest.outputs)
        self.input_by_name = {spec.name: spec for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]
        self._feed_casts = {}
        for node in session.get_inputs():
            wanted = _ORT_TYPES.get(node.type)
            spec = self.input_by_name.get(node.name)
            if wanted is not None and spec is not None and np.dtype(spec.dtype) != np.dtype(wanted):
                self._feed_casts[node.name] = np.dtype(wanted)
        self._count_lock = threading.Lock()
        self.run_count = 0
        # Largest batch one run may have (the TensorRT profile's), or None for no limit.
        self.max_batch: int | None = serving_batch_limit(manifest.serving)

    @property
    def batchable(self) -> bool:
        """Requests can be stacked only when every input and output has a dynamic batch dim."""
        return all(spec.shape and spec.shape[0] == -1 for spec in [*self.inputs, *self.outputs])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: (v.astype(self._feed_casts[k]) if k in self._feed_casts else v) for k, v in feeds.items()}
        # ONNX Runtime sessions take concurrent runs; how many run at once is the layout's choice,
        # enforced by the batcher (edgerun.layout, edgerun.batching).
        with self._count_lock:
            self.run_count += 1
        try:
            results = self.session.run(self.output_names, feeds)
        except Exception as exc:  # ORT raises its own classes for bad feeds
            raise RequestError(f"the model rejected the inputs: {str(exc).splitlines()[0][:300]}") from exc
        return {name: np.asarray(value) for name, value in zip(self.output_names, results)}


def create_model_session(
    model: VerifiedFile,
    manifest: Manifest,
    variant: ModelFile,
    providers: list[ProviderSpec],
    threads: int,
    cache_dir: Path | None = None,
) -> ModelSession:
    """Create a session from verified model bytes with the provider chain ``providers`` (first = preferred)."""
    check_self_contained(model.data, variant.path)  # nothing but the verified bytes goes into the session
    options = make_session_options(variant.session_options, threads)
    chain = provider_chain(providers, variant, model, cache_dir)
    try:
        session = _create_inference_session(model, options, chain)
    except Exception as exc:
        raise SessionError(
            f"could not create an ONNX Runtime session for '{variant.path}' with {providers[0].name}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
        ) from exc
    return ModelSession(session, manifest, variant, threads)
