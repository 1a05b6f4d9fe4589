"""``edgebuild pack``: a short run of named stages, each a function with typed inputs and outputs.

    prepare inputs -> torch passes -> export -> judge (reference, task, metric, budget)
        -> candidates -> choose -> assemble manifest -> write

Each stage delegates the hard part to its own module and, through it, to the field's library
(torch.onnx, ONNX Runtime quantization, pycocotools, ...). Every step records ``{name, params,
metrics}`` into the manifest's ``passes``.
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgebuild import assemble
from edgebuild.budget import drop_in_samples, resolution_note
from edgebuild.bundle import write_bundle
from edgebuild.candidates import (
    Candidate,
    CandidatePlan,
    SearchConfig,
    apply_budget,
    build_candidate,
    calibration_fallbacks,
    choice_reason,
    int8_skipped,
    measure_candidate,
    partial_candidates,
    plan_candidates,
    select,
    time_interleaved,
)
from edgebuild.data import first_feed
from edgebuild.errors import AccuracyBudgetError, UsageError, first_line
from edgebuild.export import ExportResult, export_onnx
from edgebuild.golden import ShippedModel, check_serves, make_golden
from edgebuild.onnx_utils import fixed_batch, make_session
from edgebuild.options import PackOptions, check_choices
from edgebuild.passes import PassContext
from edgebuild.passes.fusion import fused_partial, fusion_plans
from edgebuild.prepare import Prepared, apply_example_defaults, check_labels, prepare
from edgebuild.profile_format import append_report_section
from edgebuild.progress import Stopwatch, candidate_line
from edgebuild.report import write_report
from edgebuild.shipping import record_host_isa, shipped_variants
from edgebuild.sources import ModelSource
from edgebuild.targets import TargetProfile, load_target
from edgebuild.tasks import Task, TaskContext, get_task
from edgebuild.tasks.infer import infer_task
from edgebuild.validate import Metric, parse_accuracy_drop, run_session, torch_outputs
from edgerun.manifest import FORMAT_VERSION, Manifest, PassRecord, TensorSpec, Validation
from edgerun.manifest import Task as TaskName

__all__ = ["PackOptions", "PackResult", "pack"]

log = logging.getLogger(__name__)


@dataclass
class PackResult:
    bundle: Path
    manifest: Manifest
    chosen: Candidate
    candidates: list[Candidate]


def _progress(message: str) -> None:
    print(f"edgebuild: {message}", file=sys.stderr, flush=True)


def pack(options: PackOptions, progress: Callable[[str], None] = _progress) -> PackResult:
    """Build a validated bundle; raises UsageError (exit 2) or AccuracyBudgetError (exit 3)."""
    extras = apply_example_defaults(options)
    target = load_target(options.target)
    _validate_options(options, target)
    progress(f"target {target.name}: {target.description}")
    prepared = prepare(options, target, extras, progress)
    passes: list[PassRecord] = []
    with tempfile.TemporaryDirectory(prefix="edgebuild-") as tmp:
        workdir = Path(tmp)
        model = run_torch_passes(options, prepared, passes, progress)
        exported = export(model, target, workdir, passes, progress)
        judged = judge(options, prepared, exported, progress)
        search = _search_config(options, judged)
        fused = fusion_plans(options, target, model.source, exported.result, workdir, progress)  # transformers only
        measured = measure_candidates(search, target, prepared, exported, judged, workdir, progress, fused)
        _record_candidates(options, measured.candidates, passes)
        chosen, choice = choose(options, target, prepared, judged, measured, passes, progress)
        manifest, files = assemble_bundle(
            options, target, prepared, exported, judged, measured, chosen, passes, progress
        )
        write_report_files(workdir, manifest, files, target, prepared, judged, measured, chosen, choice, passes)
        write(options, prepared.dest, manifest, files, progress)
    return PackResult(prepared.dest, manifest, chosen, measured.candidates)


def _validate_options(options: PackOptions, target: TargetProfile) -> None:
    check_choices(options)
    if options.max_accuracy_drop is not None:  # None: the task's default, once its metric is known
        options.max_accuracy_drop = parse_accuracy_drop(options.max_accuracy_drop)
    if options.quantize not in ("auto", "none"):
        wanted = options.quantize
        if wanted not in target.precisions:
            raise UsageError(
                f"--quantize {wanted} is not allowed on target '{target.name}' (allowed: {', '.join(target.precisions)})"
            )
    if options.quantize == "int8" and not options.calib_data:
        raise UsageError(
            "--quantize int8 needs --calib-data (real data; 'random' is accepted but recorded as not validated)"
        )


# ---- torch passes and export ----


@dataclass
class TorchModel:
    """The source after the torch passes, and the original (the reference and the teacher)."""

    source: ModelSource
    original: ModelSource


def run_torch_passes(
    options: PackOptions, prepared: Prepared, passes: list[PassRecord], progress: Callable[[str], None]
) -> TorchModel:
    source = original = prepared.source
    context = PassContext(val_data=options.val_data, val_samples=options.val_samples)
    for torch_pass in options.torch_passes:
        if source.module is None:
            progress(f"skipping {torch_pass.name}: torch-level passes need a torch model, not ONNX")
            continue
        progress(f"{torch_pass.name} ...")
        # Passes that learn from the model (distillation) are taught by the original, not by the
        # output of an earlier pass such as pruning.
        extra = {"teacher": original} if getattr(torch_pass, "needs_teacher", False) else {}
        source, record = torch_pass.run(source, context, progress, **extra)
        passes.append(record)
    return TorchModel(source, original)


@dataclass
class ExportedModel:
    """The exported FP32 ONNX file, and the model the candidates are judged against."""

    result: ExportResult
    original: ModelSource  # torch eager for torch sources (before any pass), else the ONNX file itself

    @property
    def path(self) -> Path:
        return self.result.path


def export(
    model: TorchModel, target: TargetProfile, workdir: Path, passes: list[PassRecord], progress: Callable[[str], None]
) -> ExportedModel:
    progress(f"export: ONNX opset {target.opset} ...")
    exported = export_onnx(model.source, workdir, target.opset)
    if exported.library_line():
        progress(str(exported.library_line()))
    passes.append(
        PassRecord(
            name="export",
            params=exported.record(),
            metrics={
                "size_bytes": exported.path.stat().st_size,
                # Compressed size is where unstructured (zeroed-weight) sparsity shows; dense size does not change.
                "gzip_bytes": len(gzip.compress(exported.path.read_bytes(), compresslevel=6)),
            },
        )
    )
    return ExportedModel(exported, model.original)


# ---- judge: the reference, the task, its metric and the budget ----


@dataclass
class Judged:
    """How candidates are judged: the FP32 reference's outputs, the task and its metric, the budget."""

    reference: list[np.ndarray]
    task: Task
    metric: Metric
    budget: float
    labels: list[str] | None
    postprocess: dict | None
    outputs: list[TensorSpec]


