"""Object detection: decode a detector's raw outputs into boxes, then class-aware NMS (pure numpy).

The same :func:`detect` runs on the device (``/v1/predict``, the golden check) and in the builder
(validation of every candidate), so a bundle is validated with the decode it serves.

``manifest.postprocess`` for a detector (stored normalised, defaults filled in)::

    {"type": "detection", "format": "yolov8", "conf": 0.25, "iou": 0.7, "max_det": 300,
     "strides": [8, 16, 32], "box": "xywh", "normalized": false, "class_agnostic": false,
     "boxes_output": null, "scores_output": null, "num_classes": null}

Formats (``B`` batch, ``N`` candidate boxes, ``nc`` classes):

- ``yolov8``: ``[B, 4+nc, N]``, xywh centre + class scores, no objectness (Ultralytics v8/v11).
- ``yolov5``: ``[B, N, 5+nc]``, xywh, objectness, class scores; score = objectness * class score.
- ``yolox``: ``[B, N, 5+nc]`` raw YOLOX head: ``xy = (raw + grid) * stride``, ``wh = exp(raw) * stride``
  over the ``strides`` grids of the input size, then as ``yolov5``.
- ``end2end``: ``[B, K, 6]`` x1, y1, x2, y2, score, class: NMS is already in the graph.
- ``split``: ``boxes_output`` ``[B, N, 4]`` (``box`` says xywh or xyxy) and ``scores_output`` ``[B, N, nc]``.

For the single-tensor formats ``boxes_output`` names the tensor to decode (default: the first output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgerun.errors import BundleError
from edgerun.tasks.base import ImageResult, ImageTask
from edgerun.tasks.boxes import BoxMatch, Detections, box_iou, match_detections, nms

__all__ = [
    "FORMATS",
    "BoxMatch",
    "DetectionResponse",
    "DetectionSpec",
    "Detections",
    "box_iou",
    "detect",
    "match_detections",
    "nms",
    "parse_detection_spec",
    "to_image",
]

if TYPE_CHECKING:
    from edgerun.preprocess import ImageTransform

DetectionFormat = Literal["yolov8", "yolov5", "yolox", "end2end", "split"]
FORMATS: tuple[str, ...] = ("yolov8", "yolov5", "yolox", "end2end", "split")


class DetectionSpec(BaseModel):
    """How a detector's raw outputs become boxes. Unknown keys are refused: a decode step this
    runtime does not know cannot be applied, and skipping it would serve wrong boxes."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["detection"] = "detection"
    format: DetectionFormat = Field(default="yolov8", description="layout of the raw output: " + " | ".join(FORMATS))
    conf: float = Field(default=0.25, gt=0, le=1, description="keep boxes whose score is at least this")
    iou: float = Field(
        default=0.7, gt=0, le=1, description="NMS drops a box overlapping a better one by more than this IoU"
    )
    max_det: int = Field(default=300, ge=1, description="at most this many boxes per image, best first")
    strides: list[int] = Field(
        default_factory=lambda: [8, 16, 32], description="yolox: grid strides of the head, in input pixels"
    )
    box: Literal["xywh", "xyxy"] = Field(
        default="xywh", description="split: box coordinates as centre+size (xywh) or corners (xyxy)"
    )
    normalized: bool = Field(default=False, description="coordinates are fractions 0..1 of the model input size")
    class_agnostic: bool = Field(default=False, description="NMS across classes (a box suppresses any class)")
    boxes_output: str | None = Field(default=None, description="output holding the boxes (split) or the whole head")
    scores_output: str | None = Field(default=None, description="split: output holding the class scores")
    num_classes: int | None = Field(
        default=None,
        ge=1,
        description="classes in the head; extra trailing channels (e.g. mask coefficients) are ignored",
    )

    @field_validator("strides")
    @classmethod
    def _positive_strides(cls, value: list[int]) -> list[int]:
        if not value or min(value) <= 0:
            raise ValueError(f"strides must be positive input-pixel steps such as [8, 16, 32], got {value}")
        return value

    @model_validator(mode="after")
    def _split_names_outputs(self) -> DetectionSpec:
        if self.format == "split" and (self.boxes_output is None or self.scores_output is None):
            raise ValueError("format 'split' needs boxes_output and scores_output (the names of the two outputs)")
        return self

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_detection_spec(data: Any, source: str = "postprocess") -> DetectionSpec:
    """A :class:`DetectionSpec` from manifest keys; ``ValueError`` with one line naming the bad key."""
    if isinstance(data, DetectionSpec):
        return data
    try:
        return DetectionSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        key = f"{source}.{where}" if where else source
        raise ValueError(f"{key}: {first['msg'].removeprefix('Value error, ')}") from None


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    half = xywh[..., 2:4] / 2
    return np.concatenate([xywh[..., 0:2] - half, xywh[..., 0:2] + half], axis=-1)


