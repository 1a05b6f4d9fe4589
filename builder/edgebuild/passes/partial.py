"""Accuracy-aware partial quantization: keep the nodes that hurt accuracy most in float.

Used when every full-INT8 candidate breaks the accuracy budget (measured: even the best
full INT8 variant of a transformer missed a 0.98 worst-case cosine). Two steps:

1. **Rank** the quantizable compute nodes (Conv/MatMul/Gemm/...) by the error each one adds.
   One run of the FP32 model and one of its fake-quantized (QDQ) twin over a validation subset
   give every node's input and output in both (quantize_static keeps node names); a node's
   score is the noise-to-signal ratio of its output minus that of its input: the error it
   *adds*, not the error it inherits from upstream. Each node is excluded together with the
   compute node producing its input, since a quantized producer quantizes its output.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgebuild.data import DataSource, fill_rows
from edgebuild.onnx_utils import COMPUTE_OPS, fixed_batch
from edgebuild.passes import quantize as q
from edgebuild.validate import within_budget

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
    config: q.StaticInt8Config | q.DynamicInt8Config  # with nodes_to_exclude set
    metrics: dict  # what quantize_static_int8 recorded, plus the ranking and the trials
    validation: dict  # of the kept model, full validation set


def _nsr(reference: np.ndarray, value: np.ndarray) -> float:
    """Noise-to-signal ratio ||value - reference||² / ||reference||²."""
    ref = reference.astype(np.float64).ravel()
    diff = value.astype(np.float64).ravel() - ref
    return float(diff @ diff) / max(float(ref @ ref), 1e-30)


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
    batch = fixed_batch(path)
    if batch is None:
        return dict(zip(wanted, session.run(wanted, feed)))
    # A model that pins its batch (often 1) takes exactly that many rows per run: run the rows in chunks of it.
    rows = len(next(iter(feed.values())))
    usable = rows - rows % batch or batch
    chunks = [
        session.run(wanted, fill_rows({k: v[start : start + batch] for k, v in feed.items()}, batch))
        for start in range(0, usable, batch)
    ]
    return {name: np.concatenate([chunk[i] for chunk in chunks]) for i, name in enumerate(wanted)}


def rank_nodes(
    qdq: Path, prepared: Path, feed: dict[str, np.ndarray], workdir: Path, *, by_tensor: bool = False
) -> list[tuple[str, float]]:
    """Compute nodes, worst first, by the output error each one *adds* in the fully quantized QDQ model.

    For every compute node (matched by name; quantize_static keeps node names), compare its
    output in the FP32 model with its output in the QDQ model, and subtract the error its input
    already carried: ``NSR(out) - NSR(in)``. The output error includes what quantizing the
    node's input activation and its weights destroyed, *as seen after the layer*, so a tensor
    whose few huge channels hide the loss of all the others (a small error relative to the
    tensor) still shows up at the layer that needed those channels.

    ``by_tensor`` (dynamic INT8, which renames the nodes it quantizes but keeps every float
    tensor's name) pairs each float node with the same-named tensors in the quantized model: the
    node's output error includes its own run-time input quantization and int8 weights.
    """
    import onnx

    float_graph = onnx.load(str(prepared), load_external_data=False).graph
    quant_graph = onnx.load(str(qdq), load_external_data=False).graph
    float_nodes = {n.name: n for n in float_graph.node if n.name}
    quant_nodes = {n.name: n for n in quant_graph.node if n.name}
    graph_inputs = {i.name for i in float_graph.input}
    if by_tensor:
        quant_tensors = {t for n in quant_graph.node for t in n.output}
        pairs = [
            (name, node, node)
            for name, node in float_nodes.items()
            if node.op_type in COMPUTE_OPS and node.output[0] in quant_tensors
        ]
    else:
        pairs = [
            (name, float_nodes[name], quant_nodes[name])
            for name in float_nodes
            if float_nodes[name].op_type in COMPUTE_OPS and name in quant_nodes
        ]
    float_names = sorted({t for _, f, _ in pairs for t in (f.input[0], f.output[0]) if t not in graph_inputs})
    quant_names = sorted({t for _, _, qn in pairs for t in (qn.input[0], qn.output[0]) if t not in graph_inputs})
    float_values = {**feed, **_tensors(prepared, float_names, feed, workdir)}
    quant_values = {**feed, **_tensors(qdq, quant_names, feed, workdir)}

    def error(reference: str, quantized: str) -> float | None:
        f, v = float_values.get(reference), quant_values.get(quantized)
        if f is None or v is None or f.shape != v.shape:
            return None
        return _nsr(f, v)

    scores = []
    for name, f, qn in pairs:
        out_err = error(f.output[0], qn.output[0])
        in_err = error(f.input[0], qn.input[0]) or 0.0
        scores.append((name, float("nan") if out_err is None else max(out_err - in_err, 0.0)))
    return sorted(scores, key=lambda item: (np.isnan(item[1]), -np.nan_to_num(item[1])))


def _compute_producer(graph, node_name: str, hops: int = 4) -> str | None:
    """The compute node feeding ``node_name``'s activation input, through ReLU/pooling/reshape-like ops."""
    nodes = {n.name: n for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}
    current = nodes.get(node_name)
    tensor = current.input[0] if current is not None else None
    for _ in range(hops):
        node = producer.get(tensor)
        if node is None:
            return None
        if node.op_type in COMPUTE_OPS:
            return node.name or None
        tensor = node.input[0] if node.input else None
    return None


def exclusion_order(ranking: list[tuple[str, float]], prepared: Path) -> list[str]:
    """Worst node first, each followed by the compute node producing its input: a quantized
    producer quantizes its output, so the consumer alone in float would still read INT8 data."""
    import onnx

    graph = onnx.load(str(prepared), load_external_data=False).graph
    order: list[str] = []
    for name, _ in ranking:
        for candidate in (name, _compute_producer(graph, name)):
            if candidate and candidate not in order:
                order.append(candidate)
    return order


def _search(limit: int, trial: Callable[[int], bool]) -> int | None:
    """Fewest worst-ranked nodes in float for which ``trial`` passes: 1, 2, 4, ... up to ``limit``,
    then bisection; ``None`` when even ``limit`` nodes do not pass."""
    passing, failing, k, tried = None, 0, 1, set()
    while k <= limit:
        tried.add(k)
        if trial(k):
            passing = k
            break
        failing, k = k, k * 2
    if passing is None and limit > failing and limit not in tried and trial(limit):
        passing = limit
    if passing is None:
        return None
    while passing - failing > 1:  # bisect to the fewest float nodes that still pass
        middle = (passing + failing) // 2
        if trial(middle):
            passing = middle
        else:
            failing = middle
    return passing


def _result(
    base: q.StaticInt8Config | q.DynamicInt8Config, found: tuple[list[str], dict, dict] | None
) -> PartialResult | None:
    """The base config with the excluded nodes kept in float, and what the search measured."""
    if found is None:
        return None
    excluded, metrics, validation = found
    kept = replace(base, nodes_to_exclude=excluded)
    return PartialResult(kept, {**metrics, "settings": asdict(kept), "recipe": kept.describe()}, validation)


def _partial(
    src: Path,
    dst: Path,
    quantize: Callable[[Path, Path, list[str]], dict],
    twin: Callable[[Path, Path], object],
    dynamic: bool,
    validate: Callable[[Path], dict],
    max_drop: float,
    ranking_feed: dict[str, np.ndarray],
    config: PartialConfig,
    progress: Callable[[str], None],
) -> tuple[list[str], dict, dict] | None:
    """The search shared by static and dynamic INT8: rank the nodes on a fully quantized ``twin``,
    then ``quantize(src, dst, nodes_to_exclude)`` with more and more of the worst nodes in float."""
    with tempfile.TemporaryDirectory(prefix="edgebuild-partial-") as tmp:
        work = Path(tmp)
        prepared = work / "prepared.onnx"
        q.preprocess(src, prepared)  # the quantizers repeat this exactly; node names match
        if dynamic:  # quantize_dynamic also splits Gemm into MatMul (+ Add) and names the parts
            q.gemm_as_matmul(prepared)
        quantized = work / "twin.onnx"
        twin(src, quantized)
        ranking = rank_nodes(quantized, prepared, ranking_feed, work, by_tensor=dynamic)
        order = exclusion_order(ranking, prepared)
        limit = int(np.floor(config.max_float_fraction * len(order)))
        trials: list[dict] = []
        results: dict[int, tuple[dict, dict, Path]] = {}

        def trial(k: int) -> bool:
            path = work / f"partial-{k}.onnx"
            metrics = quantize(src, path, order[:k])
            validation = validate(path)
            ok = within_budget(validation, max_drop)
            trials.append({"float_nodes": k, "drop": round(float(validation["drop"]), 6), "within_budget": ok})
            progress(
                f"partial quantization: {k} node(s) in float -> {validation['metric']} drop {validation['drop']:.4f}"
                f"{' (within budget)' if ok else ''}"
            )
            results[k] = (metrics, validation, path)
            return ok

        passing = _search(limit, trial)
        if passing is None:
            progress(
                f"partial quantization: budget not met with up to {limit} of {len(order)} compute nodes in float; giving up"
            )
            return None
        metrics, validation, path = results[passing]
        dst.write_bytes(path.read_bytes())
    metrics = {
        **metrics,
        "partial": {
            "float_nodes": order[:passing],
            "compute_nodes": len(order),
            "trials": trials,
            "ranking": [{"node": n, "added_nsr": (None if np.isnan(s) else round(s, 8))} for n, s in ranking[:10]],
            "ranking_samples": len(next(iter(ranking_feed.values()))),
            "method": "rank nodes by the output noise-to-signal ratio each adds (FP32 vs quantized activations); keep "
            "the worst (and their input producers) in float: doubling, then bisection, each trial validated",
        },
    }
    return order[:passing], metrics, validation


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
    """Static INT8 with the fewest worst-ranked nodes in float for which ``validate(model)['drop'] <= max_drop``.

    ``validate`` runs a model file on the full validation set (as the pack gate does). Returns
    ``None`` when the budget needs more than ``max_float_fraction`` of the compute nodes in float.
    """
    found = _partial(
        src,
        dst,
        lambda s, d, exclude: q.quantize_static_int8(s, d, calibration, replace(base, nodes_to_exclude=exclude)),
        # Ranked on QDQ whatever the format: QOperator renames the nodes it quantizes.
        lambda s, d: q.quantize_static_int8(s, d, calibration, replace(base, format="qdq", nodes_to_exclude=[])),
        False,
        validate,
        max_drop,
        ranking_feed,
        config or PartialConfig(),
        progress,
    )
    return _result(base, found)


def partial_quantize_dynamic(
    src: Path,
    dst: Path,
    base: q.DynamicInt8Config,
    validate: Callable[[Path], dict],
    max_drop: float,
    ranking_feed: dict[str, np.ndarray],
    config: PartialConfig | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> PartialResult | None:
    """Dynamic INT8 (no calibration) with the fewest worst-ranked nodes in float: how a transformer
    whose full dynamic INT8 misses a tight budget keeps most of its speed-up (measured on this kind of CPU)."""
    found = _partial(
        src,
        dst,
        lambda s, d, exclude: q.quantize_dynamic_int8(s, d, replace(base, nodes_to_exclude=exclude)),
        lambda s, d: q.quantize_dynamic_int8(s, d, replace(base, nodes_to_exclude=[])),
        # Dynamic quantization renames the nodes it replaces but keeps every float tensor's name.
        True,
        validate,
        max_drop,
        ranking_feed,
        config or PartialConfig(),
        progress,
    )
    return _result(base, found)
