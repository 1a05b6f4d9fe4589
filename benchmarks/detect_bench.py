"""Detectors packed with ``--task detect``, side by side in one run.

    python benchmarks/detect_bench.py [--requests 200] [--no-yolo]

- The trained shapes example (``edgebuild.examples.shapes``, 128x128, YOLO-format scenes written by
  ``python -m edgebuild.examples.shapes --write-dataset``), packed with ``auto``: the chosen variant's
  p50 latency vs ORT FP32 at 1 and 2 threads, its box agreement with FP32 (COCO mAP50-95 of its boxes
  against FP32's at conf >= 0.25) and its real mAP drop against the labels (pycocotools).
- A YOLOv8n graph built from ``yolov8n.yaml`` and exported at 640 by Ultralytics' own exporter (needs the
  ``detect-test`` extra; random weights, so speed only), packed head-aware INT8 (``--quantize int8``); its
  task, format, labels and letterbox come from the export's metadata.
- ``/v1/predict`` p50 for a 1280x720 JPEG (decode + letterbox + run + NMS, over HTTP, sequential) vs the
  same steps in-process and vs ``session.run`` alone, for both bundles.

Latencies alternate in rounds (benchmarks/common.py) so machine load hits all alike; compare ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_p50, replace_section
from serve_bench import Server, _env, _free_port, edgerun_command

from edgebuild.examples import shapes

COMMAND = "python benchmarks/detect_bench.py"
# Untrained, the head's class biases (Ultralytics' prior, ~1e-5) leave FP32 no box to agree with; zeroed,
# scores spread around 0.5. Speed is what this graph measures.
YOLO_EXPORT = """
from ultralytics import YOLO
model = YOLO("yolov8n.yaml")
for branch in model.model.model[-1].cv3:
    branch[-1].bias.data.zero_()
