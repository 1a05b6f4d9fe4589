"""Accuracy-aware partial quantization: keep the nodes that hurt accuracy most in float.

Used when every full-INT8 candidate breaks the accuracy budget (FIELD-NOTES: even the best
full INT8 variant of a transformer missed a 0.98 worst-case cosine). Two steps:

1. **Rank** the quantizable compute nodes (Conv/MatMul/Gemm/...) by the error each one adds.
   One run of the FP32 model and one of its fake-quantized (QDQ) twin over a validation subset
   give every intermediate tensor in both; a node's score is the noise-to-signal ratio of its
   output minus that of its input (the error it *adds*, not the error it inherits from
   upstream). The nodes stay comparable because QDQ keeps the float model's tensor names.
2. **Search** how many of the worst nodes to keep in float (``nodes_to_exclude`` of ONNX
   Runtime's ``quantize_static``): 1, 2, 4, ... until the real metric on the full validation set
   meets the budget, then bisect down to the fewest. Every trial is a real quantization,
   validated with the device's session options; nothing is extrapolated.

It gives up (and says so) when more than ``max_float_fraction`` of the compute nodes would have
to stay float: such a model is better shipped as FP32.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgebuild.data import DataSource
from edgebuild.onnx_utils import COMPUTE_OPS
from edgebuild.passes import quantize as q

log = logging.getLogger(__name__)


@dataclass
class PartialConfig:
    """Partial quantization settings."""

    max_float_fraction: float = 0.5
    "Give up when more than this share of compute nodes would have to stay in float."
    ranking_samples: int = 32
    "Validation samples used to rank nodes (the budget is always checked on the full set)."


@dataclass
class PartialResult:
    config: q.StaticInt8Config  # with nodes_to_exclude set
    metrics: dict  # what quantize_static_int8 recorded, plus the ranking and the trials
    validation: dict  # of the kept model, full validation set


def _nsr(reference: np.ndarray, value: np.ndarray) -> float:
    """Noise-to-signal ratio ||value - reference||² / ||reference||²."""
    ref = reference.astype(np.float64).ravel()
    diff = value.astype(np.float64).ravel() - ref
    return float((diff @ diff) / max(ref @ ref, 1e-30))


def _with_outputs(path: Path, names: list[str], dst: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(dst), save_as_external_data=False)


def _tensors(path: Path, names: list[str], feed: dict[str, np.ndarray], workdir: Path) -> dict[str, np.ndarray]:
    """Values of ``names`` for ``feed``; graph optimisations off so no fusion hides a tensor."""
    from edgebuild.onnx_utils import make_session

    augmented = workdir / f"{path.stem}-tensors.onnx"
    _with_outputs(path, names, augmented)
    session = make_session(augmented, "disable_all")
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    values = session.run(wanted, feed)
    return dict(zip(wanted, values))


def rank_nodes(qdq: Path, prepared: Path, feed: dict[str, np.ndarray], workdir: Path) -> list[tuple[str, float]]:
    """Compute nodes of a fully quantized QDQ model, worst first, by the quantization noise each one injects.

    A node's score is the noise-to-signal ratio of the quantizations it takes part in, each
    measured *locally* (so error inherited from upstream does not count): for an activation, the
    tensor entering QuantizeLinear vs what DequantizeLinear returns; for a weight, the float
    weight vs its dequantized value. Relative errors roughly add through a layer. A tensor's
    quantization disappears only when its producer and its consumers all stay float, so it is
    counted for each of them: they rank next to each other.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(qdq), load_external_data=False).graph
    init = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    wanted: set[str] = set()
    activation_dq: dict[str, tuple[str, onnx.NodeProto]] = {}  # DQ output -> (raw tensor entering Q, Q node)
    weight_dq: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            activation_dq[node.output[0]] = (source.input[0], source)
            wanted |= {source.input[0], node.output[0]}
        elif node.input[0] in init:
            weight_dq[node.output[0]] = node
            wanted.add(node.output[0])
    values = _tensors(qdq, sorted(wanted), feed, workdir) if wanted else {}
    quantized_output = {raw: dq_out for dq_out, (raw, _) in activation_dq.items()}

    def scalar(name: str) -> np.ndarray:
        return numpy_helper.to_array(init[name]) if name in init else np.zeros(())

    def activation_error(dq_out: str) -> float:
        raw_name, q_node = activation_dq[dq_out]
        raw, deq = values.get(raw_name), values.get(dq_out)
        if raw is None or deq is None:
            return 0.0
        scale, zero = scalar(q_node.input[1]).astype(np.float64), scalar(q_node.input[2]).astype(np.float64)
        info = np.iinfo(np.uint8 if init.get(q_node.input[2]) is None or init[q_node.input[2]].data_type == onnx.TensorProto.UINT8
                        else np.int8)
        range_min = float(np.min((info.min - zero) * scale))
        # A range starting at 0 means a ReLU was folded into the quantization (or the tensor is
        # non-negative anyway): clamping negatives is the float model's behaviour, not noise.
        reference = np.maximum(raw, 0.0) if abs(range_min) <= 1e-12 else raw
        return _nsr(reference, deq)

    def weight_error(dq_out: str) -> float:
        node = weight_dq[dq_out]
        float_name = node.input[0].removesuffix("_quantized")
        deq = values.get(dq_out)
        if float_name not in float_weights or deq is None or float_weights[float_name].shape != deq.shape:
            return 0.0
        return _nsr(float_weights[float_name], deq)

    # Float weights as quantize_static saw them (after pre-processing folded BatchNorms etc.).
    float_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(prepared)).graph.initializer}
    scores = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or not node.name:
            continue
        score = 0.0
        for tensor in node.input[:2]:  # activation and weight; the int32 bias adds no meaningful noise
            if tensor in activation_dq:
                score += activation_error(tensor)
            elif tensor in weight_dq:
                score += weight_error(tensor)
        if node.output[0] in quantized_output:
            # The node's own output quantization (ReLUs are folded into it) also goes away only when
            # the node itself stays float, so it counts here too.
            score += activation_error(quantized_output[node.output[0]])
        scores.append((node.name, score))
    return sorted(scores, key=lambda item: -item[1])


