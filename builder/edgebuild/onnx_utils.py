"""Small ONNX helpers shared by the passes: dtypes, opset, load checks, op counts, sessions."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError, first_line
from edgerun.manifest import GraphOptimizationLevel, SessionOptionsSpec

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QAttention",
        "DynamicQuantizeLSTM",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
    }
)
QUANTIZED_COMPUTE_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeLSTM"}
)
# Ops that carry the model's weights and therefore decide whether it is "really" quantized.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention"})


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run the block in a throwaway working directory, for library calls that drop files into the cwd.

    ONNX Runtime's symbolic shape inference saves ``sym_shape_infer_temp.onnx`` into the current
    directory when it cannot infer every shape. The working directory is process-wide: pass
    absolute paths into the block.
    """
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="edgebuild-") as scratch:
        os.chdir(scratch)
        try:
            yield Path(scratch)
        finally:
            os.chdir(previous)


def onnx_dtype_name(elem_type: int) -> str:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def model_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def fixed_batch(path: Path) -> int | None:
    """The batch size the model's inputs pin (a number, not a symbol, in dim 0), or None when it is dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    sizes = [
        value.type.tensor_type.shape.dim[0].dim_value
        for value in graph.input
        if value.name not in initializers and value.type.tensor_type.shape.dim
    ]
    fixed = [size for size in sizes if size > 0]
    return min(fixed) if fixed else None


def op_counts(path: Path, skip: Callable[[Any], set[int]] | None = None) -> Counter[str]:
    """Count op types, including those inside If/Loop/Scan subgraphs; ``skip(graph)`` names the
    indices of a graph's nodes to leave out."""
    import onnx

    counts: Counter[str] = Counter()

    def walk(graph: Any) -> None:
        left_out = skip(graph) if skip is not None else set()
        for index, node in enumerate(graph.node):
            if index not in left_out:
                counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


def quantization_coverage(float_path: Path, quant_path: Path) -> dict:
    """How much of the model really got quantized: compute ops left in float vs before.

    ORT's tools "succeed" while quantizing nothing when weights sit inside If/Loop bodies,
    so a bundle is only called INT8 when this says so.
    """
    before = op_counts(float_path)
    after = op_counts(quant_path)
    compute_before = sum(before[op] for op in COMPUTE_OPS)
    # In QDQ form a quantized Conv stays a Conv fed by DequantizeLinear; count DQ-fed ops instead.
    # Only quantized forms of compute ops count: QLinearAdd/QLinearGlobalAveragePool etc. are not in
    # the denominator, and counting them reported coverage above 100% for QOperator models.
    quant_nodes = sum(after[op] for op in QUANTIZED_COMPUTE_OPS)
    qdq_pairs = after["DequantizeLinear"]
    quantized = quant_nodes if quant_nodes else _qdq_compute_ops(quant_path)
    return {
        "compute_ops": compute_before,
        "quantized_compute_ops": quantized,
        "fraction": round(quantized / compute_before, 4) if compute_before else 0.0,
        "dequantize_nodes": qdq_pairs,
    }


def _qdq_compute_ops(path: Path) -> int:
    """Compute ops whose weight input comes from a DequantizeLinear (QDQ format)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dq_outputs = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        1 for node in graph.node if node.op_type in COMPUTE_OPS and len(node.input) > 1 and node.input[1] in dq_outputs
    )


def check_model(path: Path) -> None:
    """ONNX checker plus an ONNX Runtime load: a model that fails either never ships."""
    import onnx
    import onnxruntime as ort

    from edgerun.session import CPU

    try:
        onnx.checker.check_model(str(path))
        ort.InferenceSession(str(path), providers=[CPU])
    except Exception as exc:  # noqa: BLE001 - both libraries raise their own types
        raise EdgebuildError(f"ONNX model {path.name} failed its load check: {first_line(exc)}") from None


def make_session(
    path: Path,
    session_options: SessionOptionsSpec | GraphOptimizationLevel = "all",
    threads: int | None = None,
    config: dict[str, str] | None = None,
) -> Any:
    """An ORT CPU session with exactly the options the runtime applies on the device.

    ``session_options`` is a manifest's (or target profile's) ``SessionOptionsSpec``, or just a
    graph optimisation level with ``config`` entries. The options come from
    ``edgerun.session.make_session_options``, so a variant is validated and timed the way it
    will be served; ``threads=None`` leaves the intra-op pool to ONNX Runtime.
    """
    import onnxruntime as ort

    from edgerun.session import CPU, make_session_options

    if isinstance(session_options, str):
        session_options = SessionOptionsSpec(graph_optimization_level=session_options, config=dict(config or {}))
    elif config:
        raise TypeError("config goes into the SessionOptionsSpec when one is given")
    options = make_session_options(session_options, threads or 0)
    return ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
