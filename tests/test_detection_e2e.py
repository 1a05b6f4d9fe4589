"""End to end for detection: the trained shapes detector packed with ``--task detect`` and served as boxes,
and a YOLOv8n graph exported by Ultralytics' own exporter packed with its head's tail kept in float.

The shapes detector's numbers are measured here independently of what pack records: each validation
image goes through edgerun's preprocessing, the bundle's model and edgerun's detection decode, and is
scored with COCO mAP (pycocotools) against the YOLO-format labels and against the FP32 model's own boxes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgebuild.examples import shapes

pytestmark = pytest.mark.slow

# Preprocessing the bundles may declare; the detector was trained on all three fits.
STRETCH = {**shapes.PREPROCESS, "resize": "stretch"}
STRETCH.pop("fill")
BOTTOM_RIGHT = {**shapes.PREPROCESS, "pad": "bottom-right"}


def _toml(path: Path, table: dict) -> Path:
    def value(v):
        return json.dumps(v) if not isinstance(v, float) else repr(v)

    path.write_text("[preprocess]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items()))
    return path


def _pack(*args: str, out: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "edgebuild.cli", "pack", *args, "--target", "x86", "-o", str(out)]
        + ["--bench-seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def _read_labels(path: Path, width: int, height: int) -> np.ndarray:
    """A YOLO label file as ``[K, 5]`` ``class, x1, y1, x2, y2`` in image pixels."""
    rows = np.loadtxt(path, ndmin=2, dtype=np.float32).reshape(-1, 5)
    cls, cx, cy, w, h = rows.T
    return np.stack([cls, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """The documented command: ``python -m edgebuild.examples.shapes --write-dataset DIR``."""
    root = tmp_path_factory.mktemp("shapes-data")
    subprocess.run(
        [sys.executable, "-m", "edgebuild.examples.shapes", "--write-dataset", str(root)], check=True, timeout=300
    )
    assert len(list((root / "val" / "images").glob("*.png"))) == shapes.SPLIT_SIZES["val"]
    return root


@pytest.fixture(scope="module")
def auto_bundle(shapes_data, tmp_path_factory) -> Path:
    """Auto quantization, the example's own preprocessing (centre letterbox) from its module."""
    return _pack(
        "edgebuild.examples.shapes:pretrained",
        "--task",
        "detect",
        "--calib-data",
        str(shapes_data / "calib"),
        "--val-data",
        str(shapes_data / "val"),
        out=tmp_path_factory.mktemp("dist-auto"),
    )


@pytest.fixture(scope="module")
def fp32_bundles(shapes_data, tmp_path_factory) -> dict[str, Path]:
    """FP32 bundles that declare stretch and bottom-right letterbox instead of the centre letterbox, and the
    detector with separate box and score outputs (format ``split``)."""
    root = tmp_path_factory.mktemp("dist-fits")
    bundles = {}
    for fit, table in (("stretch", STRETCH), ("bottom-right", BOTTOM_RIGHT)):
        bundles[fit] = _pack(
            "edgebuild.examples.shapes:pretrained",
            "--task",
            "detect",
            "--quantize",
            "none",
            "--preprocess",
            str(_toml(root / f"{fit}.toml", table)),
            "--calib-data",
            str(shapes_data / "calib"),
            "--val-data",
            str(shapes_data / "val"),
            "--name",
            f"shapes-{fit}",
            out=root,
        )
    split = root / "split.toml"
    split.write_text(
        '[postprocess]\nformat = "split"\nboxes_output = "boxes"\nscores_output = "scores"\nbox = "xyxy"\n'
    )
    bundles["split"] = _pack(
        "edgebuild.examples.shapes:pretrained_split",
        "--task",
        "detect",
        "--quantize",
        "none",
        "--postprocess",
        str(split),
        "--calib-data",
        str(shapes_data / "calib"),
        "--val-data",
        str(shapes_data / "val"),
        "--name",
        "shapes-split",
        out=root,
    )
    return bundles


