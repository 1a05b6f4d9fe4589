"""Quantization with ONNX Runtime's own tools: static INT8 (QDQ/QOperator), dynamic INT8, fp16.

Each function takes an FP32 ONNX file and writes a new one; it never edits its input. The
returned dict is the pass record's ``metrics``: exact settings used, which pre-processing path
worked, and how many compute ops really ended up quantized.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgebuild.data import CalibrationReader, DataSource
from edgebuild.errors import EdgebuildError, first_line
from edgebuild.memory import PeakMemory
from edgebuild.onnx_utils import check_model, fixed_batch, quantization_coverage, scratch_cwd

log = logging.getLogger(__name__)

# What --quantize, --calib-method and --int8-search accept (declared as options in edgebuild.options).
QUANTIZE_MODES = ("auto", "int8", "int8-dynamic", "fp16", "none")
CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_SEARCH = ("quick", "full")


# Why a QDQ file whose weights stayed float is not smaller than FP32 (recorded and shown in the report).
WEIGHTS_BEHIND_QDQ = (
    "weights stay float32 behind QuantizeLinear/DequantizeLinear pairs (AddQDQPairToWeight): a runtime "
    "folds them into int8 when it loads the model, so the file is about FP32's size"
)


def weight_storage(path: Path) -> dict[str, int]:
    """How the quantized file stores its weights, counted from the file itself.

    ``int8``: integer initializers read by a DequantizeLinear (what ships as 8-bit weights);
    ``float_behind_qdq``: float initializers read by a QuantizeLinear (quantized only at load time).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name: i.data_type for i in graph.initializer}
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    counts = {"int8": 0, "float_behind_qdq": 0}
    for node in graph.node:
        kind = initializers.get(node.input[0]) if node.input else None
        if node.op_type == "DequantizeLinear" and kind in integer:
            counts["int8"] += 1
        elif node.op_type == "QuantizeLinear" and kind in floating:
            counts["float_behind_qdq"] += 1
    return counts