def _named(outputs: Sequence[np.ndarray], names: Sequence[str], name: str | None, what: str) -> np.ndarray:
    if name is None:
        return np.asarray(outputs[0])
    if name not in names:
        raise ValueError(f"postprocess.{what} '{name}' is not an output of the model (outputs: {list(names)})")
    return np.asarray(outputs[list(names).index(name)])


def _rank3(array: np.ndarray, fmt: str, expected: str) -> np.ndarray:
    if array.ndim != 3:
        raise ValueError(f"detection format '{fmt}' expects an output shaped {expected}, got {list(array.shape)}")
    return array


def _class_scores(scores: np.ndarray, spec: DetectionSpec, fmt: str, axis: int = -1) -> np.ndarray:
    if spec.num_classes is None:
        return scores
    if scores.shape[axis] < spec.num_classes:
        raise ValueError(
            f"postprocess.num_classes is {spec.num_classes} but the '{fmt}' output has {scores.shape[axis]} class channels"
        )
    return scores[:, : spec.num_classes] if axis == 1 else scores[..., : spec.num_classes]


@dataclass
class _Head:
    """A decoded head, before any box is selected: the conversions run on the candidates only."""

    boxes: np.ndarray  # [B, N, 4], possibly a strided view
    xywh: bool
    scores: np.ndarray  # class scores, [B, nc, N] when channels_first else [B, N, nc]
    channels_first: bool
    objectness: np.ndarray | None  # [B, N]


def yolox_grid(input_hw: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell offsets [N, 2] (x, y) and the stride of each cell [N, 1], in YOLOX's order (stride by
    stride, row-major inside each)."""
    height, width = input_hw
    grids, steps = [], []
    for stride in strides:
        ys, xs = np.meshgrid(np.arange(height // stride), np.arange(width // stride), indexing="ij")
        grids.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        steps.append(np.full((grids[-1].shape[0], 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(steps).astype(np.float32)


def _decode(
    outputs: Sequence[np.ndarray], names: Sequence[str], spec: DetectionSpec, input_hw: tuple[int, int]
) -> _Head:
    fmt = spec.format
    if fmt == "split":
        raw_boxes = _rank3(_named(outputs, names, spec.boxes_output, "boxes_output"), fmt, "[B, N, 4]")
        scores = _rank3(_named(outputs, names, spec.scores_output, "scores_output"), fmt, "[B, N, nc]")
        if raw_boxes.shape[-1] != 4 or raw_boxes.shape[:2] != scores.shape[:2]:
            raise ValueError(
                f"detection format 'split' expects boxes [B, N, 4] and scores [B, N, nc] with the same B and N, "
                f"got {list(raw_boxes.shape)} and {list(scores.shape)}"
            )
        return _Head(raw_boxes, spec.box == "xywh", _class_scores(scores, spec, fmt), False, None)
    head = _rank3(_named(outputs, names, spec.boxes_output, "boxes_output"), fmt, _SHAPES[fmt])
    if fmt == "yolov8":
        if head.shape[1] < 5:
            raise ValueError(f"detection format 'yolov8' expects [B, 4+nc, N], got {list(head.shape)}")
        # kept channels-first: the per-anchor best class is a reduction over rows, not a strided gather
        return _Head(head[:, :4].transpose(0, 2, 1), True, _class_scores(head[:, 4:], spec, fmt, 1), True, None)
    if head.shape[2] < 6:
        raise ValueError(f"detection format '{fmt}' expects [B, N, 5+nc], got {list(head.shape)}")
    boxes = head[..., :4]
    if fmt == "yolox":
        grid, stride = yolox_grid(input_hw, spec.strides)
        if grid.shape[0] != head.shape[1]:
            raise ValueError(
                f"yolox grid for input {list(input_hw)} and strides {spec.strides} has {grid.shape[0]} cells but the "
                f"output has {head.shape[1]} rows; set postprocess.strides to the head's strides"
            )
        xy = (head[..., 0:2].astype(np.float32) + grid) * stride
        wh = np.exp(np.minimum(head[..., 2:4].astype(np.float32), 80.0)) * stride  # exp overflows float32 past ~88
        boxes = np.concatenate([xy, wh], axis=-1)
    return _Head(boxes, True, _class_scores(head[..., 5:], spec, fmt), False, head[..., 4])


_SHAPES = {"yolov8": "[B, 4+nc, N]", "yolov5": "[B, N, 5+nc]", "yolox": "[B, N, 5+nc]", "end2end": "[B, K, 6]"}


def _scale(boxes: np.ndarray, spec: DetectionSpec, input_hw: tuple[int, int]) -> np.ndarray:
    if not spec.normalized:
        return boxes
    height, width = input_hw
    return boxes * np.asarray([width, height, width, height], dtype=np.float32)


def detect(
    outputs: Sequence[np.ndarray],
    output_names: Sequence[str],
    spec: DetectionSpec,
    input_hw: tuple[int, int],
    *,
    conf: float | None = None,
    iou: float | None = None,
    max_det: int | None = None,
) -> list[Detections]:
    """Decode the raw outputs of a batch and run NMS: one :class:`Detections` per image, boxes in
    model-input pixels (xyxy), best score first. ``conf``/``iou``/``max_det`` override the spec's.

    Raises ``ValueError`` naming the shape or output when the outputs do not fit the format.
    """
    conf = spec.conf if conf is None else conf
    iou = spec.iou if iou is None else iou
    max_det = spec.max_det if max_det is None else max_det
    if spec.format == "end2end":
        table = _rank3(_named(outputs, output_names, spec.boxes_output, "boxes_output"), "end2end", "[B, K, 6]")
        if table.shape[2] < 6:
            raise ValueError(f"detection format 'end2end' expects [B, K, 6], got {list(table.shape)}")
        table = table.astype(np.float32)
        boxes_all = _scale(table[..., :4], spec, input_hw)
        return [
            _select(boxes_all[b], table[b, :, 4], np.rint(table[b, :, 5]).astype(np.int64), conf, max_det)
            for b in range(table.shape[0])
        ]
    head = _decode(outputs, output_names, spec, input_hw)
    return [_image_detections(head, b, spec, input_hw, conf, iou, max_det) for b in range(head.boxes.shape[0])]


def _image_detections(
    head: _Head, b: int, spec: DetectionSpec, input_hw: tuple[int, int], conf: float, iou: float, max_det: int
) -> Detections:
    """One image of a decoded head: its best class per box above ``conf``, then NMS."""
    scores = head.scores[b]
    axis = 0 if head.channels_first else 1
    if not scores.size:
        return Detections.empty()
    best = scores.max(axis).astype(np.float32)  # one label per box, its best class (as Ultralytics' default)
    if head.objectness is not None:
        best = best * head.objectness[b]  # argmax of obj * cls is argmax of cls: obj is one factor per box
    picked = np.flatnonzero(best >= conf)
    class_ids = (scores[:, picked].argmax(0) if head.channels_first else scores[picked].argmax(1)).astype(np.int64)
    boxes = head.boxes[b, picked].astype(np.float32)
    boxes = _scale(xywh_to_xyxy(boxes) if head.xywh else boxes, spec, input_hw)
    keep = nms(boxes, best[picked], class_ids, iou, spec.class_agnostic, limit=max_det)
    return Detections(boxes[keep], best[picked][keep].astype(np.float32), class_ids[keep])


def _select(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, conf: float, max_det: int) -> Detections:
    """end2end rows: the graph did NMS, so only the score threshold and the count apply."""
    mask = scores >= conf
    order = np.argsort(-scores[mask], kind="stable")[:max_det]
    return Detections(
        boxes[mask][order].astype(np.float32), scores[mask][order].astype(np.float32), class_ids[mask][order]
    )


def to_image(det: Detections, transform: ImageTransform) -> Detections:
    """Boxes from model-input pixels to the original image's pixels, clipped to the image."""
    return Detections(transform.to_image(det.boxes), det.scores, det.class_ids)