def _score(bundle: Path, data: Path) -> dict[str, float]:
    """COCO mAP against the labels, in original-image pixels, of the bundle's model, plus box agreement
    of the bundle's model with the FP32 PyTorch detector (FP32 boxes at conf >= 0.25 as the truth)."""
    import torch

    from edgebuild.onnx_utils import make_session
    from edgebuild.tasks.coco import BoxLabels, coco_map
    from edgerun.manifest import Manifest
    from edgerun.preprocess import parse_spec, preprocess_image_with_transform
    from edgerun.tasks.detection import DetectionSpec, detect, to_image

    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    spec = DetectionSpec.model_validate(manifest.postprocess)
    preprocess = parse_spec(manifest.preprocess)
    session = make_session(bundle / "model.onnx", threads=2)
    input_name, output_names = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]
    reference = shapes.pretrained()
    packed_on_image, fp32_on_image, truth, packed_raw, fp32_raw = [], [], [], [], []
    for image in sorted((data / "images").glob("*.png")):
        x, transform = preprocess_image_with_transform(image.read_bytes(), preprocess)
        with torch.no_grad():
            fp32_out = [reference(torch.from_numpy(x)).numpy()]
        packed_out = session.run(None, {input_name: x})
        hw = (shapes.INPUT_SIZE, shapes.INPUT_SIZE)
        (packed,) = detect(packed_out, output_names, spec, hw, conf=0.001)
        (fp32,) = detect(fp32_out, output_names, spec, hw, conf=0.001)
        (fp32_confident,) = detect(fp32_out, output_names, spec, hw)
        packed_on_image.append(to_image(packed, transform))
        fp32_on_image.append(to_image(fp32, transform))
        packed_raw.append(packed)
        fp32_raw.append(fp32_confident)
        width, height = transform.original
        labels = _read_labels(data / "labels" / f"{image.stem}.txt", width, height)
        truth.append(BoxLabels(labels[:, 1:], labels[:, 0].astype(np.int64)))

    pseudo = [BoxLabels(d.boxes, d.class_ids) for d in fp32_raw]
    classes = len(shapes.LABELS)
    packed_map = coco_map(truth, packed_on_image, classes)
    fp32_map = coco_map(truth, fp32_on_image, classes)
    agreement = coco_map(pseudo, packed_raw, classes)
    return {
        "packed_map50_95": packed_map["map50_95"],
        "packed_map50": packed_map["map50"],
        "fp32_map50_95": fp32_map["map50_95"],
        "fp32_map50": fp32_map["map50"],
        "agreement_map50_95": agreement["map50_95"],
    }


def test_auto_picks_int8_that_keeps_the_boxes(auto_bundle, shapes_data):
    manifest = json.loads((auto_bundle / "manifest.json").read_text())
    assert manifest["task"] == "detection"
    assert manifest["postprocess"]["format"] == "yolov8"
    assert manifest["model"]["precision"] == "int8", "auto should find an INT8 variant of the shapes detector"
    scores = _score(auto_bundle, shapes_data / "val")
    assert scores["fp32_map50"] >= 0.9, scores  # the example's own claim, through edgerun's preprocessing
    assert scores["agreement_map50_95"] >= 0.95, scores
    assert scores["packed_map50_95"] >= scores["fp32_map50_95"] - 0.01, scores
    assert scores["packed_map50"] >= scores["fp32_map50"] - 0.01, scores