@dataclass
class StaticInt8Config:
    """Static INT8 settings; defaults are the x86 (fbgemm-style, U8S8) preset."""

    format: str = "qdq"  # qdq | qoperator
    activation_type: str = "uint8"  # uint8 is the only type that beat FP32 on AVX2 without VNNI
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # fixes saturation on some CNNs, hurts transformers: measure
    activation_symmetric: bool = False  # TensorRT wants symmetric int8 activations
    weight_symmetric: bool = True
    calibration_method: str = "minmax"  # minmax | entropy | percentile
    nodes_to_exclude: list[str] = field(default_factory=list)  # kept in float (partial quantization)
    # Detectors: keep the head tail (nodes after the last Conv on each output path) in float, read from the graph.
    float_head: bool = False
    # Extra quantize_static options, e.g. the QDQ layout TensorRT fuses (DedicatedQDQPair, ...).
    extra_options: dict = field(default_factory=dict)

    @classmethod
    def from_profile(cls, profile, **overrides) -> StaticInt8Config:
        return cls(**{**profile.model_dump(), **overrides})

    def describe(self) -> str:
        act = "U8" if self.activation_type == "uint8" else "S8"
        wt = "U8" if self.weight_type == "uint8" else "S8"
        parts = [self.format.upper(), f"{act}{wt}", "per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            parts.append("reduce-range")
        if self.calibration_method != "minmax":
            parts.append(self.calibration_method)
        if self.float_head:
            parts.append("head float")
        if self.nodes_to_exclude:
            parts.append(f"{len(self.nodes_to_exclude)} nodes float")
        return " ".join(parts)


# Histogram calibrators (entropy, percentile) keep every intermediate output of a collection call in
# memory: 24 images at 800x608 were OOM-killed at 22 GB in one call. This many calibration feeds per
# call keeps the peak bounded; MinMax keeps only running ranges and takes the data in one call.
HISTOGRAM_FEEDS_PER_CALL = 4


def head_tail(prepared: Path) -> tuple[list[str], dict[str, int]]:
    """The head-tail node names of a (pre-processed) model and their op counts."""
    import onnx

    from edgebuild.tasks.head import describe, head_tail_nodes

    model = onnx.load(str(prepared), load_external_data=False)
    nodes = head_tail_nodes(model)
    return nodes, describe(nodes, model)


def _quant_types(config: StaticInt8Config):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    return (
        fmt[config.format],
        qtype[config.activation_type],
        qtype[config.weight_type],
        method[config.calibration_method],
    )


def preprocess(src: Path, dst: Path) -> str:
    """ORT's quantization pre-processing, retrying the paths that work on awkward real models.

    Symbolic shape inference asserts on some graphs; retry with ``auto_merge``, then without it.
    Returns which path succeeded (recorded in the manifest).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = [
        ("symbolic", {}),
        ("symbolic+auto_merge", {"auto_merge": True}),
        ("onnx-shape-inference", {"skip_symbolic_shape": True}),
    ]
    errors = []
    src_path, dst_path = str(src.resolve()), str(dst.resolve())  # before scratch_cwd() changes the cwd
    for label, kwargs in attempts:
        try:
            with scratch_cwd():  # symbolic shape inference leaves a temp model in the cwd
                quant_pre_process(src_path, dst_path, **kwargs)
            return label
        except Exception as exc:  # noqa: BLE001 - shape inference raises assorted errors
            errors.append(f"{label}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    log.warning("quantization pre-processing failed (%s); quantizing the unprocessed model", "; ".join(errors))
    dst.write_bytes(src.read_bytes())
    return "none (" + "; ".join(errors)[:200] + ")"


def quantize_static_int8(src: Path, dst: Path, calibration: DataSource, config: StaticInt8Config) -> dict:
    from onnxruntime.quantization import quantize_static

    fmt, act, wt, method = _quant_types(config)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        pre = preprocess(src, prepared)
        # Profiles add layout options: TensorRT's (targets/jetson.toml, sources cited there) keeps biases float
        # (its parser dequantizes int8 only: github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md) and
        # leaves the default int8 weight initializer -> DequantizeLinear, the pre-quantized weights TensorRT documents:
        # docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
        extra = {
            **config.extra_options,
            "ActivationSymmetric": config.activation_symmetric,
            "WeightSymmetric": config.weight_symmetric,
        }
        exclude = list(config.nodes_to_exclude)
        float_head: dict | None = None
        if config.float_head:
            tail, ops = head_tail(prepared)
            exclude += [n for n in tail if n not in exclude]
            float_head = {"nodes": len(tail), "ops": ops}
        reader = CalibrationReader(calibration, fixed_batch(src))
        if config.calibration_method in ("entropy", "percentile"):
            # ORT's strided collection: one collect_data call per stride of feeds, histograms merged between calls.
            reader.strided(HISTOGRAM_FEEDS_PER_CALL)
            extra["CalibStridedMinMax"] = HISTOGRAM_FEEDS_PER_CALL
        # CalibMaxIntermediateOutputs is deliberately left unset: it discards collected ranges.
        peak = PeakMemory()
        try:
            # Calibrators print progress to stdout; callers capture it (edgebuild.quiet): stdout is the bundle path.
            quantize_static(
                str(prepared),
                str(dst),
                reader,
                quant_format=fmt,
                activation_type=act,
                weight_type=wt,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                calibrate_method=method,
                nodes_to_exclude=exclude,
                extra_options=extra,
            )
        except Exception as exc:  # noqa: BLE001
            raise EdgebuildError(f"static INT8 quantization failed: {first_line(exc)}") from None
    check_model(dst)
    weights = weight_storage(dst)
    metrics = {
        "settings": asdict(config),
        "recipe": config.describe(),
        "preprocess": pre,
        "calibration_data": calibration.description,
        "calibration": {"method": config.calibration_method, "feeds_per_call": reader.per_call, **peak.read()},
        "coverage": quantization_coverage(src, dst),
        "weights": weights,
    }
    if float_head is not None:
        metrics["float_head"] = float_head
    if weights["float_behind_qdq"]:
        metrics["weight_storage"] = WEIGHTS_BEHIND_QDQ
    return metrics


@dataclass
class DynamicInt8Config:
    """Dynamic INT8: int8 weights, activations quantized at run time (no calibration)."""

    per_channel: bool = True  # per-tensor wrecked a MiniLM's worst-case cosine (measured on this kind of CPU)
    reduce_range: bool = False
    nodes_to_exclude: list[str] = field(default_factory=list)  # kept in float (partial quantization)

    def describe(self) -> str:
        parts = ["dynamic S8", "per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            parts.append("reduce-range")
        if self.nodes_to_exclude:
            parts.append(f"{len(self.nodes_to_exclude)} nodes float")
        return " ".join(parts)


def quantize_dynamic_int8(src: Path, dst: Path, config: DynamicInt8Config | None = None) -> dict:
    """Dynamic INT8 (weights int8, activations quantized at run time): for MatMul/RNN-heavy models."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = config or DynamicInt8Config()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        pre = preprocess(src, prepared)
        try:
            quantize_dynamic(
                str(prepared),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                nodes_to_exclude=list(config.nodes_to_exclude),
            )
        except Exception as exc:  # noqa: BLE001
            raise EdgebuildError(f"dynamic INT8 quantization failed: {first_line(exc)}") from None
    check_model(dst)
    settings = {"weight_type": "int8", **asdict(config)}
    return {
        "settings": settings,
        "recipe": config.describe(),
        "preprocess": pre,
        "coverage": quantization_coverage(src, dst),
    }


def gemm_as_matmul(path: Path) -> None:
    """Rewrite Gemm as MatMul (+ Add) in place, exactly as ``quantize_dynamic`` does before it
    quantizes: the node names it then reports and accepts in ``nodes_to_exclude`` are these."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = ONNXModel(onnx.load(str(path)))
    model.replace_gemm_with_matmul()
    model.remove_unused_constant()  # the Gemm weights it transposed into new initializers
    onnx.save(model.model, str(path), save_as_external_data=False)


def convert_fp16(src: Path, dst: Path) -> dict:
    """float16 weights and compute with float32 inputs/outputs kept (``keep_io_types``)."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    try:
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # noqa: BLE001
        raise EdgebuildError(f"fp16 conversion failed: {first_line(exc)}") from None
    onnx.save(converted, str(dst), save_as_external_data=False)
    check_model(dst)
    return {"settings": {"keep_io_types": True}, "recipe": "fp16 (float32 I/O)"}
