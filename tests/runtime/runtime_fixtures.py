"""Tiny ONNX models and bundles built in milliseconds for the runtime tests (imported by conftest)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgebuild.bundle import write_bundle
from edgerun.manifest import GoldenSpec, Manifest, ModelFile, ProviderSpec, TensorSpec

OPSET = 17
W = np.array([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0], [-1.5, 0.5, 1.0], [2.0, 0.0, -0.5]], dtype=np.float32)
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)
LABELS = ["cat", "dog", "bird"]


def _save(graph) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def classifier_onnx(weight: np.ndarray = W, bias: np.ndarray = B, poison: float | None = None) -> bytes:
    """x float32 [-1,4] -> softmax(x @ W + b) = probs [-1,3]; ``poison`` multiplies the output (e.g. NaN)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["soft" if poison is not None else "probs"], axis=-1),
    ]
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    if poison is not None:
        nodes.append(helper.make_node("Mul", ["soft", "P"], ["probs"]))
        inits.append(numpy_helper.from_array(np.array([poison], dtype=np.float32), "P"))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return _save(graph)


def classifier_reference(x: np.ndarray) -> np.ndarray:
    logits = x @ W + B
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def two_input_onnx() -> bytes:
    """input_ids, attention_mask int64 [-1,-1] -> score float32 [-1] = sum(ids * mask) per row."""
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
        helper.make_node("Cast", ["masked"], ["masked_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["masked_f", "axes"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_input",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _save(graph)


def image_onnx() -> bytes:
    """image float32 [-1,1,4,4] -> logits [-1,3]: mean brightness of the top/bottom half and its negation."""
    weight = np.zeros((16, 3), dtype=np.float32)
    weight[:8, 0] = 1.0 / 8  # top half bright -> class 0
    weight[8:, 1] = 1.0 / 8  # bottom half bright -> class 1
    weight[:, 2] = -1.0 / 16  # dark image -> class 2 (through its bias)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["fw"]),
        helper.make_node("Add", ["fw", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([0, 0, 0.1], dtype=np.float32), "B")],
    )
    return _save(graph)


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def model_file(path: str = "model.onnx", precision: str = "fp32", **extra) -> ModelFile:
    return ModelFile(path=path, sha256="", size_bytes=0, precision=precision, opset=OPSET, **extra)


def make_manifest(name: str, inputs, outputs, **extra) -> Manifest:
    extra.setdefault("model", model_file())
    return Manifest(
        format_version=1,
        name=name,
        created="2026-01-01T00:00:00Z",
        inputs=[TensorSpec(**s) for s in inputs],
        outputs=[TensorSpec(**s) for s in outputs],
        **extra,
    )


CLASSIFIER_IO = dict(
    inputs=[{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
    outputs=[{"name": "probs", "dtype": "float32", "shape": [-1, 3]}],
)


def golden_x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)


def classifier_golden() -> bytes:
    x = golden_x()
    return npz_bytes(**{"input:x": x, "output:probs": classifier_reference(x)})


def build_classifier_bundle(
    dest: Path,
    *,
    model: bytes | None = None,
    variants: dict[str, bytes] | None = None,
    golden: bool = True,
    name: str = "clf",
    providers=None,
    sign_key: bytes | None = None,
    archive: bool = False,
    **manifest_extra,
) -> Path:
    files = {"model.onnx": model if model is not None else classifier_onnx(), "labels.txt": "\n".join(LABELS).encode()}
    extra = dict(manifest_extra)
    if golden:
        files["golden.npz"] = classifier_golden()
        extra["golden"] = GoldenSpec(path="golden.npz", atol=1e-4, rtol=1e-3, min_top1_agreement=1.0)
    if variants:
        files.update(variants)
        extra["variants"] = [model_file(path) for path in variants]
    if providers:
        extra["providers"] = [ProviderSpec(name=p) if isinstance(p, str) else p for p in providers]
    manifest = make_manifest(name, **CLASSIFIER_IO, labels="labels.txt", **extra)
    write_bundle(dest, manifest, files, force=True, sign_key=sign_key, archive=archive)
    return dest


def build_two_input_bundle(dest: Path) -> Path:
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    manifest = make_manifest(
        "pair",
        inputs=[
            {"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
            {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]},
        ],
        outputs=[{"name": "score", "dtype": "float32", "shape": [-1]}],
        golden=GoldenSpec(atol=1e-6),
    )
    files = {
        "model.onnx": two_input_onnx(),
        "golden.npz": npz_bytes(
            **{
                "input:input_ids": ids,
                "input:attention_mask": mask,
                "output:score": (ids * mask).sum(1).astype(np.float32),
            }
        ),
    }
    return write_bundle(dest, manifest, files, force=True)


def build_image_bundle(dest: Path) -> Path:
    manifest = make_manifest(
        "img",
        inputs=[{"name": "image", "dtype": "float32", "shape": [-1, 1, 4, 4]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, 3]}],
        preprocess={
            "layout": "NCHW",
            "color": "L",
            "size": [4, 4],
            "scale": 1 / 255,
            "mean": [0.0],
            "std": [1.0],
            "dtype": "float32",
        },
        postprocess={"type": "classification", "softmax": True, "top_k": 2},
        labels="labels.txt",
    )
    files = {"model.onnx": image_onnx(), "labels.txt": b"top\nbottom\ndark\n"}
    return write_bundle(dest, manifest, files, force=True)


def infer_json(x: np.ndarray, **extra) -> dict:
    """A KServe v2 JSON request for the classifier's input ``x``."""
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def post_concurrently(client, rows: list[np.ndarray], model: str = "clf") -> list:
    """POST one JSON infer request per row, all at once from a thread each; responses in row order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(rows)) as workers:
        return list(workers.map(lambda x: client.post(f"/v2/models/{model}/infer", json=infer_json(x)), rows))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scaled_onnx() -> bytes:
    """x float32 [-1,4], scale float32 [] (a scalar) -> y = x * scale [-1,4]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scaled",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return _save(graph)


def build_scaled_bundle(dest: Path) -> Path:
    manifest = make_manifest(
        "scaled",
        inputs=[
            {"name": "x", "dtype": "float32", "shape": [-1, 4]},
            {"name": "scale", "dtype": "float32", "shape": []},
        ],
        outputs=[{"name": "y", "dtype": "float32", "shape": [-1, 4]}],
    )
    return write_bundle(dest, manifest, {"model.onnx": scaled_onnx()}, force=True)


# A "detector" whose yolov8-format output [N, 4+nc, 3] has fixed boxes and class scores that scale
# with the image's mean brightness (a white image scores 1.0, a black one detects nothing):
# anchor 0 and 1 overlap (same class, NMS keeps 0), anchor 2 is class 1 elsewhere.
DETECTOR_SIZE = 64
DETECTOR_LABELS = ["circle", "square"]
DETECTOR_XYWH = np.array([[32, 24, 16, 16], [33, 24, 16, 16], [10, 50, 8, 8]], np.float32)
DETECTOR_CLASS_SCORES = np.array([[1.0, 0.0], [0.9, 0.0], [0.0, 0.5]], np.float32)


def detector_reference(images: np.ndarray) -> np.ndarray:
    brightness = images.reshape(len(images), -1).mean(1).astype(np.float32)[:, None, None]
    boxes = np.concatenate([DETECTOR_XYWH.T, np.zeros((2, 3), np.float32)])[None]
    scores = np.concatenate([np.zeros((4, 3), np.float32), DETECTOR_CLASS_SCORES.T])[None]
    return (boxes + brightness * scores).astype(np.float32)


def detector_onnx(shift: float = 0.0) -> bytes:
    """images float32 [-1,3,64,64] -> output0 [-1,6,3] (see DETECTOR_*); ``shift`` moves every box right."""
    boxes = np.concatenate([DETECTOR_XYWH.T, np.zeros((2, 3), np.float32)])[None].copy()
    boxes[0, 0] += shift
    scores = np.concatenate([np.zeros((4, 3), np.float32), DETECTOR_CLASS_SCORES.T])[None]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape"], ["mean"]),
        helper.make_node("Mul", ["mean", "scores"], ["scaled"]),
        helper.make_node("Add", ["boxes", "scaled"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, DETECTOR_SIZE, DETECTOR_SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 6, 3])],
        [
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
            numpy_helper.from_array(boxes, "boxes"),
            numpy_helper.from_array(scores, "scores"),
        ],
    )
    return _save(graph)


