"""TensorRT-specific build steps for GPU targets: op support check and optimisation profiles.

TensorRT builds an engine per shape profile; ONNX Runtime's TensorRT provider takes explicit
profiles as ``trt_profile_min_shapes`` / ``opt`` / ``max`` strings (``name:1x3x224x224,...``).
They are derived from the shapes the data actually has and the serving max batch, so the
engine covers exactly what the device will be asked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.onnx_utils import op_counts

# Ops whose outputs are shape tensors: TensorRT computes them (and whatever is computed from them and
# from constants only) at engine build or as shape arithmetic, never as layers on the data.
SHAPE_OPS = frozenset({"Constant", "Shape", "Size"})


def _shape_or_constant_nodes(graph: Any) -> set[int]:
    """Indices of the nodes whose every input is a constant or a shape: folded by ONNX Runtime's and
    TensorRT's constant folding, or evaluated as shape tensors. They are not layers TensorRT must run."""
    static = {init.name for init in graph.initializer} | {""}  # "" is an omitted optional input
    nodes = set()
    for index, node in enumerate(graph.node):  # ONNX graphs are topologically sorted
        if node.op_type in SHAPE_OPS or all(name in static for name in node.input):
            if not any(attr.g.node or attr.graphs for attr in node.attribute):  # If/Loop bodies run on data
                nodes.add(index)
                static.update(node.output)
    return nodes


def layer_op_counts(model_path: Path) -> Counter[str]:
    """Op types (with counts) of the nodes that run on data, inside If/Loop/Scan bodies too."""
    return op_counts(model_path, skip=_shape_or_constant_nodes)


def unsupported_ops(model_path: Path, supported: list[str]) -> dict[str, int]:
    """Op types (with counts) TensorRT will not run; ONNX Runtime places them on CUDA/CPU.

    Constants, shapes and the arithmetic on them are left out: TensorRT folds them or handles them as
    shape tensors, so listing them would only be noise.
    """
    allowed = set(supported)
    return {op: n for op, n in sorted(layer_op_counts(model_path).items()) if op not in allowed}


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def profile_shapes(inputs: dict[str, np.ndarray], dynamic: dict[str, list[int]], max_batch: int) -> dict[str, str]:
    """TensorRT profile strings from observed data shapes.

    ``inputs`` holds the validation arrays (batch first); ``dynamic`` maps an input name to the
    shape with -1 for its dynamic axes. min and opt: batch 1 (edge serving is mostly single
    requests); max: ``max_batch``. Every other dynamic axis keeps the size the data has, and a
    dimension the model fixes, the batch included, keeps its size in all three.
    """
    mins, opts, maxs = [], [], []
    for name, array in inputs.items():
        declared = dynamic[name]
        sample = list(array.shape)
        lo, typical, hi = list(sample), list(sample), list(sample)
        lo[0] = typical[0] = 1
        hi[0] = max_batch
        for axis, dim in enumerate(declared):
            if dim != -1:
                lo[axis] = typical[axis] = hi[axis] = dim
        mins.append(f"{name}:{_dims(lo)}")
        opts.append(f"{name}:{_dims(typical)}")
        maxs.append(f"{name}:{_dims(hi)}")
    return {
        "trt_profile_min_shapes": ",".join(mins),
        "trt_profile_opt_shapes": ",".join(opts),
        "trt_profile_max_shapes": ",".join(maxs),
    }