def _reference_outputs(
    source: ModelSource, fp32_path: Path, inputs: dict[str, np.ndarray], data: str
) -> list[np.ndarray]:
    """Every output of the reference model on the validation inputs (model order)."""
    try:
        if source.module is not None:
            return torch_outputs(source, inputs)
        return run_session(make_session(fp32_path), inputs)
    except Exception as exc:  # noqa: BLE001 - user model code and ONNX Runtime raise many types
        raise UsageError(f"the model fails on the validation data '{data}': {first_line(exc)}") from None


def judge(options: PackOptions, prepared: Prepared, exported: ExportedModel, progress: Callable[[str], None]) -> Judged:
    val, data = prepared.val, prepared.validation.description
    ref = _reference_outputs(exported.original, exported.path, val.inputs, data)
    labels = check_labels(prepared.labels, prepared.validation, prepared.calibration, ref[0], progress)
    declared = prepared.extras.get("postprocess")
    task = get_task(prepared.task_name or infer_task(declared, ref[0]))
    _, outputs = assemble.tensor_specs(exported.path)
    postprocess = task.postprocess(declared, {"outputs": outputs, "metadata": prepared.metadata})
    if labels is None:
        classes = next((d.classes for d in (prepared.validation, prepared.calibration) if d and d.classes), None)
        labels = task.data_labels(classes, outputs, postprocess)
        if labels:
            progress(
                f"labels: the data's {len(labels)} class names ({', '.join(labels[:5])}{' ...' if len(labels) > 5 else ''})"
            )
    task.check_labels(labels, outputs, postprocess)
    metric = task.choose_metric(
        TaskContext(
            requested_metric=options.metric,
            val=val,
            reference=ref,
            output_names=[o.name for o in outputs],
            data=data,
            class_names=labels,
            postprocess=postprocess,
            input_hw=assemble.image_hw(prepared.source.inputs, prepared.preprocess),
            known_classifier=bool(labels) or isinstance(declared, dict) and declared.get("type") == "classification",
        )
    )
    given = options.max_accuracy_drop
    budget = float(given) if given is not None else task.default_budget(metric)
    progress(f"task {task.name}: {metric.name} ({metric.reason}); budget: drop <= {budget:g}")
    if metric.warning:
        progress(f"WARNING: {metric.warning}")
    resolution = resolution_note(metric.name, len(val), budget)
    if resolution:
        progress(f"WARNING: {resolution}")
    return Judged(ref, task, metric, budget, labels, postprocess, outputs)


