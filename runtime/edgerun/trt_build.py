"""TensorRT engines built in the background while a fallback provider already serves.

Building an engine takes minutes on a Jetson. Rather than be unready all that time, the loader
makes the model ready on the next provider (CUDA, else CPU; golden-checked as usual) and hands
back a ``TensorrtBuild``. The repository runs it on a thread: create the TensorRT session,
golden-check it, and swap it in the way a hot reload does (one reference assignment; requests
in flight finish on the old session). If anything fails the reason is logged and recorded in
the model's ``parameters["tensorrt"]`` and the fallback keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun.bench import self_benchmark
from edgerun.errors import SessionError
from edgerun.golden import GoldenData, GoldenResult, check_golden, load_golden
from edgerun.manifest import Manifest, ModelFile, ProviderSpec
from edgerun.session import ModelSession, create_model_session
from edgerun.tensorrt import TENSORRT

log = logging.getLogger("edgerun")


@dataclass
class TensorrtBuild:
    """What is needed to build the TensorRT session of the variant being served."""

    model_path: Path
    bundle_root: Path
    manifest: Manifest
    variant: ModelFile
    providers: list[ProviderSpec]  # TensorRT first, then the fallbacks for nodes it cannot take
    threads: int
    cache_dir: Path
    bench: bool = False
    max_batch: int = 8
    bench_budget_s: float = 1.0


def build_tensorrt_session(build: TensorrtBuild) -> tuple[ModelSession, GoldenResult]:
    """Create and golden-check the TensorRT session; ``SessionError`` says why it cannot serve."""
    session = create_model_session(
        build.model_path, build.manifest, build.variant, build.providers, build.threads, build.cache_dir
    )
    if not session.providers or session.providers[0] != TENSORRT:
        # onnxruntime retries without TensorRT (printing 'EP Error') instead of raising.
        raise SessionError(
            f"onnxruntime fell back to {','.join(session.providers) or 'no provider'}: the TensorRT "
            f"provider could not build or load an engine for '{build.variant.path}' (see the "
            f"onnxruntime messages in the log)"
        )
    golden = check_golden(session, _golden_data(build))
    if not golden.passed:
        raise SessionError(
            f"golden check failed on TensorRT: {golden.reason}; check the precision flags "
            f"(trt_fp16_enable/trt_int8_enable) or serve without TensorRT (--providers cuda,cpu)"
        )
    return session, golden


def _golden_data(build: TensorrtBuild) -> GoldenData | None:
    spec = build.manifest.golden
    return load_golden((build.bundle_root / spec.path).read_bytes(), spec, build.manifest) if spec else None


def tensorrt_state(state: str, **extra: Any) -> dict[str, Any]:
    return {"state": state, **{k: v for k, v in extra.items() if v is not None}}


def start_background_build(repo, served) -> threading.Thread | None:
    """Start building ``served``'s TensorRT session on a daemon thread (the process may exit mid-build)."""
    build: TensorrtBuild | None = served.tensorrt_build
    if build is None:
        return None
    thread = threading.Thread(
        target=_run, args=(repo, served, build), name=f"edgerun-tensorrt-{served.name}", daemon=True
    )
    thread.start()
    return thread


def _run(repo, served, build: TensorrtBuild) -> None:
    started = time.perf_counter()
    log.info(
        "%s: building the TensorRT session for %s in the background; serving on %s meanwhile",
        served.name,
        build.variant.path,
        ",".join(served.session.providers),
    )
    try:
        session, golden = build_tensorrt_session(build)
        benchmark = None
        if build.bench:
            golden_data = _golden_data(build)
            golden_inputs = golden_data.inputs if golden_data else None
            benchmark = self_benchmark(session, build.max_batch, golden_inputs, budget_s=build.bench_budget_s)
    except Exception as exc:  # noqa: BLE001 - whatever happens, the fallback keeps serving
        seconds = round(time.perf_counter() - started, 3)
        reason = str(exc) if isinstance(exc, SessionError) else f"unexpected {type(exc).__name__}: {exc}"
        if not isinstance(exc, SessionError):
            log.exception("%s: TensorRT build crashed", served.name)
        served.parameters = {**served.parameters, "tensorrt": tensorrt_state("failed", reason=reason, seconds=seconds)}
        if repo.models.get(served.name) is served:
            repo.describe(served)
        log.error(
            "%s: TensorRT not used after %.1f s, still serving on %s: %s",
            served.name,
            seconds,
            ",".join(served.session.providers),
            reason,
        )
        return
    seconds = round(time.perf_counter() - started, 3)
    parameters = {
        **served.parameters,
        "providers": session.providers,
        "golden": golden.as_dict(),
        "tensorrt": tensorrt_state("ready", seconds=seconds),
    }
    if benchmark is not None:
        parameters["benchmark"] = {**benchmark, "fallback": served.parameters.get("benchmark")}
    upgraded = dataclasses.replace(served, session=session, parameters=parameters, tensorrt_build=None)
    if repo.replace_if_current(served, upgraded):
        log.info(
            "%s: TensorRT ready after %.1f s, now serving on %s (%s)",
            served.name,
            seconds,
            ",".join(session.providers),
            golden.reason,
        )
    else:
        log.info(
            "%s: TensorRT session built after %.1f s but version %s was replaced meanwhile; discarded",
            served.name,
            seconds,
            served.version,
        )
