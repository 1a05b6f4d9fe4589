"""Decode + NMS on the device: edgerun's numpy path vs an ONNX NonMaxSuppression node run by ONNX Runtime.

The input is a yolov8-shaped head ``[1, 84, 8400]`` (640x640, 80 classes) made to look like a real
scene: 12 objects, each seen by a few dozen neighbouring anchors with jittered boxes and high scores,
every other anchor with the low, long-tailed scores a trained head gives background. Timed at the
serving threshold (conf 0.25) and at the builder's validation threshold (conf 0.001).

    python benchmarks/nms_bench.py            # prints the table and writes its BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_p50, replace_section

from edgerun.tasks.detection import Detections, DetectionSpec, detect

ANCHORS, CLASSES, SIZE = 8400, 80, 640


def scene_head(seed: int = 0, objects: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xywh = np.stack(
        [
            rng.uniform(0, SIZE, ANCHORS),
            rng.uniform(0, SIZE, ANCHORS),
            rng.uniform(4, 200, ANCHORS),
            rng.uniform(4, 200, ANCHORS),
        ]
    )
    scores = rng.beta(0.3, 60.0, size=(CLASSES, ANCHORS))  # background: mostly < 0.01, a long tail
    for _ in range(objects):
        centre, size, cls = rng.uniform(80, 560, 2), rng.uniform(30, 250, 2), rng.integers(CLASSES)
        seen = rng.choice(ANCHORS, size=40, replace=False)
        xywh[:2, seen] = centre[:, None] + rng.normal(0, 4, (2, 40))
        xywh[2:, seen] = size[:, None] * rng.uniform(0.85, 1.15, (2, 40))
        scores[cls, seen] = rng.uniform(0.3, 0.95, 40)
    return np.concatenate([xywh, scores]).astype(np.float32)[None]


def onnx_nms_session(conf: float, iou: float, max_det: int, threads: int):
    """The same decode as a graph: split the head, NonMaxSuppression per class (centre boxes), as an
    exporter would append it after the model."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    ints = {"starts_b": 0, "ends_b": 4, "starts_s": 4, "ends_s": 4 + CLASSES, "axis": 1, "max_out": max_det}
    floats = {"iou": iou, "conf": conf}
    inits = [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in ints.items()]
    inits += [numpy_helper.from_array(np.array([v], np.float32), k) for k, v in floats.items()]
    nodes = [
        helper.make_node("Slice", ["head", "starts_b", "ends_b", "axis"], ["boxes_t"]),
        helper.make_node("Transpose", ["boxes_t"], ["boxes"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["head", "starts_s", "ends_s", "axis"], ["scores"]),
        helper.make_node(
            "NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "conf"], ["selected"], center_point_box=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "nms",
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, [1, 4 + CLASSES, ANCHORS])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, ["K", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    head = scene_head()
    spec = DetectionSpec()
    rows = []
    for conf in (0.25, 0.001):
        session = onnx_nms_session(conf, spec.iou, spec.max_det, args.threads)

        def run_numpy(conf: float = conf) -> list[Detections]:
            return detect([head], ["output0"], spec, (SIZE, SIZE), conf=conf)

        def run_onnx(session=session) -> np.ndarray:
            selected = session.run(None, {"head": head})[0]
            # what the graph's answer still needs on the host: the rows, best first, max_det of them
            scores = head[0, 4 + selected[:, 1], selected[:, 2]]
            return selected[np.argsort(-scores)[: spec.max_det]]

        (found,) = run_numpy()
        candidates = int((head[0, 4:].max(0) >= conf).sum())
        kept_onnx = len(run_onnx())
        p50 = interleaved_p50({"numpy": run_numpy, "onnx": run_onnx}, rounds=5, per_round=40)
        rows.append((conf, candidates, len(found), kept_onnx, p50["numpy"], p50["onnx"]))
    lines = [
        f"Command: `python benchmarks/nms_bench.py` — a yolov8-shaped head [1, 84, 8400] (640x640, 80 classes, "
        f"12 objects), p50 of interleaved rounds, ONNX Runtime {args.threads} thread(s); x86_64, "
        f"{os.cpu_count()} cores shared.",
        "",
        "| conf | candidates ≥ conf | boxes kept (numpy) | rows kept (ONNX NMS) | numpy decode+NMS ms | ONNX NonMaxSuppression ms | numpy vs ONNX |",
        "|---|---|---|---|---|---|---|",
    ]
    for conf, candidates, kept, kept_onnx, numpy_ms, onnx_ms in rows:
        lines.append(
            f"| {conf:g} | {candidates} | {kept} | {kept_onnx} | {numpy_ms:.3f} | {onnx_ms:.3f} | {numpy_ms / onnx_ms:.2f}× |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section("Detection decode + NMS (numpy vs ONNX NonMaxSuppression)", table)


if __name__ == "__main__":
    main()