def _predict(bundle: Path, image: bytes, tmp_path: Path) -> dict:
    from fastapi.testclient import TestClient

    from edgerun.loader import LoadOptions
    from edgerun.reload import ModelRepository
    from edgerun.server import ServerConfig, create_app

    repo = ModelRepository(LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1))
    model = repo.load(bundle).name
    with TestClient(create_app(repo, ServerConfig())) as client:
        response = client.post(f"/v1/predict?model={model}", content=image, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def _scene_to_check(data: Path) -> Path:
    """The first validation image that is not square and holds at least three shapes."""
    from PIL import Image

    for image in sorted((data / "images").glob("*.png")):
        with Image.open(image) as opened:
            width, height = opened.size
        if width != height and len((data / "labels" / f"{image.stem}.txt").read_text().splitlines()) >= 3:
            return image
    raise AssertionError("no non-square validation scene with three shapes")


@pytest.mark.parametrize("fit", ["center", "stretch", "bottom-right", "split"])
def test_predict_boxes_match_the_labels_in_image_pixels(fit, auto_bundle, fp32_bundles, shapes_data, tmp_path):
    bundle = auto_bundle if fit == "center" else fp32_bundles[fit]
    preprocess = json.loads((bundle / "manifest.json").read_text())["preprocess"]
    if fit == "stretch":
        assert preprocess["resize"] == "stretch"
    else:  # the split-output model keeps the example's centre letterbox
        assert preprocess["resize"] == "letterbox" and preprocess["pad"] == fit.replace("split", "center")
    image = _scene_to_check(shapes_data / "val")
    from PIL import Image

    with Image.open(image) as opened:
        width, height = opened.size
    labels = _read_labels(shapes_data / "val" / "labels" / f"{image.stem}.txt", width, height)
    answer = _predict(bundle, image.read_bytes(), tmp_path)
    assert answer["image_size"] == [width, height]
    found = answer["detections"]
    unmatched = list(range(len(found)))
    for row in labels:
        label = shapes.LABELS[int(row[0])]
        candidates = [(i, _iou(row[1:], np.array(found[i]["box"]))) for i in unmatched if found[i]["label"] == label]
        assert candidates, f"{fit}: no {label} detected for {row[1:].round(1).tolist()}: {found}"
        best, iou = max(candidates, key=lambda c: c[1])
        assert iou >= 0.7, f"{fit}: {label} {row[1:].round(1).tolist()} best IoU {iou:.2f}: {found[best]}"
        unmatched.remove(best)
    # A second, looser box on a labelled shape is NMS's business (IoU under 0.7); a confident box away from
    # every shape is a false detection.
    strays = [
        found[i]
        for i in unmatched
        if found[i]["score"] >= 0.5 and max(_iou(row[1:], np.array(found[i]["box"])) for row in labels) < 0.3
    ]
    assert not strays, f"{fit}: confident detections away from every shape: {strays}"


# --- Ultralytics YOLOv8n: a real detector architecture (random weights: its boxes mean nothing) -----------------

# Untrained, the head's class biases (Ultralytics' prior of ~1e-5) leave no box at any usable conf;
# zeroed, FP32 scores spread around 0.5 and box agreement has boxes to compare.
EXPORT = """
from ultralytics import YOLO
model = YOLO("yolov8n.yaml")
for branch in model.model.model[-1].cv3:
    branch[-1].bias.data.zero_()
model.export(format="onnx", imgsz={imgsz}, opset=17, simplify=False, dynamic=False)
"""


def export_yolov8n(directory: Path, imgsz: int = 320) -> Path:
    """Ultralytics' own exporter, offline, in its own process (its settings and logging stay out of ours)."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(directory / "ultralytics-config")}
    subprocess.run(
        [sys.executable, "-c", EXPORT.format(imgsz=imgsz)],
        cwd=directory,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return directory / "yolov8n.onnx"


@pytest.fixture(scope="module")
def yolov8n_bundle(shapes_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("yolov8n")
    model = export_yolov8n(root)
    # No --task, --postprocess or --preprocess: the export's metadata says detect, yolov8 and its names.
    return _pack(
        str(model),
        "--quantize",
        "int8",
        # Random weights: box agreement measures nothing here; what is tested is the graph.
        "--max-accuracy-drop",
        "100%",
        "--calib-data",
        str(shapes_data / "calib" / "images"),
        "--val-data",
        str(shapes_data / "val" / "images"),
        "--val-samples",
        "16",
        out=root / "dist",
    )


def _tail(graph, output: str) -> list:
    """The nodes between the last convolution on each path and ``output`` (walked backwards)."""
    producers = {name: node for node in graph.node for name in node.output}
    convs = {"Conv", "QLinearConv", "ConvInteger"}
    seen, stack, tail = set(), [output], []
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in convs:
            continue
        tail.append(node)
        stack.extend(node.input)
    return tail


def test_yolov8n_int8_keeps_the_head_tail_in_float(yolov8n_bundle):
    import onnx

    manifest = json.loads((yolov8n_bundle / "manifest.json").read_text())
    assert manifest["task"] == "detection" and manifest["postprocess"]["format"] == "yolov8"
    # "mixed": the head's tail (its DFL 1x1 Conv included) stays float, so not every compute op is INT8.
    assert manifest["model"]["precision"] in ("int8", "mixed")
    preprocess = manifest["preprocess"]
    assert (preprocess["resize"], preprocess["pad"], preprocess["fill"]) == ("letterbox", "center", 114)
    assert preprocess["size"] == [320, 320]
    labels = (yolov8n_bundle / "labels.txt").read_text().split()
    assert len(labels) == 80, "names come from the Ultralytics metadata"
    graph = onnx.load(str(yolov8n_bundle / "model.onnx")).graph
    producers = {name: node for node in graph.node for name in node.output}
    ops = [node.op_type for node in graph.node]
    assert "QLinearConv" in ops or ops.count("DequantizeLinear") > 0, "the backbone is quantized"
    (output,) = graph.output
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert producers[output.name].op_type == "Concat", "the boxes and scores meet in a float Concat"
    tail = _tail(graph, output.name)
    kinds = {node.op_type for node in tail}
    assert "Sigmoid" in kinds, f"the class scores' Sigmoid is in float: {sorted(kinds)}"
    assert not [k for k in kinds if k.startswith("QLinear")], f"a quantized op in the head's tail: {sorted(kinds)}"
    # Quantize/Dequantize only where the quantized region ends (right after a convolution), none inside the tail.
    for node in tail:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            source = producers.get(node.input[0])
            if node.op_type == "DequantizeLinear" and source is not None and source.op_type == "QuantizeLinear":
                source = producers.get(source.input[0])
            assert source is None or source.op_type in ("Conv", "QLinearConv"), (
                f"{node.op_type} '{node.name}' inside the head's tail, after {source.op_type}"
            )
