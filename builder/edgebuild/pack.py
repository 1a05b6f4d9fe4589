"""``edgebuild pack``: model source -> torch passes -> ONNX -> candidates -> validated bundle.

This module composes the steps; each step lives in its own module and delegates the hard part
to the field's library (torch.onnx, ONNX Runtime quantization, ...). Every step records
``{name, params, metrics}`` into the manifest's ``passes``.
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgebuild import __version__
from edgebuild.bundle import check_bundle_name, check_destination, write_bundle
from edgebuild.candidates import (
    Candidate,
    apply_budget,
    build_candidate,
    choice_reason,
    int8_skipped,
    measure_candidate,
    partial_candidates,
    plan_candidates,
    select,
    time_interleaved,
)
from edgebuild.data import DataSource, first_feed, open_data, resolve_inputs
from edgebuild.errors import AccuracyBudgetError, EdgebuildError, UsageError, first_line
from edgebuild.export import export_onnx
from edgebuild.golden import ShippedModel, check_serves, make_golden
from edgebuild.onnx_utils import fixed_batch, make_session, model_opset, onnx_dtype_name
from edgebuild.options import PackOptions, check_choices
from edgebuild.recipe import load_labels, load_postprocess, load_preprocess
from edgebuild.tasks import Task, TaskContext, get_task
from edgebuild.tasks.infer import DETECTION_PREPROCESS, declared_task, infer_task
from edgebuild.tasks.metadata import read_metadata
from edgebuild.report import write_report
from edgebuild.sources import ModelSource, load_model, require_shapes
from edgebuild.targets import TargetProfile, load_target
from edgebuild.validate import parse_accuracy_drop, run_session, torch_outputs
from edgerun.manifest import (
    FORMAT_VERSION,
    Manifest,
    ModelFile,
    PassRecord,
    Precision,
    ProviderSpec,
    SessionOptionsSpec,
    TensorSpec,
    Validation,
)
from edgerun.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

EXAMPLE = "edgebuild.examples.digits"


@dataclass
class PackResult:
    bundle: Path
    manifest: Manifest
    chosen: Candidate
    candidates: list[Candidate]


def _progress(message: str) -> None:
    print(f"edgebuild: {message}", file=sys.stderr, flush=True)


def _apply_example_defaults(options: PackOptions) -> dict:
    """No MODEL: pack the embedded digits CNN with its real calibration and validation splits."""
    if options.model is not None:
        return {}
    from edgebuild.examples import digits

    options.model = f"{EXAMPLE}:pretrained"
    options.calib_data = options.calib_data or f"{EXAMPLE}:calibration_data"
    options.val_data = options.val_data or f"{EXAMPLE}:validation_data"
    options.name = options.name or "digits"
    options.labels = options.labels or digits.LABELS
    return {"preprocess": digits.PREPROCESS, "postprocess": digits.POSTPROCESS}


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


def _tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim]
        return TensorSpec(name=value.name, dtype=onnx_dtype_name(t.elem_type), shape=shape)

    return [spec(v) for v in graph.input if v.name not in initializers], [spec(v) for v in graph.output]


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


def _gpu_preference(target: TargetProfile) -> list[str] | None:
    """GPU targets: host CPU timings say nothing about TensorRT, so prefer by the profile's
    precision order (the device re-times every shipped variant and serves the fastest)."""
    return list(target.precisions) if target.device == "gpu" else None


def _providers(
    target, chosen, inputs, val, options, passes, fp32_path, progress
) -> tuple[list[ProviderSpec], dict | None]:
    """Provider list for the manifest; on TensorRT targets also the op check and shape profiles."""
    providers = [ProviderSpec(name=p.name, options=p.options_for(chosen.precision)) for p in target.providers]
    from edgerun.tensorrt import TENSORRT

    trt = next((p for p in providers if p.name == TENSORRT), None)
    if trt is None:
        return providers, None
    from edgebuild.tensorrt import profile_shapes, unsupported_ops

    missing = (
        unsupported_ops(fp32_path, target.notes.get("tensorrt_ops", [])) if target.notes.get("tensorrt_ops") else {}
    )
    for op, count in missing.items():
        progress(
            f"WARNING: op {op} (x{count}) is not in TensorRT's supported list for this target; ONNX Runtime will run it on CUDA/CPU"
        )
    if val.calls:
        # Per-call data: the batch axis is the model's own (a state's second axis, none for a scalar), so the
        # profile is exactly the calls' shapes; TensorRT takes no profile for a scalar input.
        call = ",".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in first_feed(val, 1).items() if v.ndim)
        shapes = {f"trt_profile_{kind}_shapes": call for kind in ("min", "opt", "max")}
    else:
        shapes = profile_shapes(val.inputs, {t.name: t.shape for t in inputs}, options.max_batch)
    trt.options.update(shapes)
    passes.append(
        PassRecord(
            name="tensorrt-check",
            params={"opset": target.opset, "max_batch": options.max_batch},
            metrics={"unsupported_ops": missing, **shapes},
        )
    )
    serving = {
        "max_batch": options.max_batch,
        "out_of_profile": "reject",
        "note": "TensorRT engines are built for the recorded profiles; requests outside them get HTTP 400 rather than an engine rebuild",
    }
    return providers, serving


def _model_file(candidate: Candidate, path: str, target: TargetProfile, providers: list[ProviderSpec]) -> ModelFile:
    quant = candidate.metrics.get("settings") if candidate.precision != "fp32" else None
    overrides = {}
    for profile in target.providers:
        own = profile.options_for(candidate.precision)
        manifest_level = next((p.options for p in providers if p.name == profile.name), {})
        diff = {k: v for k, v in own.items() if manifest_level.get(k) != v}
        if diff:
            overrides[profile.name] = diff
    return ModelFile(
        provider_options=overrides,
        path=path,
        sha256="",
        size_bytes=0,
        precision=cast(Precision, candidate.precision),
        opset=model_opset(candidate.file),
        session_options=SessionOptionsSpec.model_validate(target.session.model_dump()),
        quantization=(
            {**quant, "recipe": candidate.recipe, "coverage": candidate.metrics.get("coverage")} if quant else None
        ),
        validation=candidate.validation,
        benchmark=candidate.latency,
    )


def pack(options: PackOptions, progress: Callable[[str], None] = _progress) -> PackResult:
    """Build a validated bundle; raises UsageError (exit 2) or AccuracyBudgetError (exit 3)."""
    extras = _apply_example_defaults(options)
    target = load_target(options.target)
    _validate_options(options, target)
    progress(f"target {target.name}: {target.description}")
    real_data = [d for d in (options.calib_data, options.val_data) if d and d != "random"]
    source = load_model(
        options.model,
        weights=options.weights,
        input_shape=options.input_shape,
        input_names=options.input_names,
        shapes_from_data=bool(real_data),
    )
    if not source.resolved:
        source.inputs = resolve_inputs(
            source.inputs, real_data[0], "calibration" if real_data[0] == options.calib_data else "validation"
        )
        require_shapes(source.inputs)
        progress(f"inputs from the data: {', '.join(f'{s.name} {list(s.shape)} {s.dtype}' for s in source.inputs)}")
    if source.kind == "pt2" and options.torch_passes:
        flags = "/".join(f"--{p.name}" for p in options.torch_passes)
        raise UsageError(
            f"{flags} needs a package.module:callable model: '{source.spec}' is a torch.export program, which "
            "cannot be pruned or trained; pass the factory that builds the model instead"
        )
    name = options.name or source.default_name
    check_bundle_name(name)
    dest = Path(options.output_dir) / f"{name}-{target.name}"
    check_destination(dest, options.force, options.archive)
    # PREPROCESS / POSTPROCESS / LABELS live next to the factory (the module named in MODEL).
    factory = source.factory_module
    for key, attr in (("preprocess", "PREPROCESS"), ("postprocess", "POSTPROCESS")):
        if extras.get(key) is None and getattr(factory, attr, None) is not None:
            extras[key] = getattr(factory, attr)
    if options.postprocess is not None:
        extras["postprocess"] = load_postprocess(options.postprocess)
    metadata = read_metadata(source.onnx_path) if source.kind == "onnx" and source.onnx_path else None
    task_name = declared_task(options.task, extras.get("postprocess"), metadata, progress)
    if task_name == "detection" and options.preprocess is None and extras.get("preprocess") is None:
        extras["preprocess"] = dict(DETECTION_PREPROCESS)  # Ultralytics' convention; recorded for /v1/predict
    preprocess = _declared_preprocess(options, extras, source)
    labels = load_labels(options.labels) if options.labels else load_labels(getattr(factory, "LABELS", None), "LABELS")
    if labels is None and metadata is not None and metadata.names:
        labels = metadata.names
        progress(f"labels: {len(labels)} class names from the model's metadata ({', '.join(labels[:5])}{' ...' if len(labels) > 5 else ''})")

    calibration = None
    if options.calib_data:
        calibration = open_data(
            options.calib_data,
            source.inputs,
            purpose="calibration",
            allow_random=True,
            limit=options.calib_samples,
            preprocess=preprocess,
            task=task_name,
        )
    val_spec = options.val_data or (
        options.calib_data if calibration is not None and not calibration.is_random else None
    )
    validated = val_spec is not None
    validation_source = (
        open_data(
            val_spec,
            source.inputs,
            purpose="validation",
            limit=options.val_samples,
            preprocess=preprocess,
            task=task_name,
        )
        if val_spec is not None
        else open_data("random", source.inputs, purpose="validation", allow_random=True, limit=64)
    )
    if not validated:
        progress(
            "WARNING: no validation data (--val-data): accuracy is NOT validated; outputs are only compared on random inputs"
        )
    if calibration is not None and calibration.is_random:
        progress("WARNING: calibrating on random data hides real accuracy loss; give --calib-data with real samples")
    val = validation_source.collect()
    preprocess = _data_preprocess(preprocess, calibration, validation_source, options, progress)
    passes: list[PassRecord] = []

    with tempfile.TemporaryDirectory(prefix="edgebuild-") as tmp:
        workdir = Path(tmp)
        original = source
        for torch_pass in options.torch_passes:
            if source.module is None:
                progress(f"skipping {torch_pass.name}: torch-level passes need a torch model, not ONNX")
                continue
            progress(f"{torch_pass.name} ...")
            # Passes that learn from the model (distillation) are taught by the original, not by the
            # output of an earlier pass such as pruning.
            extra = {"teacher": original} if getattr(torch_pass, "needs_teacher", False) else {}
            source, record = torch_pass.run(source, options, progress, **extra)
            passes.append(record)

        progress(f"export: ONNX opset {target.opset} ...")
        exported = export_onnx(source, workdir, target.opset)
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

        ref = _reference_outputs(original, exported.path, val.inputs, validation_source.description)
        labels = _labels(labels, validation_source, calibration, ref[0], progress)
        declared = extras.get("postprocess")
        task = get_task(task_name or infer_task(declared, ref[0]))
        exported_inputs, exported_outputs = _tensor_specs(exported.path)
        postprocess = task.postprocess(declared, {"outputs": exported_outputs, "metadata": metadata})
        metric = task.choose_metric(
            TaskContext(
                requested_metric=options.metric,
                val=val,
                reference=ref,
                output_names=[o.name for o in exported_outputs],
                data=validation_source.description,
                class_names=labels,
                postprocess=postprocess,
                input_hw=_image_hw(source.inputs, preprocess),
                known_classifier=bool(labels) or isinstance(declared, dict) and declared.get("type") == "classification",
            )
        )
        if options.max_accuracy_drop is None:
            options.max_accuracy_drop = task.default_budget(metric)
        progress(f"task {task.name}: {metric.name} ({metric.reason}); budget: drop <= {options.max_accuracy_drop:g}")
        if metric.warning:
            progress(f"WARNING: {metric.warning}; judging by top-1 agreement with the FP32 reference instead")
        batch = fixed_batch(exported.path) or 1  # timed at batch 1, or at the batch a model pins
        feed1 = first_feed(val, batch)

        fp32 = Candidate("fp32", "fp32", exported.path, metrics={"recipe": "fp32 (graph-optimised by ORT)"})
        candidates = [fp32] if options.quantize in ("auto", "none") else []
        skipped = int8_skipped(options, target, calibration)
        if skipped:
            progress(skipped)
        for plan in plan_candidates(options, target, calibration, exported.path, float_head=_float_head(task, options)):
            progress(f"quantize: building {plan.name} ...")
            candidates.append(build_candidate(plan, exported.path, workdir, progress))
        capped = " (the --val-samples cap)" if validated and len(val) >= options.val_samples else ""
        progress(
            f"validate + benchmark {len(candidates)} candidate(s) on {len(val)} samples{capped} ({metric.name}) ..."
        )
        for candidate in candidates:
            measure_candidate(candidate, target, ref, val, metric, feed1, options.bench_seconds)
        if fp32 not in candidates:
            measure_candidate(fp32, target, ref, val, metric, feed1, options.bench_seconds)
        apply_budget(candidates, float(options.max_accuracy_drop))
        mixed = partial_candidates(
            options, target, candidates, calibration, exported.path, workdir, ref, val, metric, feed1, progress
        )
        if mixed:
            candidates.extend(mixed)
            apply_budget(candidates, float(options.max_accuracy_drop))
        time_interleaved(candidates + ([fp32] if fp32 not in candidates else []), target, feed1, options.bench_seconds)
        if options.recipe:
            passes.insert(0, PassRecord(name="recipe", params=options.recipe, metrics={}))
        for candidate in candidates:
            passes.append(
                PassRecord(
                    name=f"candidate:{candidate.name}", params={"recipe": candidate.recipe}, metrics=candidate.row()
                )
            )

        chosen = select(candidates, options.optimize_for, prefer=_gpu_preference(target))
        validation_info: dict[str, Any] = dict(
            metric=metric.name,
            metric_reason=metric.reason,
            data=validation_source.description,
            samples=len(val),
            validated=validated,
            max_accuracy_drop=options.max_accuracy_drop,
        )
        if chosen is None and not any(c.usable for c in candidates):
            failures = "; ".join(f"{c.name}: {c.error}" for c in candidates)
            raise EdgebuildError(f"no candidate could be built ({failures})")
        if chosen is None:
            report_path = dest.parent / f"{dest.name}.report.md"
            write_report(
                report_path,
                name=name,
                target=target,
                candidates=candidates,
                chosen=None,
                validation=validation_info,
                fp32=fp32,
                passes=passes,
            )
            drops = [(float(c.validation["drop"]), c.name) for c in candidates if c.validation]
            detail = "no candidate could be built"
            if drops:
                drop, closest = min(drops)
                detail = f"best {closest}: {metric.name} drop {drop:.4f}"
            raise AccuracyBudgetError(
                f"no variant within --max-accuracy-drop {options.max_accuracy_drop} ({detail}); report: {report_path}",
                report_path,
            )
        choice = choice_reason(chosen, fp32, _gpu_preference(target), options.optimize_for)
        progress(f"chosen: {chosen.name}: {choice}")

        ship_variants = options.ship_variants if options.ship_variants is not None else target.device == "gpu"
        shipped = [chosen] + ([c for c in candidates if c is not chosen and c.within_budget] if ship_variants else [])
        inputs, outputs = _tensor_specs(chosen.file)
        relative = {id(c): "model.onnx" if c is chosen else f"variants/{c.name}.onnx" for c in shipped}
        golden_bytes, golden = make_golden(
            [o.name for o in outputs],
            [ShippedModel(relative[id(c)], c.path) for c in shipped if c.path is not None],
            ref,
            val,
            target,
            classifier=metric.is_classification,
        )
        providers, serving = _providers(target, chosen, inputs, val, options, passes, exported.path, progress)
        files: dict[str, Path | bytes] = {"model.onnx": chosen.file, "golden.npz": golden_bytes}
        variants = []
        for candidate in shipped[1:]:
            files[relative[id(candidate)]] = candidate.file
            variants.append(_model_file(candidate, relative[id(candidate)], target, providers))
        if labels:
            files["labels.txt"] = ("\n".join(labels) + "\n").encode()

        chosen_validation = chosen.validation
        assert chosen_validation is not None  # only validated candidates are chosen
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=name,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            builder=_versions(),
            target=target.model_dump(mode="json"),
            model=_model_file(chosen, "model.onnx", target, providers),
            variants=variants,
            inputs=inputs,
            outputs=outputs,
            preprocess=preprocess.to_manifest() if preprocess is not None else None,
            postprocess=postprocess,
            task=task.name,
            providers=providers,
            serving=serving,
            passes=passes,
            validation=Validation(
                reference=chosen_validation["reference"],
                packed=chosen_validation["packed"],
                drop=chosen_validation["drop"],
                **_metric_details(metric.name, chosen_validation),
                **validation_info,
            ),
            benchmark=_benchmark_summary(fp32, chosen, candidates),
            golden=golden,
            labels="labels.txt" if labels else None,
            report=["report.md", "report.png"],
        )
        report_md, report_png = write_report(
            workdir / "report.md",
            choice=choice,
            name=name,
            target=target,
            candidates=candidates,
            chosen=chosen,
            validation=validation_info,
            fp32=fp32,
            passes=passes,
        )
        files["report.md"] = report_md
        if report_png is not None:
            files["report.png"] = report_png
        else:
            manifest.report = ["report.md"]
        progress(f"writing bundle {dest} ...")

        def serves(staged: Path) -> None:  # pack => serve: edgerun's own loader accepts the staged bundle
            progress(check_serves(staged))

        write_bundle(
            dest, manifest, files, force=options.force, sign_key=options.sign_key, archive=options.archive, check=serves
        )
    return PackResult(dest, manifest, chosen, candidates)


def _metric_details(metric: str, validation: dict | None) -> dict[str, Any]:
    """Cosine is judged on its mean; the worst sample is recorded next to it."""
    if metric != "cosine" or validation is None:
        return {}
    return {"cosine_mean": validation.get("cosine"), "cosine_worst": validation.get("cosine_min")}


def _declared_preprocess(options: PackOptions, extras: dict, source: ModelSource) -> PreprocessSpec | None:
    """``--preprocess`` / ``[preprocess]``, else ``PREPROCESS`` next to the factory, checked against the image input."""
    declared = options.preprocess if options.preprocess is not None else extras.get("preprocess")
    where = "--preprocess" if options.preprocess is not None else "PREPROCESS"
    spec = load_preprocess(declared, where)
    if spec is None:
        return None
    by_name = {s.name: s for s in source.inputs}
    image_input = by_name.get(spec.input) if spec.input else source.inputs[0]
    if image_input is None:
        raise UsageError(f"{where}: input '{spec.input}' is not one of the model's inputs {list(by_name)}")
    try:
        return spec.for_input(image_input.shape, image_input.name)
    except ValueError as exc:
        raise UsageError(f"{where} does not fit input '{image_input.name}': {exc}") from None


def _data_preprocess(
    declared: PreprocessSpec | None,
    calibration: DataSource | None,
    validation: DataSource,
    options: PackOptions,
    progress: Callable[[str], None],
) -> PreprocessSpec | None:
    """What the manifest records: the declared preprocessing, or what an image folder was read with."""
    if declared is not None or options.preprocess is not None:
        used = declared  # "--preprocess none" keeps /v1/predict off even for image folders
        note = "declared"
    else:
        used = next((d.preprocess for d in (calibration, validation) if d is not None and d.preprocess), None)
        note = "image folder default, no --preprocess given"
    if used is not None:
        normalised = ", mean/std" if used.mean is not None or used.std is not None else ""
        progress(
            f"preprocess: {used.color}, {used.resize} to {list(used.size or [])}, x{used.scale:.6g}{normalised} "
            f"({note}; recorded for /v1/predict)"
        )
    return used


def _labels(
    labels: list[str] | None,
    validation: DataSource,
    calibration: DataSource | None,
    ref: np.ndarray,
    progress: Callable[[str], None],
) -> list[str] | None:
    """Declared labels must match the model's output width; an image folder's class names are used
    when nothing is declared and their count is that width."""
    width = ref.shape[1] if ref.ndim == 2 else None
    if labels is not None:
        if width is not None and len(labels) != width:
            raise UsageError(f"{len(labels)} labels given but the model's output has {width} classes")
        return labels
    classes = next((d.classes for d in (validation, calibration) if d is not None and d.classes), None)
    if classes and width == len(classes):
        progress(f"labels: the image folder's classes {', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}")
        return classes
    if classes:
        progress(f"labels: not taken from the image folder ({len(classes)} classes, model outputs {width})")
    return None


def _float_head(task: Task, options: PackOptions) -> bool:
    """Keep a detector's head tail in float (``--float-head``, on by default for detection)."""
    return task.head_in_float and options.head_in_float


def _image_hw(inputs, preprocess: PreprocessSpec | None) -> tuple[int, int] | None:
    """Height and width of the image input (for decoding boxes), when fixed."""
    if preprocess is not None and preprocess.size is not None:
        return (int(preprocess.size[0]), int(preprocess.size[1]))
    shape = list(inputs[0].shape) if inputs else []
    if len(shape) == 4 and shape[2] > 0 and shape[3] > 0:
        return (int(shape[2]), int(shape[3]))
    return None


def _benchmark_summary(fp32: Candidate, chosen: Candidate, candidates: list[Candidate]) -> dict:
    return {
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "batch": 1,
        "fp32": fp32.latency,
        "packed": chosen.latency,
        "speedup_vs_fp32": round(fp32.latency["p50_ms"] / chosen.latency["p50_ms"], 3)
        if fp32.latency and chosen.latency
        else None,
        "size_ratio_vs_fp32": round(chosen.size_bytes / fp32.size_bytes, 4) if fp32.size_bytes else None,
        "candidates": [c.row() for c in candidates],
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    versions = {"edgebuild": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - ONNX-only hosts
        pass
    return versions
