"""A detector's head tail, read from the graph: the nodes between the last convolutions and the outputs.

Quantizing them breaks detectors without moving raw-output cosine: one uint8 scale over the final
Concat of box pixels (0..640) and class probabilities (0..1) leaves the scores two distinct values
(a YOLOv8n INT8 variant at cosine 0.9995 had mAP50 0.20 against FP32's own boxes; with the tail in
float, mAP50 0.994 at 0.61x FP32 time). The tail holds the decode (grid/stride Mul/Add), the
distribution (DFL: Softmax then a 1x1 single-channel Conv with fixed weights), Sigmoid/Softmax and
the final Concat/Reshape/Transpose.

The walk starts at every graph output and goes up through producers, stopping at a compute node
(Conv, MatMul, Gemm, ...): every node passed on the way is the tail. A DFL Conv (one output
channel, 1x1, reading a Softmax) is not where learned features end: the walk goes through it.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgebuild.onnx_utils import COMPUTE_OPS

# Ops that reshape or route a tensor without computing on it: the DFL's Softmax may sit behind them.
_ROUTING = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Split", "Slice"})


_SHAPE_ONLY = frozenset({"Shape", "Size"})


def _initializer_shapes(graph) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in graph.initializer}


def _is_dfl(node, producers: dict, weights: dict[str, list[int]]) -> bool:
    """A 1x1 Conv with a single output channel whose input comes (through routing ops) from a Softmax."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    shape = weights.get(node.input[1])
    if shape is None or len(shape) != 4 or shape[0] != 1 or shape[2:] != [1, 1]:
        return False
    tensor = node.input[0]
    for _ in range(4):
        producer = producers.get(tensor)
        if producer is None:
            return False
        if producer.op_type == "Softmax":
            return True
        if producer.op_type not in _ROUTING or not producer.input:
            return False
        tensor = producer.input[0]
    return False


def head_tail_nodes(model) -> list[str]:
    """Names of the nodes after the last compute node on every output path, in graph order.

    ``model`` is an ``onnx.ModelProto``. A graph whose outputs come straight from a compute node has
    no tail (an empty list). Unnamed nodes cannot be named in ``nodes_to_exclude`` and are left out.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    weights = _initializer_shapes(graph)
    tail: set[int] = set()
    pending = [o.name for o in graph.output]
    seen: set[str] = set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = producers.get(tensor)
        if node is None or id(node) in tail:
            continue
        if node.op_type in COMPUTE_OPS and not _is_dfl(node, producers, weights):
            continue  # the last learned layer on this path: it and everything above it are quantized
        tail.add(id(node))
        if node.op_type not in _SHAPE_ONLY:  # a Shape reads only the size of its input, not its values
            pending.extend(name for name in node.input if name)
    return [node.name for node in graph.node if id(node) in tail and node.name]


def describe(nodes: Iterable[str], model) -> dict[str, int]:
    """How many tail nodes of each op type (for the manifest and the report)."""
    names = set(nodes)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in names:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