def _search_config(options: PackOptions, judged: Judged) -> SearchConfig:
    return SearchConfig(
        quantize=options.quantize,
        calib_method=options.calib_method,
        per_channel=options.per_channel,
        int8_search=options.int8_search,
        partial_quantization=options.partial_quantization,
        bench_seconds=options.bench_seconds,
        max_accuracy_drop=judged.budget,
        # Keep a detector's head tail in float (--float-head, on by default for detection).
        float_head=judged.task.head_in_float and options.head_in_float,
    )


# ---- candidates ----


@dataclass
class Measured:
    """Every candidate built, validated and timed; FP32 among them or measured alongside."""

    candidates: list[Candidate]
    fp32: Candidate


def measure_candidates(
    search: SearchConfig,
    target: TargetProfile,
    prepared: Prepared,
    exported: ExportedModel,
    judged: Judged,
    workdir: Path,
    progress: Callable[[str], None],
    extra_plans: list[CandidatePlan] = [],  # noqa: B006 - read only
) -> Measured:
    val, calibration, ref, metric = prepared.val, prepared.calibration, judged.reference, judged.metric
    batch = fixed_batch(exported.path) or 1  # timed at batch 1, or at the batch a model pins
    feed1 = first_feed(val, batch)
    fp32 = Candidate("fp32", "fp32", exported.path, metrics={"recipe": "fp32 (graph-optimised by ORT)"})
    candidates = [fp32] if search.quantize in ("auto", "none") else []
    skipped = int8_skipped(search, target, calibration)
    if skipped:
        progress(skipped)
    for plan in plan_candidates(search, target, calibration, exported.path) + extra_plans:
        progress(f"quantize: building {plan.name} ...")
        took = Stopwatch()
        candidates.append(build_candidate(plan, exported.path, workdir, progress))
        progress(f"quantize: {plan.name} {'failed' if candidates[-1].error else 'built'} ({took})")
    capped = " (the --val-samples cap)" if prepared.validated and len(val) >= _val_cap(prepared) else ""
    progress(f"validate + benchmark {len(candidates)} candidate(s) on {len(val)} samples{capped} ({metric.name}) ...")
    for index, candidate in enumerate(candidates, 1):
        took = Stopwatch()
        measure_candidate(candidate, target, ref, val, metric, feed1, search.bench_seconds)
        progress(candidate_line(index, len(candidates), candidate, took))
    if fp32 not in candidates:
        measure_candidate(fp32, target, ref, val, metric, feed1, search.bench_seconds)
    apply_budget(candidates, search.max_accuracy_drop)
    for more in (calibration_fallbacks, partial_candidates):
        extra = more(search, target, candidates, calibration, exported.path, workdir, ref, val, metric, feed1, progress)
        if extra:
            candidates.extend(extra)
            apply_budget(candidates, search.max_accuracy_drop)
    fused_mixed = fused_partial(search, target, candidates, workdir, ref, val, metric, feed1, progress)
    if fused_mixed:
        candidates.extend(fused_mixed)
        apply_budget(candidates, search.max_accuracy_drop)
    took = Stopwatch()
    time_interleaved(candidates + ([fp32] if fp32 not in candidates else []), target, feed1, search.bench_seconds)
    if sum(1 for c in candidates if c.usable) > 1:
        progress(f"timed the candidates again in alternating rounds ({took})")
    return Measured(candidates, fp32)


