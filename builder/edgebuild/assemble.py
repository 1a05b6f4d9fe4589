"""Assembling a bundle's contents: tensor specs, model files, providers, golden tolerances for
detectors, the detection picture, the benchmark summary and the builder's versions.

The functions here read what earlier stages produced and return manifest pieces; they neither
build nor choose candidates (``edgebuild.candidates``) nor write anything but the picture.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any, cast

from edgebuild import __version__
from edgebuild.candidates import Candidate
from edgebuild.data import first_feed
from edgebuild.golden import BoxCheck
from edgebuild.onnx_utils import make_session, model_opset, onnx_dtype_name
from edgebuild.targets import TargetProfile
from edgebuild.validate import run_session
from edgerun.manifest import ModelFile, PassRecord, Precision, ProviderSpec, SessionOptionsSpec, TensorSpec
from edgerun.preprocess import PreprocessSpec
from edgerun.tasks.detection import DetectionSpec

log = logging.getLogger(__name__)

# Validation images drawn in report-detections.png.
PICTURE_IMAGES = 2


def tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim]
        return TensorSpec(name=value.name, dtype=onnx_dtype_name(t.elem_type), shape=shape)

    return [spec(v) for v in graph.input if v.name not in initializers], [spec(v) for v in graph.output]


def provider_specs(
    target: TargetProfile, chosen: Candidate, inputs, val, max_batch: int, passes: list[PassRecord], fp32_path, progress
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
        shapes = profile_shapes(val.inputs, {t.name: t.shape for t in inputs}, max_batch)
    trt.options.update(shapes)
    passes.append(
        PassRecord(
            name="tensorrt-check",
            params={"opset": target.opset, "max_batch": max_batch},
            metrics={"unsupported_ops": missing, **shapes},
        )
    )
    serving = {
        "max_batch": max_batch,
        "out_of_profile": "reject",
        "note": "TensorRT engines are built for the recorded profiles; requests outside them get HTTP 400 rather than an engine rebuild",
    }
    return providers, serving


def model_file(candidate: Candidate, path: str, target: TargetProfile, providers: list[ProviderSpec]) -> ModelFile:
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


# Detection figures recorded next to the budget's number in the manifest's validation.
DETECTION_FIGURES = (
    "map50_95",
    "map50",
    "reference_map50_95",
    "reference_map50",
    "box_agreement",
    "box_agreement_map50",
)


def metric_details(metric: str, validation: dict | None) -> dict[str, Any]:
    """Cosine is judged on its mean (the worst sample next to it); a detector's mAP figures, box agreement
    and score spread are recorded alongside the one the budget applies to; so is the worst output."""
    if validation is None:
        return {}
    details: dict[str, Any] = {}
    if metric == "cosine":
        details.update(cosine_mean=validation.get("cosine"), cosine_worst=validation.get("cosine_min"))
    details.update({k: validation[k] for k in DETECTION_FIGURES if k in validation})
    if "scores" in validation:
        details["distinct_scores"] = validation["scores"]["distinct"]
        details["reference_distinct_scores"] = validation["reference_scores"]["distinct"]
    if "worst_output" in validation:
        details["worst_output"] = validation["worst_output"]
    return details


def detection_picture(
    workdir: Path, chosen: Candidate, ref, val, outputs, postprocess, preprocess, labels, target, inputs
) -> Path | None:
    """FP32's and the chosen variant's boxes (at the serving conf) on the first validation images."""
    from edgebuild.tasks.detection_picture import draw
    from edgerun.tasks.detection import detect

    hw = image_hw(inputs, preprocess)
    if hw is None or val.calls:
        return None
    spec = DetectionSpec.model_validate(postprocess)
    names = [o.name for o in outputs]
    rows = {k: v[:PICTURE_IMAGES] for k, v in val.inputs.items()}
    session = make_session(chosen.file, target.session.graph_optimization_level, config=target.session.config)
    fp32 = detect([r[:PICTURE_IMAGES] for r in ref], names, spec, hw)
    packed = detect(run_session(session, rows), names, spec, hw)
    image_input = preprocess.input if preprocess is not None and preprocess.input else inputs[0].name
    try:
        return draw(workdir / "report-detections.png", rows[image_input], preprocess, fp32, packed, chosen.name, labels)
    except (ImportError, OSError, ValueError) as exc:  # the picture is a courtesy; the numbers are in the report
        log.warning("report-detections.png not drawn: %s", exc)
        return None


def box_check(postprocess: dict | None, inputs, preprocess: PreprocessSpec | None, max_drop: float) -> BoxCheck | None:
    """Detection bundles: the device checks golden boxes, with tolerances measured here."""
    if not postprocess or postprocess.get("type") != "detection":
        return None
    hw = image_hw(inputs, preprocess)
    return None if hw is None else BoxCheck(DetectionSpec.model_validate(postprocess), hw, max_drop)


def image_hw(inputs, preprocess: PreprocessSpec | None) -> tuple[int, int] | None:
    """Height and width of the image input (for decoding boxes), when fixed."""
    if preprocess is not None and preprocess.size is not None:
        return (int(preprocess.size[0]), int(preprocess.size[1]))
    shape = list(inputs[0].shape) if inputs else []
    if len(shape) == 4 and shape[2] > 0 and shape[3] > 0:
        return (int(shape[2]), int(shape[3]))
    return None


def benchmark_summary(fp32: Candidate, chosen: Candidate, candidates: list[Candidate]) -> dict:
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


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    versions = {"edgebuild": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - ONNX-only hosts
        pass
    return versions
