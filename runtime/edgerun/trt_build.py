"""TensorRT engines built in the background while a fallback provider already serves.

Building an engine takes minutes on a Jetson. Rather than be unready all that time, the loader
makes the model ready on the next provider (CUDA, else CPU; golden-checked as usual) and hands
back a ``TensorrtBuild``. The repository runs it on a thread: create the TensorRT session from
the verified model bytes, golden-check it, and swap it in the way a hot reload does (one
reference assignment; requests in flight finish on the old session). If anything fails the
reason is logged and recorded in the model's status, and the fallback keeps serving.

There is at most one build per model: a newer load cancels the pending one and its thread
waits for the old build to end before starting (an engine build cannot be interrupted inside
ONNX Runtime, but two of them must never compete for the GPU).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgerun.bench import self_benchmark
from edgerun.bundle import Bundle
from edgerun.errors import SessionError
from edgerun.golden import GoldenData, GoldenResult, check_golden, load_golden
from edgerun.manifest import Manifest, ModelFile, ProviderSpec
from edgerun.session import ModelSession, create_model_session
from edgerun.status import TensorrtState
from edgerun.tensorrt import TENSORRT

log = logging.getLogger("edgerun")


@dataclass
class TensorrtBuild:
    """What is needed to build the TensorRT session of the variant being served."""

    bundle: Bundle
    manifest: Manifest
    variant: ModelFile
    providers: list[ProviderSpec]  # TensorRT first, then the fallbacks for nodes it cannot take
    threads: int
    cache_dir: Path
    bench: bool = False
    max_batch: int = 8
    bench_budget_s: float = 1.0
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """A newer version of the model was loaded: this build's result will not be used."""
        self.cancelled.set()


class Superseded(Exception):
    """The build was cancelled by a newer load."""


def build_tensorrt_session(build: TensorrtBuild) -> tuple[ModelSession, GoldenResult]:
    """Create and golden-check the TensorRT session; ``SessionError`` says why it cannot serve."""
    model = build.bundle.verified_file(build.variant.path)  # re-hashed now: the engine is keyed by these bytes
    session = create_model_session(
        model, build.manifest, build.variant, build.providers, build.threads, build.cache_dir
    )
    if not session.providers or session.providers[0] != TENSORRT:
        # onnxruntime retries without TensorRT (printing 'EP Error') instead of raising.
        raise SessionError(
            f"onnxruntime fell back to {','.join(session.providers) or 'no provider'}: the TensorRT "
            f"provider could not build or load an engine for '{build.variant.path}' (see the "
            f"onnxruntime messages in the log)"
        )
    if build.cancelled.is_set():
        raise Superseded()
    golden = check_golden(session, _golden_data(build))
    if not golden.passed:
        raise SessionError(
            f"golden check failed on TensorRT: {golden.reason}; check the precision flags "
            f"(trt_fp16_enable/trt_int8_enable) or serve without TensorRT (--providers cuda,cpu)"
        )
    return session, golden


def _golden_data(build: TensorrtBuild) -> GoldenData | None:
    spec = build.manifest.golden
    return load_golden(build.bundle.read_verified(spec.path), spec, build.manifest) if spec else None


def start_background_build(repo, served, previous: threading.Thread | None = None) -> threading.Thread | None:
    """Start building ``served``'s TensorRT session on a daemon thread (the process may exit mid-build).

    ``previous`` is the model's earlier build thread (already cancelled): this one waits for it.
    """
    build: TensorrtBuild | None = served.tensorrt_build
    if build is None:
        return None
    thread = threading.Thread(
        target=_run, args=(repo, served, build, previous), name=f"edgerun-tensorrt-{served.name}", daemon=True
    )
    thread.start()
    return thread


def _run(repo, served, build: TensorrtBuild, previous: threading.Thread | None) -> None:
    if previous is not None:
        previous.join()
    if build.cancelled.is_set():
        log.info("%s: TensorRT build for version %s superseded before it started", served.name, served.version)
        return
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
    except Exception as exc:  # whatever happens, the fallback keeps serving
        seconds = round(time.perf_counter() - started, 3)
        if build.cancelled.is_set():
            log.info("%s: TensorRT build for version %s superseded after %.1f s", served.name, served.version, seconds)
            return
        reason = str(exc) if isinstance(exc, SessionError) else f"unexpected {type(exc).__name__}: {exc}"
        if not isinstance(exc, SessionError):
            log.exception("%s: TensorRT build crashed", served.name)
        served.status = served.status.with_changes(tensorrt=TensorrtState("failed", reason=reason, seconds=seconds))
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
    status = served.status.with_changes(
        providers=list(session.providers), golden=golden, tensorrt=TensorrtState("ready", seconds=seconds)
    )
    if benchmark is not None:
        status = status.with_changes(benchmark={**benchmark, "fallback": served.status.benchmark})
    upgraded = dataclasses.replace(served, session=session, status=status, tensorrt_build=None)
    if not build.cancelled.is_set() and repo.replace_if_current(served, upgraded):
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