def _val_cap(prepared: Prepared) -> int:
    limit = prepared.validation.limit
    return limit if limit is not None else sys.maxsize


def _record_candidates(options: PackOptions, candidates: list[Candidate], passes: list[PassRecord]) -> None:
    if options.recipe:
        passes.insert(0, PassRecord(name="recipe", params=options.recipe, metrics={}))
    for candidate in candidates:
        passes.append(
            PassRecord(name=f"candidate:{candidate.name}", params={"recipe": candidate.recipe}, metrics=candidate.row())
        )


# ---- choose ----


def _gpu_preference(target: TargetProfile) -> list[str] | None:
    """GPU targets: host CPU timings say nothing about TensorRT, so prefer by the profile's
    precision order (the device re-times every shipped variant and serves the fastest)."""
    return list(target.precisions) if target.device == "gpu" else None


def _validation_info(prepared: Prepared, judged: Judged) -> dict[str, Any]:
    return dict(
        metric=judged.metric.name,
        metric_reason=judged.metric.reason,
        data=prepared.validation.description,
        samples=len(prepared.val),
        validated=prepared.validated,
        max_accuracy_drop=judged.budget,
    )


def choose(
    options: PackOptions,
    target: TargetProfile,
    prepared: Prepared,
    judged: Judged,
    measured: Measured,
    passes: list[PassRecord],
    progress: Callable[[str], None],
) -> tuple[Candidate, str]:
    """The kept candidate and why; no candidate within budget is exit 3 with the report written."""
    candidates, fp32 = measured.candidates, measured.fp32
    chosen = select(candidates, options.optimize_for, prefer=_gpu_preference(target))
    if chosen is None and not any(c.usable for c in candidates):
        failures = "; ".join(f"{c.name}: {c.error}" for c in candidates)
        raise UsageError(
            f"no candidate could be built ({failures}); --quantize {options.quantize} does not fit this model: "
            "try --quantize auto (measures every precision the target allows) or another precision"
        )
    if chosen is None:
        dest = prepared.dest
        report_path = dest.parent / f"{dest.name}.report.md"
        write_report(
            report_path,
            name=prepared.name,
            target=target,
            candidates=candidates,
            chosen=None,
            validation=_validation_info(prepared, judged),
            fp32=fp32,
            passes=passes,
        )
        drops = [(float(c.validation["drop"]), c.name) for c in candidates if c.validation]
        detail = "no candidate could be built"
        if drops:
            drop, closest = min(drops)
            samples = drop_in_samples(judged.metric.name, drop, len(prepared.val))
            detail = f"best {closest}: {judged.metric.name} drop {drop:.4f}{samples}"
            resolution = resolution_note(judged.metric.name, len(prepared.val), judged.budget)
            if resolution:
                detail += f"; {resolution}"
        raise AccuracyBudgetError(
            f"no variant within --max-accuracy-drop {judged.budget} ({detail}); report: {report_path}", report_path
        )
    forced = None if options.quantize == "auto" else options.quantize
    choice = choice_reason(chosen, fp32, _gpu_preference(target), options.optimize_for, forced)
    progress(f"chosen: {chosen.name}: {choice}")
    return chosen, choice


# ---- assemble and write ----