def detector_golden_inputs() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(0.5, 1.0, size=(3, 3, DETECTOR_SIZE, DETECTOR_SIZE)).astype(np.float32)


def build_detector_bundle(
    dest: Path,
    *,
    name: str = "det",
    resize: str = "stretch",
    pad: str = "center",
    fill: int = 114,
    postprocess: dict | None = None,
    model: bytes | None = None,
    golden: GoldenSpec | None = None,
) -> Path:
    x = detector_golden_inputs()
    manifest = make_manifest(
        name,
        inputs=[{"name": "images", "dtype": "float32", "shape": [-1, 3, DETECTOR_SIZE, DETECTOR_SIZE]}],
        outputs=[{"name": "output0", "dtype": "float32", "shape": [-1, 6, 3]}],
        preprocess={
            "size": [DETECTOR_SIZE, DETECTOR_SIZE],
            "resize": resize,
            "pad": pad,
            "fill": fill,
            "scale": 1 / 255,
        },
        postprocess=postprocess or {"type": "detection", "format": "yolov8"},
        task="detection",
        labels="labels.txt",
        golden=golden or GoldenSpec(atol=1e-4),
    )
    files = {
        "model.onnx": model if model is not None else detector_onnx(),
        "labels.txt": "\n".join(DETECTOR_LABELS).encode(),
        "golden.npz": npz_bytes(**{"input:images": x, "output:output0": detector_reference(x)}),
    }
    return write_bundle(dest, manifest, files, force=True)


def serve_after_load(record: dict | None = None):
    """A stand-in for ``edgerun.server.serve`` in CLI tests: binds nothing and returns once the bundles the
    command is loading are loaded (a real server runs meanwhile), recording its arguments in ``record``."""

    def serve(app, **kwargs) -> None:
        startup = kwargs.get("startup")
        if startup is not None:
            startup.finished.wait(60)
        if record is not None:
            record.update(app=app, kwargs=kwargs, **kwargs)

    return serve
