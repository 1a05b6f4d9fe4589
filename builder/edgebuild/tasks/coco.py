"""COCO box mAP with pycocotools (the reference evaluator), on boxes in model-input pixels.

``coco_map(truth, found)`` scores one list of detections per image against one ground truth per
image: mAP50-95 (COCO's primary figure, IoU 0.50:0.05:0.95) and mAP50. pycocotools prints its
progress; it is silenced here because the builder's stdout is the bundle path.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class BoxLabels:
    """One image's ground-truth boxes (x1, y1, x2, y2 in model-input pixels) and class indices."""

    boxes: np.ndarray  # [K, 4] float32
    class_ids: np.ndarray  # [K] int64

    def __len__(self) -> int:
        return len(self.class_ids)

    @classmethod
    def empty(cls) -> BoxLabels:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)], axis=1)


def coco_map(truth: Sequence[BoxLabels], found: Sequence, classes: int | None = None) -> dict[str, float]:
    """``{"map50_95", "map50", "boxes", "detections"}``; ``found`` holds ``Detections`` (boxes, scores,
    class_ids) per image. Images without ground truth still count their detections as false positives."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(found):
        raise ValueError(f"{len(truth)} ground truths for {len(found)} images")
    annotations: list[dict] = []
    ids: set[int] = set()
    for image_id, labels in enumerate(truth):
        for box, cls in zip(_xywh(labels.boxes), labels.class_ids):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
            ids.add(int(cls))
    rows = [
        [image_id, *box, float(score), int(cls)]
        for image_id, det in enumerate(found)
        for box, score, cls in zip(_xywh(det.boxes), det.scores, det.class_ids)
    ]
    counts = {"boxes": len(annotations), "detections": len(rows)}
    if not annotations:
        return {"map50_95": float("nan"), "map50": float("nan"), **counts}
    if not rows:
        return {"map50_95": 0.0, "map50": 0.0, **counts}
    categories = sorted(set(range(classes)) if classes else ids | {int(r[6]) for r in rows})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i} for i in range(len(truth))],
            "annotations": annotations,
            "categories": [{"id": c} for c in categories],
        }
        gt.createIndex()
        dt = gt.loadRes(np.asarray(rows, dtype=np.float64))
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map50_95": float(evaluator.stats[0]), "map50": float(evaluator.stats[1]), **counts}
