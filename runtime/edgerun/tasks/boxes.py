"""Box geometry shared by decoding, the golden check and the builder's validation: the
:class:`Detections` of one image, IoU, greedy NMS and the pairing of two sets of detections."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    """The boxes found in one image, best score first."""

    boxes: np.ndarray  # [K, 4] float32, x1, y1, x2, y2
    scores: np.ndarray  # [K] float32
    class_ids: np.ndarray  # [K] int64

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes`` [M, 4]."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# A group (one class, or all boxes when class-agnostic) up to this size is resolved with one IoU matrix;
# larger ones box by box. 1024 boxes: a 1 M-entry matrix, a few MB for a moment.
MATRIX_NMS_MAX = 1024


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou: float,
    class_agnostic: bool = False,
    *,
    limit: int | None = None,
) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when it overlaps an already kept box by IoU > ``iou``; unless
    ``class_agnostic``, only boxes of the same class compete. ``limit`` keeps that many at most.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(scores):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    cap = len(order) if limit is None else limit
    # Coordinates in score order, one contiguous array each (float32 halves what the matrices move).
    coords = tuple(np.ascontiguousarray(boxes[order, k], dtype=np.float32) for k in range(4))
    if class_agnostic:
        groups = [np.arange(len(order))]
    else:  # only boxes of one class compete: each class is its own (smaller) problem
        classes = np.asarray(class_ids).reshape(-1)[order]
        by_class = np.argsort(classes, kind="stable")  # score order kept inside each class
        groups = np.split(by_class, np.flatnonzero(np.diff(classes[by_class])) + 1)
    kept = [
        group[
            _greedy_matrix(coords, group, iou)
            if len(group) <= MATRIX_NMS_MAX
            else _greedy_loop(coords, group, iou, cap)
        ]
        for group in groups
    ]
    return order[np.sort(np.concatenate(kept))[:cap]]


def _greedy_matrix(coords: tuple[np.ndarray, ...], group: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS of ``group`` (positions in score order) from one overlap matrix, resolved as Cluster-NMS
    (Zheng et al., 2020) does: re-apply "suppressed by a kept, better box" until nothing changes; the
    fixed point is exactly the greedy result. Returns the kept members as a boolean mask."""
    x1, y1, x2, y2 = (c[group] for c in coords)
    width = np.maximum(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), 0.0)
    height = np.maximum(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), 0.0)
    inter = width * height
    areas = (x2 - x1) * (y2 - y1)
    # over[j, i]: the better box j overlaps i by IoU > iou (no division: a zero-area pair never suppresses)
    over = inter > iou * (areas[:, None] + areas[None] - inter)
    rank = np.arange(len(group))
    over &= rank[:, None] < rank[None]  # only a better box suppresses
    keep = np.ones(len(group), dtype=bool)
    while True:
        updated = ~over[keep].any(0)
        if np.array_equal(updated, keep):
            return keep
        keep = updated


def _greedy_loop(coords: tuple[np.ndarray, ...], group: np.ndarray, iou: float, cap: int) -> np.ndarray:
    """Greedy NMS one kept box at a time (groups too large for a matrix); stops after ``cap`` kept."""
    x1, y1, x2, y2 = (c[group] for c in coords)
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    rest = np.arange(len(group))
    while rest.size and len(keep) < cap:
        best, rest = int(rest[0]), rest[1:]
        keep.append(best)
        width = np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])
        height = np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])
        inter = np.maximum(width, 0.0) * np.maximum(height, 0.0)
        rest = rest[inter <= iou * (areas[best] + areas[rest] - inter)]
    return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True)
class BoxMatch:
    """How detections agree with reference detections (e.g. golden FP32 ones), box by box."""

    reference_boxes: int
    boxes: int
    matched: int  # same-class pairs at IoU >= the matching threshold
    worst_iou: float  # lowest IoU among the matched pairs (1.0 when none)
    max_score_diff: float  # largest |score - reference score| among the matched pairs

    @property
    def fraction(self) -> float:
        """Matched pairs over the larger box count: a missed box and a spurious one count alike."""
        total = max(self.reference_boxes, self.boxes)
        return self.matched / total if total else 1.0


def match_detections(reference: Sequence[Detections], found: Sequence[Detections], min_iou: float) -> BoxMatch:
    """Pair each reference box (best score first) with the unpaired found box of its class that overlaps
    it most, image by image; a pair counts when its IoU is at least ``min_iou``."""
    if len(reference) != len(found):
        raise ValueError(f"{len(reference)} reference images but {len(found)} with detections")
    matched, worst_iou, worst_score = 0, 1.0, 0.0
    for want, got in zip(reference, found, strict=True):
        free = np.ones(len(got), dtype=bool)
        for box, score, class_id in zip(want.boxes, want.scores, want.class_ids, strict=True):
            candidates = np.flatnonzero(free & (got.class_ids == class_id))
            if not candidates.size:
                continue
            overlaps = box_iou(box.astype(np.float64), got.boxes[candidates].astype(np.float64))
            best = int(np.argmax(overlaps))
            if overlaps[best] < min_iou:
                continue
            free[candidates[best]] = False
            matched += 1
            worst_iou = min(worst_iou, float(overlaps[best]))
            worst_score = max(worst_score, abs(float(got.scores[candidates[best]]) - float(score)))
    return BoxMatch(sum(map(len, reference)), sum(map(len, found)), matched, worst_iou, worst_score)