# ---- the /v1/predict answer ----


class DetectedObject(BaseModel):
    model_config = ConfigDict(defer_build=True)

    label: str = Field(description="the class name from the bundle's labels, else the class index")
    class_id: int
    score: float
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in the original image's pixels")


class DetectionResponse(BaseModel):
    model_config = ConfigDict(defer_build=True)  # built on first answer, not at server start

    model: str
    image_size: tuple[int, int] = Field(description="[width, height] of the image as sent")
    detections: list[DetectedObject] = Field(description="best score first; empty when nothing is detected")


def answer(result: ImageResult) -> DetectionResponse:
    """Decode + NMS on the model's outputs, boxes mapped back to the image as sent."""
    spec = result.manifest.detection_spec()
    assert spec is not None  # the registry sends only detection bundles here
    names = [s.name for s in result.manifest.outputs]
    width, height = result.transform.input
    options = result.options
    try:
        (found,) = detect(
            [result.outputs[n] for n in names],
            names,
            spec,
            (height, width),
            conf=options.conf,
            iou=options.iou,
            max_det=options.max_det,
        )
    except ValueError as exc:  # the outputs do not fit the manifest's format: the bundle is wrong, not the request
        raise BundleError(f"model '{result.model}': {exc}") from None
    found = to_image(found, result.transform)
    detections = [
        DetectedObject(
            label=result.label(int(c)),
            class_id=int(c),
            score=float(s),
            box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
        )
        for b, s, c in zip(found.boxes, found.scores, found.class_ids, strict=True)
    ]
    return DetectionResponse(model=result.model, image_size=result.transform.original, detections=detections)


TASK = ImageTask("detection", DetectionResponse, answer, options=("conf", "iou", "max_det"), offload=True)
