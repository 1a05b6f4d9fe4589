"""Detection decode + NMS: each preset turns a hand-built raw tensor into known boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from runtime_fixtures import CLASSIFIER_IO, make_manifest

from edgerun.manifest import Manifest
from edgerun.tasks.detection import Detections, DetectionSpec, detect, nms, parse_detection_spec

# Four candidates, two classes, xywh centre boxes in input pixels:
# A best of class 0; B overlaps A (IoU 0.82), same class; C = B's box but class 1; D below conf.
XYWH = np.array([[50, 50, 20, 20], [52, 50, 20, 20], [52, 50, 20, 20], [150, 150, 10, 10]], np.float32)
CLASS_SCORES = np.array([[0.9, 0.0], [0.8, 0.1], [0.05, 0.7], [0.0, 0.1]], np.float32)
A_XYXY, C_XYXY = [40, 40, 60, 60], [42, 40, 62, 60]
HW = (200, 200)


def spec(**values) -> DetectionSpec:
    return DetectionSpec.model_validate(values)


def yolov8_tensor() -> np.ndarray:
    return np.concatenate([XYWH, CLASS_SCORES], axis=1).T[None]  # [1, 4+nc, N]


def assert_found(found: Detections, boxes, scores, classes) -> None:
    np.testing.assert_allclose(found.boxes, np.asarray(boxes, np.float32).reshape(-1, 4), atol=1e-4)
    np.testing.assert_allclose(found.scores, scores, atol=1e-6)
    np.testing.assert_array_equal(found.class_ids, classes)
    assert found.boxes.dtype == np.float32 and found.scores.dtype == np.float32 and found.class_ids.dtype == np.int64


def test_yolov8_decodes_and_suppresses_within_each_class():
    (found,) = detect([yolov8_tensor()], ["output0"], spec(format="yolov8"), HW)
    assert_found(found, [A_XYXY, C_XYXY], [0.9, 0.7], [0, 1])


def test_class_agnostic_nms_lets_a_box_suppress_another_class():
    (found,) = detect([yolov8_tensor()], ["output0"], spec(format="yolov8", class_agnostic=True), HW)
    assert_found(found, [A_XYXY], [0.9], [0])


def test_yolov5_multiplies_objectness_into_the_class_scores():
    objectness = np.array([[1.0], [1.0], [0.5], [1.0]], np.float32)
    head = np.concatenate([XYWH, objectness, CLASS_SCORES], axis=1)[None]  # [1, N, 5+nc]
    (found,) = detect([head], ["output"], spec(format="yolov5"), HW)
    assert_found(found, [A_XYXY, C_XYXY], [0.9, 0.35], [0, 1])
    (strict,) = detect([head], ["output"], spec(format="yolov5", conf=0.4), HW)
    assert_found(strict, [A_XYXY], [0.9], [0])


def test_yolox_decodes_its_grid_and_strides():
    hw = (64, 64)  # stride 8: 8x8 cells, 16: 4x4, 32: 2x2 -> 84 rows
    head = np.zeros((1, 84, 7), np.float32)
    # stride-8 cell x=3, y=2 (row 2*8+3): centre offset 0.5, size exp(log 2) cells
    head[0, 19] = [0.5, 0.5, math.log(2), math.log(2), 0.8, 1.0, 0.0]
    # stride-32 cell x=1, y=1 (row 64+16+3): no offset, one cell wide, class 1
    head[0, 83] = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 1.0]
    (found,) = detect([head], ["output"], spec(format="yolox"), hw)
    assert_found(found, [[16, 16, 48, 48], [20, 12, 36, 28]], [0.9, 0.8], [1, 0])


def test_yolox_grid_that_does_not_fit_the_output_names_the_strides():
    with pytest.raises(ValueError, match="strides"):
        detect([np.zeros((1, 80, 7), np.float32)], ["output"], spec(format="yolox"), (64, 64))


def test_end2end_rows_are_taken_as_they_are():
    # the graph did NMS: two overlapping same-class boxes both stay; the threshold and count still apply
    rows = np.array(
        [[40, 40, 60, 60, 0.9, 0], [42, 40, 62, 60, 0.8, 0], [0, 0, 10, 10, 0.3, 2], [0, 0, 0, 0, 0.0, 0]],
        np.float32,
    )[None]
    (found,) = detect([rows], ["output0"], spec(format="end2end"), HW)
    assert_found(found, [A_XYXY, C_XYXY, [0, 0, 10, 10]], [0.9, 0.8, 0.3], [0, 0, 2])
    (top,) = detect([rows], ["output0"], spec(format="end2end"), HW, conf=0.5, max_det=1)
    assert_found(top, [A_XYXY], [0.9], [0])


@pytest.mark.parametrize("box", ["xywh", "xyxy"])
def test_split_reads_the_named_outputs(box):
    xyxy = np.concatenate([XYWH[:, :2] - XYWH[:, 2:] / 2, XYWH[:, :2] + XYWH[:, 2:] / 2], axis=1)
    boxes = (XYWH if box == "xywh" else xyxy)[None]
    outputs = [np.zeros((1, 3), np.float32), CLASS_SCORES[None], boxes]  # an unrelated output first
    split = spec(format="split", box=box, boxes_output="bbox", scores_output="cls")
    (found,) = detect(outputs, ["extra", "cls", "bbox"], split, HW)
    assert_found(found, [A_XYXY, C_XYXY], [0.9, 0.7], [0, 1])


def test_split_without_output_names_is_refused_naming_the_keys():
    with pytest.raises(ValueError, match="boxes_output and scores_output"):
        parse_detection_spec({"type": "detection", "format": "split"})


def test_a_missing_named_output_is_named():
    split = spec(format="split", boxes_output="bbox", scores_output="cls")
    with pytest.raises(ValueError, match="boxes_output 'bbox' is not an output"):
        detect([CLASS_SCORES[None]], ["cls"], split, HW)


def test_normalized_coordinates_scale_to_the_input_size():
    head = yolov8_tensor().copy()
    head[0, [0, 2]] /= 400.0  # x, w as fractions of a 400-wide input
    head[0, [1, 3]] /= 100.0  # y, h as fractions of a 100-high input
    (found,) = detect([head], ["output0"], spec(normalized=True), (100, 400))
    assert_found(found, [A_XYXY, C_XYXY], [0.9, 0.7], [0, 1])


def test_num_classes_ignores_trailing_channels():
    extra = np.full((1, 2, 4), 5.0, np.float32)  # e.g. mask coefficients after the class scores
    head = np.concatenate([yolov8_tensor(), extra], axis=1)
    (found,) = detect([head], ["output0"], spec(num_classes=2), HW)
    assert_found(found, [A_XYXY, C_XYXY], [0.9, 0.7], [0, 1])
    with pytest.raises(ValueError, match="num_classes is 5"):
        detect([yolov8_tensor()], ["output0"], spec(num_classes=5), HW)


def test_conf_iou_and_max_det_override_the_spec():
    head = yolov8_tensor()
    (loose,) = detect([head], ["o"], spec(), HW, conf=0.05)
    assert_found(loose, [A_XYXY, C_XYXY, [145, 145, 155, 155]], [0.9, 0.7, 0.1], [0, 1, 1])
    (no_overlap_allowed,) = detect([head], ["o"], spec(), HW, iou=0.9)  # A and B overlap at 0.82: both stay
    assert_found(no_overlap_allowed, [A_XYXY, C_XYXY, C_XYXY], [0.9, 0.8, 0.7], [0, 0, 1])
    (one,) = detect([head], ["o"], spec(), HW, max_det=1)
    assert_found(one, [A_XYXY], [0.9], [0])


def test_nothing_above_conf_is_an_empty_result_per_image():
    head = np.concatenate([yolov8_tensor(), np.zeros((1, 6, 4), np.float32)])  # a batch of 2, second is blank
    first, second = detect([head], ["o"], spec(), HW)
    assert len(first) == 2 and len(second) == 0
    assert second.boxes.shape == (0, 4) and second.class_ids.dtype == np.int64


def test_a_wrong_rank_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"yolov8.*\[B, 4\+nc, N\].*\[1, 84\]"):
        detect([np.zeros((1, 84), np.float32)], ["o"], spec(), HW)


def test_nms_keeps_by_score_and_drops_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.6], np.float32)
    classes = np.array([0, 0, 0, 1])
    np.testing.assert_array_equal(nms(boxes, scores, classes, iou=0.5), [1, 2, 3])
    np.testing.assert_array_equal(nms(boxes, scores, classes, iou=0.5, class_agnostic=True), [1, 2])
    np.testing.assert_array_equal(nms(boxes, scores, classes, iou=0.95), [1, 2, 3, 0])  # IoU 0.82 < 0.95
    np.testing.assert_array_equal(nms(boxes, scores, classes, iou=0.5, limit=2), [1, 2])
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), iou=0.5).shape == (0,)


def test_nms_class_offset_keeps_far_apart_classes_apart():
    # boxes with negative and large coordinates: shifting classes must not make them overlap
    boxes = np.array([[-50, -50, 5000, 5000], [-50, -50, 5000, 5000]], np.float32)
    np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8]), np.array([0, 1]), iou=0.5), [0, 1])


def test_spec_refuses_unknown_keys_and_bad_values_naming_the_key():
    with pytest.raises(ValueError, match="postprocess.conf"):
        parse_detection_spec({"type": "detection", "conf": 1.5})
    with pytest.raises(ValueError, match="postprocess.anchors"):
        parse_detection_spec({"type": "detection", "anchors": [1, 2]})
    with pytest.raises(ValueError, match="strides must be positive"):
        parse_detection_spec({"type": "detection", "strides": [8, 0]})


def detector_manifest(**extra) -> Manifest:
    return make_manifest("det", **CLASSIFIER_IO, **extra)


def test_manifest_stores_the_detection_spec_normalised():
    manifest = detector_manifest(postprocess={"type": "detection", "format": "yolox"})
    assert manifest.postprocess == DetectionSpec(format="yolox").to_manifest()
    assert manifest.postprocess["iou"] == 0.7 and manifest.postprocess["strides"] == [8, 16, 32]
    assert manifest.task_name() == "detection"
    assert manifest.detection_spec() == DetectionSpec(format="yolox")


def test_manifest_names_the_bad_detection_key():
    with pytest.raises(ValueError, match="postprocess.max_det"):
        detector_manifest(postprocess={"type": "detection", "max_det": 0})


@pytest.mark.parametrize(
    ("task", "postprocess", "expected"),
    [
        (None, None, "tensor"),
        (None, {"type": "classification", "top_k": 3}, "classification"),
        (None, {"type": "detection"}, "detection"),
        (None, {"type": "something-else"}, "tensor"),
        ("embedding", None, "embedding"),
        ("classification", None, "classification"),
    ],
)
def test_task_name_is_recorded_or_inferred(task, postprocess, expected):
    assert detector_manifest(task=task, postprocess=postprocess).task_name() == expected


def test_a_detection_task_needs_a_detection_postprocess():
    with pytest.raises(ValueError, match="task 'detection' needs postprocess.type 'detection'"):
        detector_manifest(task="detection", postprocess={"type": "classification"})
    with pytest.raises(ValueError, match="task"):
        detector_manifest(task="segmentation")


def greedy_reference(boxes, scores, class_ids, iou, class_agnostic):
    """Textbook greedy NMS, one box at a time, for comparison."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        rivals = [k for k in kept if class_agnostic or class_ids[k] == class_ids[i]]
        if all(_iou(boxes[i], boxes[k]) <= iou for k in rivals):
            kept.append(int(i))
    return kept


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("matrix_max", [1024, 4])  # 4: every group larger than it goes box by box
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_nms_equals_textbook_greedy_nms_on_crowded_scenes(monkeypatch, matrix_max, class_agnostic):
    import edgerun.tasks.boxes as boxes

    monkeypatch.setattr(boxes, "MATRIX_NMS_MAX", matrix_max)
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        xy = rng.uniform(0, 50, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], axis=1)
        scores = rng.choice([0.3, 0.5, 0.7, 0.9], n)  # ties: order must follow the input's
        class_ids = rng.integers(0, 3, n)
        expected = greedy_reference(boxes, scores, class_ids, 0.45, class_agnostic)
        np.testing.assert_array_equal(nms(boxes, scores, class_ids, 0.45, class_agnostic), expected)
        np.testing.assert_array_equal(nms(boxes, scores, class_ids, 0.45, class_agnostic, limit=3), expected[:3])


def test_zero_area_boxes_are_kept_not_divided_by_zero():
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10]], np.float32)
    np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8, 0.7]), np.zeros(3), iou=0.5), [0, 1, 2])


def test_a_bundle_with_a_bad_detection_key_is_refused_in_one_line():
    from edgerun.errors import BundleError
    from edgerun.manifest import parse_manifest

    data = detector_manifest().model_dump(mode="json")
    with pytest.raises(BundleError, match=r"at 'postprocess': postprocess\.fromat: Extra inputs are not permitted$"):
        parse_manifest({**data, "postprocess": {"type": "detection", "fromat": "yolov8"}})
    with pytest.raises(BundleError, match="at 'top level': task 'detection' needs postprocess.type 'detection'"):
        parse_manifest({**data, "task": "detection", "postprocess": {"type": "classification"}})
