"""Detection on the builder side: the head tail read from the graph, validation by boxes, the
score-collapse guard, detection data, Ultralytics metadata, fixed-batch partial quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from detmodels import (
    CLASSES,
    SIZE,
    images,
    tiny_yolo,
    write_scene_folder,
    write_self_labelled_folder,
    write_tiny_yolo_onnx,
)

from edgebuild.candidates import Candidate, apply_budget
from edgebuild.data import Batch, open_data
from edgebuild.errors import UsageError
from edgebuild.pack import PackOptions, pack
from edgebuild.sources import InputSpec
from edgebuild.tasks import TaskContext, get_task
from edgebuild.tasks.coco import BoxLabels, coco_map
from edgebuild.tasks.head import head_tail_nodes
from edgebuild.validate import evaluate
from edgerun.preprocess import parse_spec
from edgerun.tasks.detection import Detections

FAST = {"bench_seconds": 0.02}
LETTERBOX = parse_spec({"preset": "unit", "resize": "letterbox", "fill": 114})


def _reference(n=12) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [tiny_yolo()(torch.from_numpy(images(n))).numpy()]


def _metric(reference, targets=None):
    context = TaskContext(
        requested_metric=None,
        val=Batch({"images": images(len(reference[0]))}, targets=targets),
        reference=reference,
        output_names=["output0"],
        postprocess={"type": "detection", "format": "yolov8", "strides": [8, 16]},
        input_hw=(SIZE, SIZE),
    )
    return get_task("detect").choose_metric(context)


def test_head_tail_is_everything_after_the_last_convs_including_the_dfl(tmp_path):
    model = onnx.load(str(write_tiny_yolo_onnx(tmp_path / "det.onnx")))
    tail = set(head_tail_nodes(model))
    ops = {n.name: n.op_type for n in model.graph.node}
    tail_ops = {ops[n] for n in tail}
    assert {"Sigmoid", "Softmax", "Concat", "Mul", "Sub", "Add"} <= tail_ops
    output_producer = next(n for n in model.graph.node if "output0" in n.output)
    assert output_producer.name in tail and output_producer.op_type == "Concat"
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    dfl = [n.name for n in convs if n.name in tail]
    assert len(dfl) == 1 and "dfl" in dfl[0]  # the DFL's fixed 1x1 conv is part of the tail
    learned = [n.name for n in convs if n.name not in tail]
    assert len(learned) == 8  # stem x2, down x2, box x2, cls x2: quantized
    relus = [n.name for n in model.graph.node if n.op_type == "Relu"]
    assert not tail & set(relus)  # nothing of the backbone


def test_int8_with_float_head_keeps_the_tail_float_in_the_quantized_graph(tmp_path):
    from edgebuild.passes import quantize as q

    src = write_tiny_yolo_onnx(tmp_path / "det.onnx")
    np.savez(tmp_path / "calib.npz", x=images(8))
    calibration = open_data(
        str(tmp_path / "calib.npz"), [InputSpec("images", (-1, 3, SIZE, SIZE), "float32")], purpose="calibration"
    )
    dst = tmp_path / "int8.onnx"
    metrics = q.quantize_static_int8(src, dst, calibration, q.StaticInt8Config(float_head=True))
    assert metrics["float_head"]["nodes"] > 10 and metrics["float_head"]["ops"]["Sigmoid"] == 1
    graph = onnx.load(str(dst)).graph
    quantized_inputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    tail_nodes = [n for n in graph.node if n.op_type in ("Sigmoid", "Softmax")]
    assert tail_nodes and not any(out in quantized_inputs for n in tail_nodes for out in n.output)
    final = next(n for n in graph.node if "output0" in n.output)
    assert final.op_type == "Concat" and not any(i in quantized_inputs for i in final.input)
    # Without it, the final Concat's inputs are quantized: one scale over box pixels and probabilities.
    plain = tmp_path / "plain.onnx"
    q.quantize_static_int8(src, plain, calibration, q.StaticInt8Config())
    plain_graph = onnx.load(str(plain)).graph
    producers = {o: n for n in plain_graph.node for o in n.output}
    assert producers["output0"].op_type == "DequantizeLinear"


def test_a_score_collapsed_variant_is_refused_before_map():
    reference = _reference()
    metric = _metric(reference)
    collapsed = reference[0].copy()
    # What one uint8 scale over box pixels and probabilities does: the class scores take two values.
    collapsed[:, 4:] = np.where(collapsed[:, 4:] > 0.5, 1.268, 0.0)
    bad = evaluate(metric, reference, [collapsed], None, ["output0"])
    assert bad["refused"].startswith("score collapse") and bad["scores"]["distinct"] <= 2
    noisy = reference[0] + np.random.default_rng(0).normal(0, 1e-3, reference[0].shape).astype(np.float32)
    good = evaluate(metric, reference, [noisy], None, ["output0"])
    assert "refused" not in good and good["box_agreement"] > 0.95 and good["reference"] == pytest.approx(1.0)
    here = Path(__file__)  # any existing file: the candidates count as built
    candidates = [Candidate("bad", "int8", here, validation=bad), Candidate("good", "int8", here, validation=good)]
    apply_budget(candidates, 1.0)  # a budget that lets any mAP through: the guard still refuses
    assert [c.within_budget for c in candidates] == [False, True]


def test_box_agreement_without_labels_and_map_with_labels():
    reference = _reference()
    agreement = _metric(reference)
    assert agreement.name == "box-agreement"
    shifted = reference[0].copy()
    shifted[:, 0] += 6.0  # every box moves 6 px (of 32): agreement falls, far below the budget
    numbers = evaluate(agreement, reference, [shifted], None)
    assert numbers["box_agreement"] < 0.5 and numbers["drop"] > 0.5
    truth = [BoxLabels(d.boxes, d.class_ids) for d in agreement.decode(reference, None, 0.25)]
    labelled = _metric(reference, targets=truth)
    assert labelled.name == "map50-95"
    exact = evaluate(labelled, reference, reference, None)
    assert exact["reference"] == pytest.approx(1.0) and exact["map50"] == pytest.approx(1.0)


def test_coco_map_scores_perfect_and_missed_boxes():
    truth = [BoxLabels(np.array([[2, 2, 12, 12]], np.float32), np.array([1]))]
    found = [Detections(np.array([[2, 2, 12, 12]], np.float32), np.array([0.9], np.float32), np.array([1]))]
    assert coco_map(truth, found, CLASSES)["map50_95"] == pytest.approx(1.0)
    off = [Detections(np.array([[12, 12, 22, 22]], np.float32), np.array([0.9], np.float32), np.array([1]))]
    assert coco_map(truth, off, CLASSES)["map50"] == 0.0
    wrong_class = [Detections(found[0].boxes, found[0].scores, np.array([2]))]
    assert coco_map(truth, wrong_class, CLASSES)["map50"] == 0.0


def _spec():
    return [InputSpec("images", (-1, 3, SIZE, SIZE), "float32")]


def test_yolo_folder_labels_land_where_the_letterbox_puts_the_image(tmp_path):
    root = write_scene_folder(tmp_path / "scenes", n=3, size=(48, 40))
    batch = open_data(str(root), _spec(), purpose="validation", preprocess=LETTERBOX, task="detection").collect()
    assert batch.inputs["images"].shape == (3, 3, SIZE, SIZE) and len(batch.targets) == 3
    cls, cx, cy, w, h = map(float, (root / "labels" / "scene00.txt").read_text().split())
    inner = round(40 * min(SIZE / 48, SIZE / 40))  # letterbox: 48x40 -> 32x27, centred with 2 px above
    pad_y = (SIZE - inner) // 2
    expected = [(cx - w / 2) * 48 * SIZE / 48, (cy - h / 2) * 40 * inner / 40 + pad_y]
    assert batch.targets[0].class_ids.tolist() == [int(cls)]
    assert batch.targets[0].boxes[0, :2] == pytest.approx(expected, abs=1e-3)


def test_coco_json_and_flat_folder_are_detection_data(tmp_path):
    root = write_scene_folder(tmp_path / "scenes", n=3, size=(48, 40))
    yolo = open_data(str(root), _spec(), purpose="validation", preprocess=LETTERBOX, task="detection").collect()
    images_, annotations = [], []
    for i, path in enumerate(sorted((root / "images").iterdir())):
        images_.append({"id": i + 1, "file_name": path.name, "width": 48, "height": 40})
        cls, cx, cy, w, h = map(float, (root / "labels" / f"{path.stem}.txt").read_text().split())
        bbox = [(cx - w / 2) * 48, (cy - h / 2) * 40, w * 48, h * 40]
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": int(cls) + 10, "bbox": bbox, "iscrowd": 0})
    categories = [{"id": 10 + c, "name": name} for c, name in enumerate(["circle", "square", "triangle"])]
    coco = root / "images" / "instances.json"
    coco.write_text(json.dumps({"images": images_, "annotations": annotations, "categories": categories}))
    source = open_data(str(coco), _spec(), purpose="validation", preprocess=LETTERBOX, task="detection")
    batch = source.collect()
    assert source.classes == ["circle", "square", "triangle"]
    for a, b in zip(batch.targets, yolo.targets):
        assert a.class_ids.tolist() == b.class_ids.tolist()
        assert a.boxes == pytest.approx(b.boxes, abs=1e-3)
    flat = write_scene_folder(tmp_path / "flat", n=2, labels=False)
    unlabelled = open_data(str(flat), _spec(), purpose="validation", preprocess=LETTERBOX, task="detection").collect()
    assert len(unlabelled) == 2 and unlabelled.targets is None
    with pytest.raises(UsageError, match="--task detect"):
        open_data(str(root), _spec(), purpose="validation", preprocess=LETTERBOX)
    result = pack(
        PackOptions(
            model="detmodels:tiny_yolo", output_dir=tmp_path / "out", val_data=str(coco), quantize="none", **FAST
        ),
        progress=lambda message: None,
    )
    assert result.manifest.labels == "labels.txt"
    assert (result.bundle / "labels.txt").read_text().split() == ["circle", "square", "triangle"]


def test_ultralytics_metadata_declares_task_labels_format_and_letterbox(tmp_path):
    path = write_tiny_yolo_onnx(tmp_path / "yolo.onnx", batch=1)
    model = onnx.load(str(path))
    for key, value in {
        "task": "detect",
        "names": "{0: 'circle', 1: 'square', 2: 'triangle'}",
        "imgsz": f"[{SIZE}, {SIZE}]",
        "stride": "16",
        "end2end": "False",
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    scenes = write_self_labelled_folder(tmp_path / "scenes", n=6)
    result = pack(
        PackOptions(
            model=str(path),
            output_dir=tmp_path / "out",
            val_data=str(scenes),
            calib_data=str(scenes),
            quantize="none",
            **FAST,
        ),
        progress=lambda message: None,
    )
    manifest = result.manifest
    assert manifest.task == "detection" and manifest.postprocess["format"] == "yolov8"
    assert manifest.preprocess["resize"] == "letterbox" and manifest.preprocess["fill"] == 114
    assert (result.bundle / "labels.txt").read_text().split() == ["circle", "square", "triangle"]
    assert manifest.validation.metric == "map50-95" and manifest.validation.reference > 0.9
    recorded = manifest.validation.model_dump()
    assert recorded["map50"] > 0.9 and recorded["box_agreement"] == pytest.approx(1.0)
    assert "report-detections.png" in manifest.report and "report-detections.png" in manifest.files
    assert "](report-detections.png)" in (result.bundle / "report.md").read_text()
    from PIL import Image

    with Image.open(result.bundle / "report-detections.png") as picture:
        assert picture.width > 2 * SIZE  # two panels, scaled up


def test_labels_the_fp32_detector_cannot_score_switch_to_box_agreement_loudly(tmp_path):
    scenes = write_scene_folder(tmp_path / "scenes", n=6)  # random boxes: the detector never saw them
    said: list[str] = []
    result = pack(
        PackOptions(
            model="detmodels:tiny_yolo",
            output_dir=tmp_path / "out",
            val_data=str(scenes),
            quantize="none",
            **FAST,
        ),
        progress=said.append,
    )
    assert result.manifest.validation.metric == "box-agreement"
    assert any(line.startswith("WARNING: the FP32 model scores mAP50") for line in said)
    assert result.manifest.validation.max_accuracy_drop == 0.05  # box agreement's default budget


def test_fixed_batch_detector_gets_calibration_fallbacks_and_partial_quantization(tmp_path):
    path = write_tiny_yolo_onnx(tmp_path / "fixed.onnx", batch=1)
    data = tmp_path / "x.npz"
    np.savez(data, x=images(24))
    result = pack(
        PackOptions(
            model=str(path),
            output_dir=tmp_path / "out",
            calib_data=str(data),
            val_data=str(data),
            task="detect",
            postprocess={"format": "yolov8", "strides": [8, 16]},
            metric="cosine",  # a budget no INT8 variant meets, so every fallback runs
            max_accuracy_drop=0.0,
            **FAST,
        ),
        progress=lambda message: None,
    )
    by_name = {c.name: c for c in result.candidates}
    fallbacks = [
        c for c in result.candidates if c.metrics.get("calibration", {}).get("method") in ("percentile", "entropy")
    ]
    assert {c.metrics["calibration"]["method"] for c in fallbacks} == {"percentile", "entropy"}
    assert all(c.metrics["calibration"]["feeds_per_call"] == 4 for c in fallbacks)
    assert all(c.metrics["calibration"]["peak_rss_mb"] > 0 for c in fallbacks)
    partial = by_name["int8-partial"]
    assert partial.error is None or partial.error.startswith("budget not met"), partial.error
    assert result.chosen.name == "fp32"


def pack_blank_images(tmp_path, model: str, said: list[str]):
    """Pack ``model`` from blank images with a serving threshold (0.99) no box reaches."""
    np.savez(tmp_path / "blank.npz", x=np.zeros((4, 3, SIZE, SIZE), np.float32))
    return pack(
        PackOptions(
            model=model,
            output_dir=tmp_path / "out",
            val_data=str(tmp_path / "blank.npz"),
            calib_data=str(tmp_path / "blank.npz"),
            postprocess={"format": "yolov8", "strides": [8, 16], "conf": 0.99},
            **FAST,
        ),
        progress=said.append,
    )


def test_box_agreement_with_nothing_detected_is_exit_2_before_any_candidate_is_built(tmp_path):
    said: list[str] = []
    with pytest.raises(UsageError, match="finds no box at conf >= 0.99"):
        pack_blank_images(tmp_path, "detmodels:silent_yolo", said)
    assert not any("quantize: building" in line for line in said)
    assert not (tmp_path / "out").exists()


def test_no_box_at_the_serving_threshold_is_judged_at_fp32s_own_score_level_and_said_loudly(tmp_path):
    """An untrained detector (no box at conf 0.99 here) packs for its speed, with a warning that its boxes
    are only compared with FP32's, at half FP32's best score."""
    said: list[str] = []
    result = pack_blank_images(tmp_path, "detmodels:tiny_yolo", said)
    assert any("WARNING: the FP32 model finds no box at conf >= 0.99" in line for line in said)
    validation = result.manifest.validation
    assert validation is not None and validation.metric == "box-agreement"
    assert "FP32's own score level" in (validation.metric_reason or "")
    assert (
        result.manifest.postprocess is not None and result.manifest.postprocess["conf"] == 0.99
    )  # serving keeps its own


def test_recipe_task_and_postprocess_table_and_the_cli_flags(tmp_path):
    from click.testing import CliRunner

    from edgebuild.cli import main
    from edgebuild.recipe import load_recipe, pack_options

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'task = "detect"\n[postprocess]\nformat = "yolov8"\nstrides = [8, 16]\nconf = 0.3\n'
        "[quantize]\nfloat_head = false\n"
    )
    options = pack_options(load_recipe(recipe))
    assert options.task == "detect" and options.postprocess["conf"] == 0.3 and options.head_in_float is False
    scenes = write_self_labelled_folder(tmp_path / "scenes", n=4)
    onnx_path = write_tiny_yolo_onnx(tmp_path / "plain.onnx")  # no metadata: the flags declare it
    result = CliRunner().invoke(
        main,
        ["pack", str(onnx_path), "--task", "detect", "--postprocess", "yolov8", "--val-data", str(scenes)]
        + ["--quantize", "none", "-o", str(tmp_path / "out"), "--bench-seconds", "0.02"],
    )
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"] == "detection" and manifest["postprocess"]["format"] == "yolov8"
    assert manifest["validation"]["metric"] == "map50-95"
    bad = CliRunner().invoke(main, ["pack", str(onnx_path), "--task", "segment", "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "--task" in bad.output
    yolox = CliRunner().invoke(
        main,
        ["pack", str(onnx_path), "--task", "detect", "--postprocess", "ssd", "-o", str(tmp_path / "o3")],
    )
    assert yolox.exit_code == 2 and "neither a detection preset" in yolox.output


def test_labels_that_are_not_the_heads_classes_exit_2(tmp_path):
    np.savez(tmp_path / "x.npz", x=images(4))
    with pytest.raises(UsageError, match="2 labels given but the detection head has 3 classes"):
        pack(
            PackOptions(
                model="detmodels:tiny_yolo",
                output_dir=tmp_path / "out",
                val_data=str(tmp_path / "x.npz"),
                labels=["a", "b"],
                quantize="none",
                **FAST,
            ),
            progress=lambda message: None,
        )


def test_callable_data_with_box_targets_is_labelled_detection_data():
    source = open_data("detmodels:self_labelled_batches", _spec(), purpose="validation", task="detection")
    batch = source.collect()
    assert len(batch.targets) == 8 and batch.labels is None
    metric = _metric(_reference(8), targets=batch.targets)
    assert metric.name == "map50-95"
    assert evaluate(metric, _reference(8), _reference(8), None)["reference"] == pytest.approx(1.0)


def test_int8_with_the_head_quantized_collapses_scores_at_high_cosine_and_is_refused(tmp_path):
    """The trap a raw-output cosine never sees: one uint8 scale over the final Concat of box pixels and
    probabilities. Quantizing the head leaves the scores one value (refused, box agreement 0) at cosine
    0.9999; keeping the head tail in float (the default) ships INT8 with the boxes intact."""
    from edgebuild.errors import AccuracyBudgetError

    scenes = write_scene_folder(tmp_path / "scenes", n=8)
    common = dict(
        model="detmodels:tiny_yolo",
        calib_data=str(scenes / "images"),
        val_data=str(scenes / "images"),
        quantize="int8",
        partial_quantization=False,
        calib_method="minmax",
        **FAST,
    )
    with pytest.raises(AccuracyBudgetError) as refused:
        pack(PackOptions(output_dir=tmp_path / "a", head_in_float=False, **common), progress=lambda message: None)
    report = refused.value.report_path.read_text()
    assert "**refused**" in report and "| 1 (" in report  # one distinct score value left
    result = pack(PackOptions(output_dir=tmp_path / "b", **common), progress=lambda message: None)
    chosen = result.chosen
    assert chosen.metrics["float_head"]["nodes"] > 10 and "refused" not in chosen.validation
    assert chosen.validation["box_agreement"] > 0.95 and chosen.validation["scores"]["distinct"] >= 8