def partial_quantize(
    src: Path,
    dst: Path,
    calibration: DataSource,
    base: q.StaticInt8Config,
    validate: Callable[[Path], dict],
    max_drop: float,
    ranking_feed: dict[str, np.ndarray],
    config: PartialConfig | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> PartialResult | None:
    """Smallest set of worst-ranked nodes kept in float for which ``validate(model)['drop'] <= max_drop``.

    ``validate`` runs a model file on the full validation set (as the pack gate does). Returns
    ``None`` when the budget needs more than ``max_float_fraction`` of the compute nodes in float.
    """
    config = config or PartialConfig()
    with tempfile.TemporaryDirectory(prefix="edgebuild-partial-") as tmp:
        work = Path(tmp)
        prepared = work / "prepared.onnx"
        q.preprocess(src, prepared)  # quantize_static repeats this exactly; node names match
        qdq = work / "qdq.onnx"
        q.quantize_static_int8(src, qdq, calibration, replace(base, format="qdq", nodes_to_exclude=[]))
        ranking = rank_nodes(qdq, prepared, ranking_feed, work)
        order = [name for name, _ in ranking]
        limit = int(np.floor(config.max_float_fraction * len(order)))
        trials: list[dict] = []
        results: dict[int, tuple[dict, dict, Path]] = {}

        def trial(k: int) -> bool:
            path = work / f"partial-{k}.onnx"
            metrics = q.quantize_static_int8(src, path, calibration, replace(base, nodes_to_exclude=order[:k]))
            validation = validate(path)
            ok = bool(validation.get("finite", True) and validation["drop"] <= max_drop + 1e-12)
            trials.append({"float_nodes": k, "drop": round(float(validation["drop"]), 6), "within_budget": ok})
            progress(f"partial quantization: {k} node(s) in float -> {validation['metric']} drop {validation['drop']:.4f}"
                     f"{' (within budget)' if ok else ''}")
            results[k] = (metrics, validation, path)
            return ok

        passing, failing, k = None, 0, 1
        while k <= limit:
            if trial(k):
                passing = k
                break
            failing, k = k, k * 2
        if passing is None and limit > failing and limit not in results and trial(limit):
            passing = limit
        if passing is None:
            progress(f"partial quantization: budget not met with up to {limit} of {len(order)} compute nodes in float; giving up")
            return None
        while passing - failing > 1:  # bisect to the fewest float nodes that still pass
            middle = (passing + failing) // 2
            if trial(middle):
                passing = middle
            else:
                failing = middle
        metrics, validation, path = results[passing]
        dst.write_bytes(path.read_bytes())
    kept = replace(base, nodes_to_exclude=order[:passing])
    metrics = {
        **metrics, "settings": asdict(kept), "recipe": kept.describe(),
        "partial": {"float_nodes": order[:passing], "compute_nodes": len(order), "trials": trials,
                    "ranking": [{"node": n, "input_nsr": round(s, 8)} for n, s in ranking[:10]],
                    "ranking_samples": len(next(iter(ranking_feed.values()))),
                    "method": "rank by local quantization noise-to-signal ratio of each node's inputs and weights (QDQ model); "
                              "keep the worst in float: doubling, then bisection, each trial validated"},
    }
    return PartialResult(kept, metrics, validation)
