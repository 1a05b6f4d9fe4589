"""Candidate variants of one exported model, measured side by side, and the choice among them.

``--quantize auto`` builds every candidate that makes sense for the target and the model,
validates each on real data, times each on this host, and keeps the fastest one within the
accuracy budget. FP32 is always a candidate, so ``auto`` never fails the budget.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.benchmark import session_latency
from edgebuild.data import Batch, DataSource
from edgebuild.onnx_utils import make_session, op_counts
from edgebuild.passes import partial
from edgebuild.passes import quantize as q
from edgebuild.quiet import Captured, captured_library_output
from edgebuild.targets import TargetProfile
from edgebuild.validate import evaluate, output_names, run_session, within_budget

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    name: str  # file stem and table row, e.g. "int8-qdq-u8s8"
    precision: str  # manifest precision: fp32 | fp16 | int8 | int8-dynamic | mixed
    path: Path | None = None
    metrics: dict = field(default_factory=dict)  # what the pass recorded (settings, coverage)
    validation: dict | None = None
    latency: dict | None = None
    error: str | None = None
    within_budget: bool = False
    size_bytes: int = 0  # recorded once built: the file lives in a temporary work dir

    def __post_init__(self) -> None:
        self.refresh_size()

    def refresh_size(self) -> None:
        if self.path is not None and self.path.exists():
            self.size_bytes = self.path.stat().st_size

    @property
    def recipe(self) -> str:
        return self.metrics.get("recipe", self.name)

    @property
    def usable(self) -> bool:
        return self.error is None and self.path is not None

    @property
    def file(self) -> Path:
        """The built ONNX file (only asked of usable candidates)."""
        if self.path is None:
            raise ValueError(f"candidate {self.name} has no file ({self.error})")
        return self.path

    @property
    def p50(self) -> float:
        """Host p50 latency in ms (only asked of measured candidates)."""
        if self.latency is None:
            raise ValueError(f"candidate {self.name} was not timed")
        return float(self.latency["p50_ms"])

    def row(self) -> dict:
        """One line of the candidate table (manifest and report)."""
        row = {
            "name": self.name,
            "precision": self.precision,
            "recipe": self.recipe,
            "size_bytes": self.size_bytes,
            "within_budget": self.within_budget,
        }
        if self.latency:
            row["p50_ms"] = self.latency["p50_ms"]
        if self.validation:
            for key in ("metric", "packed", "drop", "agreement", "cosine_min", "max_abs", "worst_output"):
                if key in self.validation:
                    row[key] = self.validation[key]
            for key in ("map50_95", "map50", "box_agreement", "refused"):  # detection
                if key in self.validation:
                    row[key] = self.validation[key]
            if "scores" in self.validation:
                row["distinct_scores"] = self.validation["scores"]["distinct"]
        if "coverage" in self.metrics:
            row["quantized_fraction"] = self.metrics["coverage"]["fraction"]
        if "weights" in self.metrics:  # static INT8: int8 weights shipped vs float weights behind Q/DQ
            row["weights"] = self.metrics["weights"]
        if self.error:
            row["error"] = self.error
        return row


@dataclass
class CandidatePlan:
    """How to build one candidate: a name, a precision and a build function (src, dst) -> metrics."""

    name: str
    precision: str
    build: Callable[[Path, Path], dict]


def apply_budget(candidates: list[Candidate], max_drop: float) -> None:
    for candidate in candidates:
        candidate.within_budget = candidate.usable and within_budget(candidate.validation, max_drop)


# Two sessions of the same file measured up to ±5% apart in interleaved rounds on this class of host.
LATENCY_TIE = 0.05


def select(
    candidates: list[Candidate], optimize_for: str = "latency", prefer: list[str] | None = None
) -> Candidate | None:
    """The fastest (or smallest) usable candidate within budget.

    ``prefer`` (GPU targets) ranks by precision order instead of host latency: the host's CPU
    timings do not predict TensorRT's.
    """
    eligible = [c for c in candidates if c.within_budget and c.latency is not None]
    if not eligible:
        return None
    if prefer:
        rank = {p: i for i, p in enumerate(prefer)}
        return min(eligible, key=lambda c: (rank.get(c.precision, len(rank)), c.p50))
    if optimize_for == "size":
        return min(eligible, key=lambda c: (c.size_bytes, c.p50))
    fastest = min(c.p50 for c in eligible)
    # Within the timing noise of a shared host, candidates tie on speed; the smaller file wins.
    tied = [c for c in eligible if c.p50 <= fastest * (1 + LATENCY_TIE)]
    return min(tied, key=lambda c: (c.size_bytes, c.p50))


@dataclass(frozen=True)
class SearchConfig:
    """What the candidate search runs with (pack fills it from its options; names as the options')."""

    quantize: str = "auto"  # one of passes.quantize.QUANTIZE_MODES
    calib_method: str | None = None  # None: the target's preset (and, when MinMax misses, the fallbacks)
    per_channel: bool | None = None  # None: the target's preset
    int8_search: str = "quick"  # passes.quantize.INT8_SEARCH
    partial_quantization: bool = True
    bench_seconds: float = 1.0
    max_accuracy_drop: float = 0.01
    float_head: bool = False  # detectors: the head tail stays float in static INT8


def static_variants(options: SearchConfig, target: TargetProfile) -> list[q.StaticInt8Config]:
    """Static INT8 recipes to measure: the target preset first, then (auto on CPUs) the variants that
    change speed and accuracy per model and CPU, so only a measurement decides (measured on this kind of CPU)."""
    preset = q.StaticInt8Config.from_profile(
        target.quantization,
        extra_options=dict(target.notes.get("quantize_extra_options", {})),
        float_head=options.float_head,
    )
    overrides: dict[str, Any] = {}
    if options.calib_method:
        overrides["calibration_method"] = options.calib_method
    if options.per_channel is not None:
        overrides["per_channel"] = options.per_channel
    base = replace(preset, **overrides)
    variants = [base]
    if options.quantize == "auto" and target.device == "cpu":
        formats = [base.format, "qoperator" if base.format == "qdq" else "qdq"]
        per_channel = (
            [base.per_channel, not base.per_channel]
            if options.int8_search == "full" and options.per_channel is None
            else [base.per_channel]
        )
        methods = [base.calibration_method] + (
            [m for m in q.CALIB_METHODS if m != base.calibration_method]
            if options.int8_search == "full" and not options.calib_method
            else []
        )
        variants = [
            replace(base, format=f, reduce_range=r, per_channel=pc, calibration_method=m)
            for m in methods
            for pc in per_channel
            for f in formats
            for r in (base.reduce_range, not base.reduce_range)
        ]
    unique: dict[str, q.StaticInt8Config] = {}
    for config in variants:
        unique.setdefault(config.describe(), config)
    return list(unique.values())


def matmul_heavy(path: Path) -> bool:
    """MatMul/Gemm/RNN ops outnumber convolutions: where dynamic INT8 can pay off (it is slow for convs)."""
    counts = op_counts(path)
    dense = sum(counts[op] for op in ("MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention"))
    return dense > 0 and dense > counts["Conv"] + counts["ConvTranspose"]


def plan_candidates(
    options: SearchConfig, target: TargetProfile, calibration: DataSource | None, fp32_path: Path | None = None
) -> list[CandidatePlan]:
    """Which candidates to build besides FP32."""
    plans: list[CandidatePlan] = []

    def static(config: q.StaticInt8Config, data: DataSource) -> CandidatePlan:
        suffix = config.describe().lower().replace(" ", "-")
        return CandidatePlan(f"int8-{suffix}", "int8", lambda src, dst: q.quantize_static_int8(src, dst, data, config))

    mode = options.quantize
    if mode in ("int8", "auto") and "int8" in target.precisions and calibration is not None:
        plans.extend(static(config, calibration) for config in static_variants(options, target))
    dynamic_wanted = mode == "int8-dynamic" or (
        mode == "auto" and "int8-dynamic" in target.precisions and fp32_path is not None and matmul_heavy(fp32_path)
    )
    if dynamic_wanted:
        per_channel = True if options.per_channel is None else options.per_channel
        name = "int8-dynamic" if per_channel else "int8-dynamic-per-tensor"
        config = q.DynamicInt8Config(per_channel=per_channel)
        plans.append(CandidatePlan(name, "int8-dynamic", lambda src, dst: q.quantize_dynamic_int8(src, dst, config)))
    if (mode == "fp16") or (mode == "auto" and "fp16" in target.precisions):
        plans.append(CandidatePlan("fp16", "fp16", q.convert_fp16))
    return plans


def build_candidate(
    plan: CandidatePlan, src: Path, workdir: Path, progress: Callable[[str], None] | None = None
) -> Candidate:
    path = workdir / f"{plan.name}.onnx"
    candidate = Candidate(plan.name, plan.precision, path)
    with captured_library_output() as said:
        try:
            candidate.metrics = plan.build(src, path)
        except Exception as exc:  # noqa: BLE001 - a failed candidate is recorded, not fatal
            candidate.error = str(exc)
            log.warning("candidate %s failed: %s", plan.name, exc)
    _record_library_output(candidate, said, progress)
    candidate.refresh_size()
    coverage = candidate.metrics.get("coverage")
    # Static and dynamic INT8 alike: ORT's tools "succeed" without quantizing weights inside If/Loop bodies.
    if coverage and candidate.precision.startswith("int8") and coverage["quantized_compute_ops"] == 0:
        candidate.error = (
            "quantized 0 compute ops (weights inside If/Loop subgraphs are not quantized); not an INT8 model"
        )
    elif coverage and candidate.precision.startswith("int8") and coverage["fraction"] < 1.0:
        candidate.precision = "mixed"
    return candidate


def _record_library_output(candidate: Candidate, said: Captured, progress: Callable[[str], None] | None) -> None:
    summary = said.summary()
    if summary is None:
        return
    candidate.metrics["library_messages"] = summary
    line = said.line(f"quantize: {candidate.name}")
    if progress is not None and line:
        progress(line)


def int8_skipped(options: SearchConfig, target: TargetProfile, calibration: DataSource | None) -> str | None:
    """One line when ``auto`` builds no static INT8 although the target allows it, with the flag to add."""
    if options.quantize != "auto" or "int8" not in target.precisions or calibration is not None:
        return None
    return (
        "static INT8 skipped: it needs calibration data; add --calib-data DATA (an image folder, .npz or "
        "module:callable of real samples) to measure static INT8 variants too"
    )


def choice_reason(
    chosen: Candidate, fp32: Candidate, prefer: list[str] | None, optimize_for: str, forced: str | None = None
) -> str:
    """Why ``chosen`` was kept, in one clause (for progress and the report).

    ``forced`` is the precision ``--quantize`` forced (not ``auto``): the choice is then among that
    precision's variants only, and a variant slower than FP32 on this host is said to be so.
    """
    host = (
        f"host p50 {chosen.latency['p50_ms']:.3f} ms vs fp32 {fp32.latency['p50_ms']:.3f} ms"
        if chosen.latency and fp32.latency
        else ""
    )
    if forced and forced != "none" and not prefer:
        reason = f"fastest in-budget variant of the precision --quantize {forced} forces ({host})"
        if chosen.latency and fp32.latency and chosen.p50 > fp32.p50 * (1 + LATENCY_TIE):
            reason += (
                f"; WARNING: {fp32.p50 / chosen.p50:.2f}x the speed of FP32, SLOWER on this host: "
                "--quantize auto keeps the fastest precision within the budget"
            )
        return reason
    if prefer:
        order = " > ".join(prefer)
        return (
            f"kept by the target's precision order ({order}) among in-budget variants: TensorRT decides on the "
            f"device; host CPU timings do not rank GPU variants ({host}); the device times every shipped variant"
        )
    if optimize_for == "size":
        return f"smallest in-budget variant ({chosen.size_bytes / 1024:.1f} KiB; {host})"
    return f"fastest in-budget variant on this host ({host}; ties within {LATENCY_TIE:.0%} go to the smaller file)"


def measure_candidate(
    candidate: Candidate,
    target: TargetProfile,
    ref: list[np.ndarray],
    val: Batch,
    metric,
    feed1,
    seconds: float,
    validation: dict | None = None,
) -> None:
    """Validate (unless ``validation`` already holds this file's result on ``val``) and time a candidate."""
    if not candidate.usable:
        return
    session = make_session(candidate.file, target.session.graph_optimization_level, config=target.session.config)
    if validation is None:
        validation = evaluate(metric, ref, run_session(session, val.inputs), val.labels, output_names(session))
    candidate.validation = validation
    candidate.latency = session_latency(session, feed1, max_seconds=seconds)


def time_interleaved(
    candidates: list[Candidate], target: TargetProfile, feed1, seconds: float, rounds: int = 8
) -> None:
    """Re-time the candidates in alternating rounds and keep the median of the round medians.

    One candidate timed after another lets drift on a shared host decide the choice (measured:
    an INT8 variant picked while slower than FP32 for mobilenet_v3_small); alternating rounds
    expose every candidate to the same drift.
    """
    timed = [c for c in candidates if c.usable and c.latency]
    if len(timed) < 2:
        return
    sessions = {
        id(c): make_session(c.file, target.session.graph_optimization_level, config=target.session.config)
        for c in timed
    }
    rounds_p50 = {id(c): [c.p50] for c in timed}
    runs = {id(c): (c.latency or {})["runs"] for c in timed}
    for _ in range(rounds - 1):
        for c in timed:
            result = session_latency(sessions[id(c)], feed1, max_seconds=seconds / rounds, warmup=2, min_runs=5)
            rounds_p50[id(c)].append(result["p50_ms"])
            runs[id(c)] += result["runs"]
    for c in timed:
        c.latency = {
            **(c.latency or {}),
            "p50_ms": round(float(np.median(rounds_p50[id(c)])), 4),
            "runs": runs[id(c)],
            "rounds": rounds,
        }


def _static_build(src: Path, dst: Path, *, data: DataSource, config: q.StaticInt8Config) -> dict:
    return q.quantize_static_int8(src, dst, data, config)


# Tried, in this order, when every MinMax static INT8 candidate misses the budget: on detectors they
# moved mAP50 from 0.71 to 0.81 (a layout detector) and mAP50-95 from 0.95 to 0.96 (YOLOX) over MinMax.
FALLBACK_METHODS = ("percentile", "entropy")


def calibration_fallbacks(
    options: SearchConfig, target, candidates, calibration, fp32_path, workdir, ref, val, metric, feed1, progress
) -> list[Candidate]:
    """Percentile and entropy calibration of the best MinMax static candidate, when no MinMax one is in budget
    (and no calibration method was asked for). Each collects a few samples per call (bounded memory)."""
    if options.calib_method or calibration is None or calibration.is_random:
        return []
    static = [c for c in candidates if c.usable and c.validation and c.metrics.get("settings", {}).get("format")]
    minmax = [c for c in static if c.metrics["settings"].get("calibration_method") == "minmax"]
    if not minmax or any(c.within_budget for c in static):
        return []
    best = min(minmax, key=lambda c: c.validation["drop"])
    settings = {k: v for k, v in best.metrics["settings"].items()}
    progress(
        f"every MinMax INT8 candidate breaks the budget (best {best.name}: drop {best.validation['drop']:.4f}); "
        f"trying {' and '.join(FALLBACK_METHODS)} calibration ..."
    )
    built = []
    for method in FALLBACK_METHODS:
        config = q.StaticInt8Config(**{**settings, "calibration_method": method})
        name = f"int8-{config.describe().lower().replace(' ', '-')}"
        plan = CandidatePlan(name, "int8", functools.partial(_static_build, data=calibration, config=config))
        candidate = build_candidate(plan, fp32_path, workdir, progress)
        measure_candidate(candidate, target, ref, val, metric, feed1, options.bench_seconds)
        built.append(candidate)
    return built


def _is_dynamic(candidate: Candidate) -> bool:
    return candidate.name.startswith("int8-dynamic")


def partial_candidates(
    options: SearchConfig, target, candidates, calibration, fp32_path, workdir, ref, val, metric, feed1, progress
) -> list[Candidate]:
    """For each INT8 family (static, dynamic) whose every full candidate breaks the budget, keep
    the worst nodes in float (precision "mixed"). Detectors (``float_head``) keep their head tail in
    float through the search: that is where quantization breaks them, not in the compute nodes."""
    if not options.partial_quantization:
        return []

    def validate(path: Path) -> dict:
        session = make_session(path, target.session.graph_optimization_level, config=target.session.config)
        return evaluate(metric, ref, run_session(session, val.inputs), val.labels, output_names(session))

    ranking_feed = {k: v[: partial.PartialConfig().ranking_samples] for k, v in val.inputs.items()}
    budget = float(options.max_accuracy_drop)
    measured = [c for c in candidates if c.usable and c.validation]
    static = [c for c in measured if c.metrics.get("settings", {}).get("format")]
    dynamic = [c for c in measured if _is_dynamic(c)]
    built = []
    for family, members in (("static", static), ("dynamic", dynamic)):
        if not members or any(c.within_budget for c in members) or (family == "static" and calibration is None):
            continue
        best = min(members, key=lambda c: c.validation["drop"])
        progress(
            f"every full {family} INT8 candidate breaks the budget (best {best.name}: drop "
            f"{best.validation['drop']:.4f}); trying partial quantization ..."
        )
        name = "int8-partial" if family == "static" else "int8-dynamic-partial"
        path = workdir / f"{name}.onnx"
        candidate = Candidate(name, "mixed", path)
        settings = {**best.metrics["settings"], "nodes_to_exclude": []}
        if family == "static" and options.float_head:
            settings["float_head"] = True
        result = None
        with captured_library_output() as said:
            try:
                if family == "static":
                    result = partial.partial_quantize(
                        fp32_path,
                        path,
                        calibration,
                        q.StaticInt8Config(**settings),
                        validate,
                        budget,
                        ranking_feed,
                        progress=progress,
                    )
                else:
                    settings.pop("weight_type", None)
                    result = partial.partial_quantize_dynamic(
                        fp32_path,
                        path,
                        q.DynamicInt8Config(**settings),
                        validate,
                        budget,
                        ranking_feed,
                        progress=progress,
                    )
            except Exception as exc:  # noqa: BLE001 - a failed candidate is recorded, not fatal
                candidate.error = f"partial quantization failed: {exc}"
        if result is not None:
            candidate.metrics = result.metrics
            candidate.refresh_size()
            # The search already validated the kept file on the whole validation set: only time it.
            measure_candidate(candidate, target, ref, val, metric, feed1, options.bench_seconds, result.validation)
        elif candidate.error is None:
            candidate.error = "budget not met even with half of the compute nodes in float"
        _record_library_output(candidate, said, progress)
        built.append(candidate)
    return built