model.export(format="onnx", imgsz=640, opset=17, simplify=False, dynamic=False)
"""


def pack(work: Path, *args: str) -> Path:
    """``edgebuild pack`` as a user runs it; the bundle path is the last line of stdout."""
    command = [sys.executable, "-m", "edgebuild.cli", "pack", *args, "--target", "x86", "-o", str(work / "dist")]
    proc = subprocess.run(command + ["--ship-variants", "--force"], capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"pack failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def export_yolov8n(work: Path) -> Path:
    env = {**_env(), "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(work / "ultralytics-config")}
    subprocess.run([sys.executable, "-c", YOLO_EXPORT], cwd=work, env=env, check=True, capture_output=True)
    return work / "yolov8n.onnx"


class Bundle:
    """A packed bundle's chosen model and FP32 variant, with the manifest's pre/post-processing."""

    def __init__(self, path: Path, source: Path | None = None):
        from edgerun.manifest import Manifest
        from edgerun.preprocess import parse_spec
        from edgerun.tasks.detection import DetectionSpec

        self.path = path
        self.manifest = Manifest.model_validate_json((path / "manifest.json").read_text())
        self.chosen = self.manifest.model
        fp32 = [m for m in self.manifest.all_models() if m.precision == "fp32"]
        # A forced --quantize int8 builds no FP32 candidate: the packed ONNX file is then the FP32 reference.
        self.fp32 = fp32[0] if fp32 else self.chosen.model_copy(update={"path": str(source), "precision": "fp32"})
        self.preprocess = parse_spec(self.manifest.preprocess or {})
        self.spec = DetectionSpec.model_validate(self.manifest.postprocess)
        height, width = self.preprocess.size or (0, 0)
        self.input_hw = (height, width)

    def session(self, model, threads: int):
        from edgebuild.onnx_utils import make_session

        return make_session(self.path / model.path, self.chosen.session_options, threads=threads)

    def detect(self, session, x: np.ndarray, conf: float | None = None):
        from edgerun.tasks.detection import detect

        outputs = session.run(None, {session.get_inputs()[0].name: x})
        names = [o.name for o in session.get_outputs()]
        return detect(outputs, names, self.spec, self.input_hw, conf=conf)


def latency_rows(bundle: Bundle, label: str, x: np.ndarray) -> list[str]:
    rows = []
    for threads in (1, 2):
        sessions = {"chosen": bundle.session(bundle.chosen, threads), "fp32": bundle.session(bundle.fp32, threads)}
        runs: dict[str, Callable[[], object]] = {
            name: partial(s.run, None, {s.get_inputs()[0].name: x}) for name, s in sessions.items()
        }
        p50 = interleaved_p50(runs, rounds=5, per_round=50)
        rows.append(
            f"| {label} | {bundle.chosen.path} ({bundle.chosen.precision}) | {threads} | {p50['chosen']:.3f} | "
            f"{p50['fp32']:.3f} | {p50['chosen'] / p50['fp32']:.2f}× |"
        )
    return rows


def box_scores(bundle: Bundle, data: Path) -> dict[str, float]:
    """Box agreement with FP32 and mAP against the labels, for the chosen variant and FP32."""
    from edgebuild.detection_data import yolo_source
    from edgebuild.tasks.coco import BoxLabels, coco_map

    name = bundle.manifest.inputs[0].name
    chosen, fp32 = bundle.session(bundle.chosen, 2), bundle.session(bundle.fp32, 2)
    found, reference, confident, truth = [], [], [], []
    for batch in yolo_source(data, name, "float32", 16, bundle.preprocess)():
        for row in range(len(batch)):
            x = batch.inputs[name][row : row + 1]
            found += bundle.detect(chosen, x, conf=0.001)
            reference += bundle.detect(fp32, x, conf=0.001)
            confident += bundle.detect(fp32, x)
        truth += batch.targets
    pseudo = [BoxLabels(d.boxes, d.class_ids) for d in confident]
    classes = len(shapes.LABELS)
    return {
        "agreement": coco_map(pseudo, found, classes)["map50_95"],
        **{f"chosen_{k}": v for k, v in coco_map(truth, found, classes).items() if k.startswith("map")},
        **{f"fp32_{k}": v for k, v in coco_map(truth, reference, classes).items() if k.startswith("map")},
    }


def jpeg_1280x720() -> bytes:
    """A wide validation scene scaled to 1280x720, as a camera frame would arrive."""
    from PIL import Image

    scene = next(s for s in shapes.scenes("val", 50) if s.image.shape[1] / s.image.shape[0] > 1.5)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).resize((1280, 720), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def predict_rows(bundle: Bundle, label: str, image: bytes, requests: int, work: Path) -> list[str]:
    """HTTP /v1/predict p50 vs the same pipeline in-process vs session.run alone (2 threads)."""
    import httpx

    from edgerun.preprocess import preprocess_image_with_transform
    from edgerun.tasks.detection import to_image

    session = bundle.session(bundle.chosen, 2)
    x, _ = preprocess_image_with_transform(image, bundle.preprocess)

    def pipeline() -> object:
        tensor, transform = preprocess_image_with_transform(image, bundle.preprocess)
        return [to_image(d, transform) for d in bundle.detect(session, tensor)]

    in_process = interleaved_p50(
        {"pipeline": pipeline, "run": partial(session.run, None, {session.get_inputs()[0].name: x})},
        rounds=3,
        per_round=max(20, requests // 3),
    )
    port = _free_port()
    server = Server(edgerun_command(bundle.path, port, work / f"cache-{label}"), f"127.0.0.1:{port}")
    try:
        url = f"http://127.0.0.1:{port}/v1/predict?model={bundle.manifest.name}"
        headers = {"Content-Type": "image/jpeg"}
        samples = []
        with httpx.Client() as client:
            for index in range(requests + 10):
                start = time.perf_counter()
                response = client.post(url, content=image, headers=headers)
                elapsed = (time.perf_counter() - start) * 1000
                response.raise_for_status()
                if index >= 10:
                    samples.append(elapsed)
    finally:
        server.stop()
    http = float(np.percentile(samples, 50))
    return [
        f"| {label} | {http:.2f} | {in_process['pipeline']:.2f} | {in_process['run']:.2f} | "
        f"{http / in_process['pipeline']:.2f}× | {http - in_process['pipeline']:+.2f} |"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential /v1/predict requests per bundle")
    parser.add_argument("--no-yolo", action="store_true", help="skip the Ultralytics YOLOv8n graph")
    args = parser.parse_args()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    image = jpeg_1280x720()
    with tempfile.TemporaryDirectory(prefix="detect-bench-") as tmp:
        work = Path(tmp)
        data = work / "shapes"
        for split in ("calib", "val"):
            shapes.write_dataset(data / split, split)
        example = Bundle(
            pack(
                work,
                "edgebuild.examples.shapes:pretrained",
                "--task",
                "detect",
                "--name",
                "shapes",
                "--calib-data",
                str(data / "calib"),
                "--val-data",
                str(data / "val"),
            )
        )
        bundles = [("shapes 128", example)]
        if not args.no_yolo:
            yolov8n = export_yolov8n(work)
            yolo = Bundle(
                pack(
                    work,
                    str(yolov8n),
                    "--task",
                    "detect",
                    "--quantize",
                    "int8",
                    "--max-accuracy-drop",
                    "100%",  # random weights: only speed is measured
                    "--calib-data",
                    str(data / "calib" / "images"),
                    "--val-data",
                    str(data / "val" / "images"),
                    "--val-samples",
                    "16",
                ),
                source=yolov8n,
            )
            bundles.append(("YOLOv8n 640 (random weights)", yolo))
        latency = [
            "| model | chosen variant | threads | chosen p50 ms | ORT FP32 p50 ms | chosen vs FP32 (lower = faster) |",
            "|---|---|---|---|---|---|",
        ]
        predict = [
            "| model | /v1/predict p50 ms (HTTP) | in-process decode+letterbox+run+NMS p50 ms | session.run p50 ms | "
            "HTTP vs in-process | HTTP overhead ms |",
            "|---|---|---|---|---|---|",
        ]
        for label, bundle in bundles:
            x = np.zeros([1, *(bundle.preprocess.tensor_shape() or [])], dtype=np.float32)
            latency += latency_rows(bundle, label, x)
            predict += predict_rows(bundle, label, image, args.requests, work)
        scores = box_scores(example, data / "val")
    accuracy = [
        "| model | chosen variant | box agreement mAP50-95 vs FP32 | mAP50-95 FP32 → chosen | mAP50 FP32 → chosen | "
        "real mAP50-95 drop (points) |",
        "|---|---|---|---|---|---|",
        f"| shapes 128 | {example.chosen.path} ({example.chosen.precision}) | {scores['agreement']:.4f} | "
        f"{scores['fp32_map50_95']:.4f} → {scores['chosen_map50_95']:.4f} | "
        f"{scores['fp32_map50']:.4f} → {scores['chosen_map50']:.4f} | "
        f"{(scores['fp32_map50_95'] - scores['chosen_map50_95']) * 100:+.2f} |",
    ]
    body = "\n".join(
        [
            f"Command: `{COMMAND}` — batch 1, interleaved rounds; {platform.machine()}, {os.cpu_count()} CPUs "
            f"(shared machine: compare ratios). Goals: chosen ≤ 0.65× FP32 time at 1 thread, box agreement ≥ 0.95, "
            "real mAP drop ≤ 1 point.",
            "",
            *latency,
            "",
            *accuracy,
            "",
            f"`/v1/predict` with a 1280x720 JPEG, {args.requests} sequential requests (httpx, same host), edgerun "
            "with its default flags (the self-benchmark picks the layout); in-process with 2 threads.",
            "",
            *predict,
        ]
    )
    print(body)
    replace_section("Detection (detect_bench)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