def assemble_bundle(
    options: PackOptions,
    target: TargetProfile,
    prepared: Prepared,
    exported: ExportedModel,
    judged: Judged,
    measured: Measured,
    chosen: Candidate,
    passes: list[PassRecord],
    progress: Callable[[str], None],
) -> tuple[Manifest, dict[str, Path | bytes]]:
    """The manifest and the bundle's files (model, variants, golden data, labels)."""
    candidates, val, labels = measured.candidates, prepared.val, judged.labels
    shipped = shipped_variants(chosen, candidates, options, target)
    inputs, outputs = assemble.tensor_specs(chosen.file)
    relative = {id(c): "model.onnx" if c is chosen else f"variants/{c.name}.onnx" for c in shipped}
    golden_bytes, golden = make_golden(
        [o.name for o in outputs],
        [ShippedModel(relative[id(c)], c.path) for c in shipped if c.path is not None],
        judged.reference,
        val,
        target,
        classifier=judged.metric.is_classification,
        boxes=assemble.box_check(judged.postprocess, prepared.source.inputs, prepared.preprocess, judged.budget),
    )
    providers, serving = assemble.provider_specs(
        target, chosen, inputs, val, options.max_batch, passes, exported.path, progress
    )
    files: dict[str, Path | bytes] = {"model.onnx": chosen.file, "golden.npz": golden_bytes}
    variants = []
    for candidate in shipped[1:]:
        files[relative[id(candidate)]] = candidate.file
        variants.append(assemble.model_file(candidate, relative[id(candidate)], target, providers))
    if labels:
        files["labels.txt"] = ("\n".join(labels) + "\n").encode()
    chosen_validation = chosen.validation
    assert chosen_validation is not None  # only validated candidates are chosen
    preprocess = prepared.preprocess
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=prepared.name,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        builder=assemble.versions(),
        target=target.model_dump(mode="json"),
        model=assemble.model_file(chosen, "model.onnx", target, providers),
        variants=variants,
        inputs=inputs,
        outputs=outputs,
        preprocess=preprocess.to_manifest() if preprocess is not None else None,
        postprocess=judged.postprocess,
        task=cast(TaskName, judged.task.name),
        providers=providers,
        serving=serving,
        passes=passes,
        validation=Validation(
            reference=chosen_validation["reference"],
            packed=chosen_validation["packed"],
            drop=chosen_validation["drop"],
            **assemble.metric_details(judged.metric.name, chosen_validation),
            **_validation_info(prepared, judged),
        ),
        benchmark=assemble.benchmark_summary(measured.fp32, chosen, candidates),
        golden=golden,
        labels="labels.txt" if labels else None,
        report=["report.md", "report.png"],
    )
    record_host_isa(manifest)
    return manifest, files


def write_report_files(
    workdir: Path,
    manifest: Manifest,
    files: dict[str, Path | bytes],
    target: TargetProfile,
    prepared: Prepared,
    judged: Judged,
    measured: Measured,
    chosen: Candidate,
    choice: str,
    passes: list[PassRecord],
) -> None:
    """report.md, report.png and, for detectors, report-detections.png, into the bundle's files."""
    pictures = {}
    if judged.postprocess and judged.postprocess.get("type") == "detection":
        picture = assemble.detection_picture(
            workdir,
            chosen,
            judged.reference,
            prepared.val,
            judged.outputs,
            judged.postprocess,
            prepared.preprocess,
            judged.labels,
            target,
            prepared.source.inputs,
        )
        if picture is not None:
            files[picture.name] = picture
            pictures[picture.name] = "Detections: FP32 (green) and the chosen variant (red) on two validation images"
    report_md, report_png = write_report(
        workdir / "report.md",
        pictures=pictures,
        choice=choice,
        name=prepared.name,
        target=target,
        candidates=measured.candidates,
        chosen=chosen,
        validation=_validation_info(prepared, judged),
        fp32=measured.fp32,
        passes=passes,
    )
    feed1 = first_feed(prepared.val, fixed_batch(chosen.file) or 1)
    append_report_section(report_md, chosen.file, target.session, feed1)  # where the time goes
    files["report.md"] = report_md
    if report_png is not None:
        files["report.png"] = report_png
    else:
        manifest.report = ["report.md"]
    manifest.report += list(pictures)


def write(
    options: PackOptions,
    dest: Path,
    manifest: Manifest,
    files: dict[str, Path | bytes],
    progress: Callable[[str], None],
) -> None:
    """Stage the bundle, prove edgerun's own loader serves it, then move it into place atomically."""
    progress(f"writing bundle {dest} ...")

    def serves(staged: Path) -> None:  # pack => serve: edgerun's own loader accepts the staged bundle
        progress(check_serves(staged))

    write_bundle(
        dest, manifest, files, force=options.force, sign_key=options.sign_key, archive=options.archive, check=serves
    )
