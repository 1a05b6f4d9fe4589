"""From a bundle on disk to a session that is safe to serve.

verify bundle -> for each variant (selected model first) and provider chain: create the
session, run the golden check, drop it with a logged reason if it fails -> benchmark the
survivors (when asked) and keep the fastest. Nothing is served that did not pass here.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerun.bench import Timer, cpu_model, decision_key, find_decisions, read_decision, self_benchmark, write_decision
from edgerun.bundle import Bundle, open_bundle
from edgerun.errors import BundleError, EdgerunError, SessionError
from edgerun.golden import GoldenData, check_golden, describe_thresholds, load_golden, thresholds_for
from edgerun.isa import cpu_isa
from edgerun.layout import LayoutRequest, cached_layout, plan_layout
from edgerun.manifest import ModelFile
from edgerun.memory import release_free_memory
from edgerun.prefetch import BundlePrefetch
from edgerun.provider_options import check_manifest
from edgerun.serve_options import DEFAULTS
from edgerun.session import CPU, ModelSession, create_model_session, provider_candidates
from edgerun.startup import phase
from edgerun.status import ModelStatus, TensorrtState
from edgerun.tensorrt import TENSORRT
from edgerun.threads import choose_threads
from edgerun.trt_build import TensorrtBuild

log = logging.getLogger("edgerun")

DEFAULT_CACHE_DIR = Path(DEFAULTS.cache_dir)


@dataclass
class LoadOptions:
    providers: list[str] | None = None
    threads: int | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    bench: bool = True
    max_batch: int = 8
    trusted_key: bytes | None = None
    bench_budget_s: float = 1.0
    # Serve from the next provider while the TensorRT engine builds, then swap it in (only a
    # ModelRepository runs the build; plain load_model callers get a CUDA/CPU session).
    trt_background: bool = False
    # Execution layout (see edgerun.layout): None = chosen by the self-benchmark.
    instances: int | None = None
    runs: int | None = None
    optimize: str = DEFAULTS.optimize
    fixed_batch: int | None = None  # --max-batch given explicitly: every layout stacks this many rows
    batch_delay_ms: float = DEFAULTS.max_delay_ms  # the server's batching window, added to a batched layout's latency
    # What times each variant in the self-benchmark (None: edgerun.bench.measure; tests inject a fake clock).
    variant_timer: Timer | None = None
    # Measure the served variant again even when this device cached its numbers (``edgerun bench``); a
    # server restarting on the same device, bundle, providers and threads reuses them instead.
    remeasure: bool = False
    # Called (and waited for) before anything is timed: ``edgerun serve`` loads while its main thread
    # imports the web stack, which would skew the self-benchmark and the layout measurement.
    before_timing: Callable[[], object] | None = None


@dataclass
class ServedModel:
    """A loaded, checked model: what the server routes requests to."""

    name: str
    version: str
    bundle: Bundle
    session: ModelSession
    source: Path
    status: ModelStatus
    labels: list[str] | None = None
    # Pending background TensorRT build, started by the repository once this model serves.
    tensorrt_build: TensorrtBuild | None = field(default=None, repr=False)

    @property
    def manifest(self):
        return self.bundle.manifest

    @property
    def target(self) -> str:
        """The target the bundle was built for (kept versions are recorded per name and target)."""
        name = self.manifest.target.get("name") if isinstance(self.manifest.target, dict) else None
        return str(name) if name else "any"

    @property
    def parameters(self) -> dict[str, Any]:
        """The status as JSON, as model metadata shows it."""
        return self.status.to_json()

    def close(self) -> None:
        """Release what the model holds on disk (an archive's extracted copy); sessions live in memory."""
        if self.tensorrt_build is not None:
            self.tensorrt_build.cancel()
        self.bundle.close()


def parse_labels(data: bytes, relpath: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"labels file '{relpath}' is not UTF-8 text; one label per line expected") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _allowed(variant: ModelFile, candidates):
    return [p for p in candidates if not variant.providers or p.name in variant.providers]


def _try_variant(
    bundle: Bundle,
    variant: ModelFile,
    candidates,
    threads: int,
    dropped: list[str],
    cache_dir: Path,
    golden_data: GoldenData | None = None,
):
    allowed = _allowed(variant, candidates)
    if not allowed:
        dropped.append(f"{variant.path}: none of its providers {variant.providers} is available")
        return None
    model = bundle.verified_file(variant.path)
    for i, provider in enumerate(allowed):
        try:
            with phase("session"):
                session = create_model_session(model, bundle.manifest, variant, allowed[i:], threads, cache_dir)
        except SessionError as exc:
            reason = f"{variant.path} on {provider.name}: {exc}"
            log.warning("dropped %s; trying the next provider", reason)
            dropped.append(reason)
            continue
        with phase("golden"):
            golden = check_golden(session, golden_data)
        if not golden.passed:
            reason = f"{variant.path} on {session.providers[0]}: golden check failed: {golden.reason}"
            log.warning("dropped %s", reason)
            dropped.append(reason)
            continue
        log.info("%s on %s: %s", variant.path, ",".join(session.providers), golden.reason)
        return session, golden
    return None


def load_model(
    location: str | Path, options: LoadOptions | None = None, prefetched: BundlePrefetch | None = None
) -> ServedModel:
    """Open, verify, golden-check and (optionally) benchmark a bundle; return what to serve.

    An archive's extracted copy belongs to the returned model (``ServedModel.close``); when the
    load fails it is removed here. ``prefetched``: the directory's files read and hashed ahead.
    """
    options = options or LoadOptions()
    with phase("verify"):
        bundle = open_bundle(location, trusted_public_key=options.trusted_key, prefetched=prefetched)
    try:
        served = _load_verified(bundle, Path(location), options)
    except BaseException:
        bundle.close()
        raise
    # The sessions made for the self-benchmark and not served are garbage now (some in reference
    # cycles): collected and trimmed, they leave nothing resident (measured on mobilenet_v2: 149 ->
    # 120 MB). When nothing was measured (no self-benchmark, or a restart that found every number
    # cached) there is little to collect, and the full collection (35-90 ms, holding the GIL the main
    # thread's imports need) is skipped.
    if _measured(served.status):
        gc.collect()
    release_free_memory()
    return served


def _load_verified(bundle: Bundle, location: Path, options: LoadOptions) -> ServedModel:
    started = time.perf_counter()
    cache_dir = Path(options.cache_dir).expanduser()
    manifest = bundle.manifest
    check_manifest(manifest)  # a bundle is data: no provider option or session entry that is code
    bundle_id = bundle.sha256
    thread_choice = choose_threads(options.threads)
    candidates = provider_candidates(manifest, options.providers, cache_dir, bundle_id)
    golden_data = None
    if manifest.golden is None:
        log.info("%s: bundle has no golden data; parity check skipped", manifest.name)
    else:
        with phase("golden"):
            golden_data = load_golden(bundle.read_verified(manifest.golden.path), manifest.golden, manifest)
    golden_inputs = golden_data.inputs if golden_data else None

    variants = manifest.all_models()
    isa = cpu_isa()
    key = decision_key(bundle_id, [p.name for p in candidates], threads=thread_choice.threads, isa=isa)
    decision = read_decision(cache_dir, key) if options.bench else None
    recorded = _recorded_numbers(decision)  # each variant's self-benchmark numbers an earlier start cached
    if decision and len(variants) > 1:
        decided = [v for v in variants if v.path == decision.get("variant")]
        if decided:
            log.info("using cached variant decision %s (%s)", decision["variant"], key)
            variants = decided + [v for v in variants if v.path != decision["variant"]]

    dropped: list[str] = []
    passing: list[tuple[ModelSession, Any]] = []
    # Background mode: become ready without TensorRT first (an engine build takes minutes).
    background = options.trt_background and candidates[0].name == TENSORRT and len(candidates) > 1
    # CPU/CUDA timings do not predict TensorRT's, so while its engine is pending keep the
    # builder's variant order (its precision preference for the target) instead of racing them.
    compare_all = options.bench and not decision and not background
    layout_budget = (thread_choice if options.threads is None else choose_threads()).threads
    layout_request = LayoutRequest(
        options.instances, options.threads, None, options.fixed_batch, options.optimize, options.runs
    )
    for chain in [candidates[1:], candidates] if background else [candidates]:
        for variant in variants:
            threads = thread_choice.threads
            if not options.bench or (not options.remeasure and variant.path in recorded):
                # Nothing measures this session: made in the cached layout's setting, it serves as is.
                planned = _cached_cpu_threads(variant, chain, bundle_id, layout_budget, layout_request, cache_dir)
                threads = planned or thread_choice.threads
            found = _try_variant(bundle, variant, chain, threads, dropped, cache_dir, golden_data)
            if found:
                passing.append(found)
                if not compare_all:
                    break
        if passing:
            break
        background = False  # nothing runs without TensorRT: build it now, before serving
    if not passing:
        raise SessionError(f"{manifest.name}: no variant/provider passed its checks: " + "; ".join(dropped))

    benchmark: dict[str, Any] = {}
    reused = None if options.remeasure else _cached_numbers(recorded, passing[0][0].variant.path)
    if options.bench and reused is not None:
        # Measured on an earlier start of this device: the same bundle, providers, threads and ISA.
        log.info("%s: cached self-benchmark numbers for %s (%s)", manifest.name, passing[0][0].variant.path, key)
        benchmark = reused
        passing = passing[:1]
    elif options.bench:
        _before_timing(options)
        results = []
        for session, _ in passing:
            # With one variant there is nothing to compare: a quarter of the time, for the numbers
            # alone (the layout step measures this session again, in every layout).
            budget_s = options.bench_budget_s if len(passing) > 1 else options.bench_budget_s / 4
            with phase("bench"):
                numbers = self_benchmark(
                    session, options.max_batch, golden_inputs, budget_s=budget_s, timer=options.variant_timer
                )
            log.info("benchmark %s on %s: %s", session.variant.path, session.providers[0], numbers)
            results.append(numbers)
        best = min(range(len(passing)), key=lambda i: results[i]["batch_1"]["p50_ms"])
        benchmark = results[best]
        if len(passing) > 1:
            benchmark["variants"] = {passing[i][0].variant.path: results[i]["batch_1"] for i in range(len(passing))}
        if len(passing) > 1 or len(variants) == 1 or decision:
            # The choice (when variants were compared) and each variant's numbers, so a restart on this
            # device has nothing to measure again. A multi-variant bundle with no decision and one
            # passing variant records nothing: the others are tried again at the next start.
            measured = {passing[i][0].variant.path: results[i] for i in range(len(passing))}
            numbers = {**recorded, **measured}
            write_decision(
                cache_dir,
                key,
                {
                    "variant": passing[best][0].variant.path,
                    "precision": passing[best][0].variant.precision,
                    "benchmark": results,
                    # What the decision was taken for, so `edgerun info` can show it without a provider list.
                    "bundle": bundle_id,
                    "cpu": cpu_model(),
                    "isa": isa,
                    "providers": [p.name for p in candidates],
                    "threads": thread_choice.threads,
                    "p50_ms": {v: n["batch_1"]["p50_ms"] for v, n in numbers.items()},
                    "numbers": numbers,
                },
            )
        passing = [passing[best]]
    elif decision:
        benchmark = {"cached": decision.get("benchmark")}
    if benchmark:
        benchmark["isa"] = isa  # the timings above hold for this ISA only
    session, golden = passing[0]
    if not options.bench and golden_data is None:  # the golden check's runs warmed it otherwise
        with phase("layout"):
            session.run(_warm_feeds(session, golden_inputs))  # first run allocates; do it before traffic

    build = None
    tensorrt: TensorrtState | None = None
    allowed = _allowed(session.variant, candidates)
    if background and allowed and allowed[0].name == TENSORRT:
        build = TensorrtBuild(
            bundle=bundle,
            manifest=manifest,
            variant=session.variant,
            providers=allowed,
            threads=thread_choice.threads,
            cache_dir=cache_dir,
            bench=options.bench,
            max_batch=options.max_batch,
            bench_budget_s=options.bench_budget_s,
        )
        tensorrt = TensorrtState("building", variant=session.variant.path)
    elif candidates[0].name == TENSORRT:
        if session.providers[:1] == [TENSORRT]:
            tensorrt = TensorrtState("ready")
        else:
            reason = next(
                (d for d in dropped if TENSORRT in d),
                f"onnxruntime runs {session.variant.path} on {','.join(session.providers)}",
            )
            tensorrt = TensorrtState("failed", reason=reason)

    # Execution layout: instances x threads, runs at once, spinning, batching (measured, cached or fixed).
    with phase("layout"):
        session, layout = plan_layout(
            session,
            bundle=bundle,
            providers=[p for p in allowed if p.name in session.providers] or allowed,
            budget=layout_budget,
            request=layout_request,
            bench=options.bench and build is None,  # a pending TensorRT engine replaces this session anyway
            cache_dir=cache_dir,
            bundle_id=bundle_id,
            golden_inputs=golden_inputs,
            bench_batch=options.max_batch,
            budget_s=min(0.25, options.bench_budget_s / 4),
            batch_delay_ms=options.batch_delay_ms,
            batch_gain=_batch_gain(benchmark, options.max_batch),
            check=lambda candidate: check_golden(candidate, golden_data),
            # The variant benchmark's batches grew this session's memory arena (cached numbers: it did not run).
            fresh=options.bench and reused is None,
            before_timing=options.before_timing,
        )

    status = ModelStatus(
        variant=session.variant.path,
        precision=session.variant.precision,
        providers=list(session.providers),
        threads=layout.layout.threads,
        threads_source=thread_choice.source,
        golden=golden,
        load_seconds=round(time.perf_counter() - started, 3),
        benchmark=benchmark or None,
        dropped=dropped,
        tensorrt=tensorrt,
        serving=manifest.serving,
        layout=layout,
    )
    log.info(
        "%s ready: variant %s, providers %s, layout %s (thread budget %d: %s)",
        manifest.name,
        session.variant.path,
        ",".join(session.providers),
        layout.layout.label,
        layout.thread_budget,
        thread_choice.source,
    )
    labels = parse_labels(bundle.read_verified(manifest.labels), manifest.labels) if manifest.labels else None
    if build is None:  # only a pending TensorRT build reads the golden data again: no need to hold its bytes
        bundle.forget_cached()
    return ServedModel(
        name=manifest.name,
        version=bundle_id[:12],
        bundle=bundle,
        session=session,
        source=location,
        status=status,
        labels=labels,
        tensorrt_build=build,
    )


def _cached_cpu_threads(
    variant: ModelFile, chain, bundle_id: str, budget: int, request: LayoutRequest, cache_dir: Path
) -> int | None:
    """The intra-op threads of the layout this device's cached measurements choose for ``variant`` on
    the CPU, or None (not a CPU-only variant, or nothing cached). The self-benchmark's numbers are
    keyed by the thread budget, so only a session nothing will measure is made this way."""
    names = [p.name for p in _allowed(variant, chain)]
    if names != [CPU]:
        return None  # an accelerator keeps one instance with every thread
    planned = cached_layout(
        bundle_id=bundle_id, providers=names, budget=budget, variant=variant, request=request, cache_dir=cache_dir
    )
    return planned.threads if planned is not None else None


def _measured(status: ModelStatus) -> bool:
    """Whether this load timed anything (and so made sessions it does not serve)."""
    numbers = status.benchmark or {}
    variants_timed = "batch_1" in numbers and not numbers.get("cached")
    return variants_timed or (status.layout is not None and status.layout.source.startswith("self-benchmark"))


def _before_timing(options: LoadOptions) -> None:
    if options.before_timing is not None:
        options.before_timing()


def _recorded_numbers(decision: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each variant's self-benchmark numbers in a cached decision; entries of another shape (a cache file
    from another version, or damaged) are left out, so they are measured again."""
    numbers = (decision or {}).get("numbers")
    if not isinstance(numbers, dict):
        return {}
    return {
        path: n
        for path, n in numbers.items()
        if isinstance(n, dict)
        and isinstance(n.get("batch_1"), dict)
        and isinstance(n["batch_1"].get("p50_ms"), int | float)
    }


def _cached_numbers(numbers: dict[str, dict[str, Any]], variant: str) -> dict[str, Any] | None:
    """The self-benchmark numbers an earlier start measured for ``variant`` (``numbers``: from
    ``_recorded_numbers``), shaped as a fresh measurement and marked ``cached``; None when there are none."""
    if variant not in numbers:
        return None
    reused: dict[str, Any] = {**numbers[variant], "cached": True}
    if len(numbers) > 1:
        reused["variants"] = {path: n["batch_1"] for path, n in numbers.items()}
    return reused


def _batch_gain(benchmark: dict[str, Any], max_batch: int) -> float | None:
    """Rows/s at ``max_batch`` over rows/s at batch 1 in the variant benchmark, when both were measured."""
    one, many = benchmark.get("batch_1"), benchmark.get(f"batch_{max_batch}")
    if not one or not many or not one.get("throughput_per_s"):
        return None
    return float(many["throughput_per_s"]) / float(one["throughput_per_s"])


def _warm_feeds(session: ModelSession, golden_inputs):
    from edgerun.bench import example_feeds

    return example_feeds(session, 1, golden_inputs)


def describe_bundle(
    location: str | Path, trusted_key: bytes | None = None, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Manifest summary for ``edgerun info`` / ``verify`` (verifies checksums on the way), with this
    device's ISA and the variant its self-benchmark chose here (when ``cache_dir`` holds one)."""
    bundle = open_bundle(location, trusted_public_key=trusted_key)
    bundle.close()  # everything below comes from the manifest already read
    m = bundle.manifest
    return {
        "name": m.name,
        "format_version": m.format_version,
        "created": m.created,
        "sha256": bundle.sha256,
        "model": {
            "path": m.model.path,
            "precision": m.model.precision,
            "opset": m.model.opset,
            "size_bytes": m.model.size_bytes,
        },
        "variants": [{"path": v.path, "precision": v.precision} for v in m.variants],
        "host_isa": (m.benchmark.get("host") or {}).get("isa"),
        "device": _device_choice(bundle.sha256, cache_dir),
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in m.inputs],
        "outputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in m.outputs],
        "providers": [p.name for p in m.providers],
        "task": m.task_name(),
        "postprocess": m.postprocess,
        "golden": m.golden.model_dump() if m.golden else None,
        # What the selected model is held to on the device (box tolerances for a detector).
        "golden_check": describe_thresholds(thresholds_for(m.golden, m.model.path)) if m.golden else None,
        "signed": bool(m.signature),
        "files": len(m.files),
    }


def _device_choice(bundle_sha256: str, cache_dir: Path | None) -> dict[str, Any]:
    """This device's CPU and ISA, and the variant decisions cached here for this bundle on this ISA."""
    isa = cpu_isa()
    decisions = find_decisions(cache_dir, bundle_sha256) if cache_dir is not None else []
    here = [d for d in decisions if sorted(d.get("isa") or []) == isa]
    return {
        "cpu": cpu_model(),
        "isa": isa,
        "choices": [
            {
                "variant": d["variant"],
                "precision": d.get("precision"),
                "providers": d.get("providers"),
                "threads": d.get("threads"),
                "p50_ms": d.get("p50_ms") or {},
            }
            for d in here
        ],
    }


__all__ = ["LoadOptions", "ServedModel", "load_model", "describe_bundle", "EdgerunError"]
