"""Detection: candidates judged by their boxes, decoded exactly as the device decodes them.

Every candidate's raw outputs go through ``edgerun.tasks.detection.detect`` (decode + class-aware
NMS, the code ``/v1/predict`` runs) and are scored with COCO mAP (pycocotools):

- **with labels** (a YOLO-format dataset or a COCO json): mAP50-95 against the labels, FP32's and
  each candidate's; the budget is in those points (0.01 = one point).
- **without labels** (a flat image folder, ``.npz`` or callable of images): **box agreement**:
  FP32's detections at ``conf`` (0.25) are the pseudo ground truth, each candidate's detections at
  conf 0.001 are scored against them with COCO mAP50-95. FP32 scores 1.0 against itself.

Raw-output cosine misjudges detectors both ways (a YOLOv8n INT8 variant at cosine 0.9995 had
mAP50 0.20; a YOLOX INT8 variant refused at cosine 0.934 had mAP50 1.00), so it is recorded but
never decides. Before mAP, a **score-collapse guard** refuses a variant whose scores lost their
spread (a uint8 scale shared by box pixels and probabilities leaves two score values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgebuild.errors import UsageError
from edgebuild.tasks.base import Task, TaskContext
from edgebuild.tasks.coco import BoxLabels, coco_map
from edgebuild.validate import Metric, Outputs, choose_metric
from edgerun.tasks.detection import FORMATS, Detections, DetectionSpec, detect, parse_detection_spec

# Candidates' detections are scored from this confidence up (COCO practice: the whole ranked list), at
# the serving threshold's default 0.25 and above; a lower pseudo-ground-truth threshold scales it down.
EVAL_CONF = 0.001
DEFAULT_CONF = 0.25
# An FP32 detector that finds no box at the serving threshold (an untrained model: Ultralytics' class-bias
# prior puts every score near 1e-5) is judged at half its own best score; below this it finds nothing at all.
NOTHING_FOUND = 1e-9
# Box agreement without labels: the default budget is 5 points of mAP50-95 against FP32's boxes
# (an INT8 detector whose boxes agree at >= 0.95 keeps every object FP32 finds; measured 0.93-0.97
# on YOLOv8n/YOLOX-family detectors with the head tail in float).
AGREEMENT_BUDGET = 0.05
# Score-collapse guard: fewer distinct scores than this while FP32 shows at least COLLAPSE_REFERENCE
# of them, or a score range under COLLAPSE_RANGE (or over 1 / COLLAPSE_RANGE) of FP32's.
COLLAPSE_DISTINCT = 8
COLLAPSE_REFERENCE = 32
COLLAPSE_RANGE = 0.5


def score_profile(found: Sequence[Detections]) -> dict[str, float]:
    """How the scores of a list of detections spread: distinct values, lowest, highest."""
    scores = np.concatenate([d.scores for d in found]) if found else np.zeros(0, np.float32)
    if not len(scores):
        return {"distinct": 0, "low": 0.0, "high": 0.0, "count": 0}
    return {
        "distinct": int(len(np.unique(np.round(scores.astype(np.float64), 6)))),
        "low": float(scores.min()),
        "high": float(scores.max()),
        "count": int(len(scores)),
    }


def score_collapse(candidate: dict[str, float], reference: dict[str, float]) -> str | None:
    """Why a candidate's scores collapsed compared with FP32's, or ``None`` when they did not."""
    if reference["distinct"] >= COLLAPSE_REFERENCE and candidate["distinct"] < COLLAPSE_DISTINCT:
        return (
            f"score collapse: {candidate['distinct']} distinct score values (FP32: {reference['distinct']}); "
            f"quantization merged the scores"
        )
    ref_range = reference["high"] - reference["low"]
    if ref_range > 0 and reference["count"] >= COLLAPSE_DISTINCT:
        ratio = (candidate["high"] - candidate["low"]) / ref_range
        if not COLLAPSE_RANGE <= ratio <= 1 / COLLAPSE_RANGE:
            return (
                f"score collapse: scores span {candidate['low']:.4g}..{candidate['high']:.4g}, FP32's "
                f"{reference['low']:.4g}..{reference['high']:.4g} ({ratio:.2f}x the range)"
            )
    return None


@dataclass
class DetectionMetric(Metric):
    """mAP50-95 of a candidate's boxes against labels (``map50-95``) or FP32's boxes (``box-agreement``)."""

    spec: DetectionSpec = field(default_factory=DetectionSpec)
    input_hw: tuple[int, int] = (640, 640)
    truth: list[BoxLabels] | None = None
    classes: int | None = None
    # FP32's detections and figures, computed once on the first call (every candidate shares them).
    _reference: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def eval_conf(self) -> float:
        """Scored detections start here: COCO's whole ranked list, and never above the serving threshold."""
        return min(EVAL_CONF, self.spec.conf * EVAL_CONF / DEFAULT_CONF)

    def decode(self, outputs: Outputs, names: Sequence[str] | None, conf: float) -> list[Detections]:
        names = list(names) if names is not None else [f"output {i}" for i in range(len(outputs))]
        return detect(outputs, names, self.spec, self.input_hw, conf=conf)

    def reference_detections(self, reference: Outputs, names: Sequence[str] | None) -> dict[str, Any]:
        """FP32's detections (scored list and pseudo ground truth), its mAP and its score profile; once."""
        if self._reference is None:
            found = self.decode(reference, names, self.eval_conf)
            pseudo = [
                BoxLabels(d.boxes[d.scores >= self.spec.conf], d.class_ids[d.scores >= self.spec.conf]) for d in found
            ]
            if self.truth is None and not sum(len(p) for p in pseudo):
                raise UsageError(
                    f"the FP32 model finds no box at conf >= {self.spec.conf} on the validation images, so box "
                    "agreement has nothing to agree on: give labelled data (images/ + labels/ or a COCO json), "
                    "images with objects, or lower postprocess.conf"
                )
            entry: dict[str, Any] = {"found": found, "pseudo": pseudo, "profile": score_profile(found)}
            entry["agreement"] = coco_map(pseudo, found, self.classes)
            if self.truth is not None:
                entry["labels"] = coco_map(self.truth, found, self.classes)
            self._reference = entry
        return self._reference

    def measure(self, numbers: dict, reference: Outputs, packed: Outputs, labels, names) -> dict:
        ref = self.reference_detections(reference, names)
        if not numbers["finite"]:
            value = ref["labels" if self.truth is not None else "agreement"]["map50_95"]
            return {"metric": self.name, "reference": value, "packed": float("-inf"), "drop": float("inf")}
        found = self.decode(packed, names, self.eval_conf)
        agreement = coco_map(ref["pseudo"], found, self.classes)
        profile = score_profile(found)
        out: dict[str, Any] = {
            "metric": self.name,
            "box_agreement": agreement["map50_95"],
            "box_agreement_map50": agreement["map50"],
            "detections": agreement["detections"],
            "scores": profile,
            "reference_scores": ref["profile"],
        }
        if self.truth is not None:
            scored = coco_map(self.truth, found, self.classes)
            out.update(
                map50_95=scored["map50_95"],
                map50=scored["map50"],
                reference_map50_95=ref["labels"]["map50_95"],
                reference_map50=ref["labels"]["map50"],
                reference=ref["labels"]["map50_95"],
                packed=scored["map50_95"],
            )
        else:
            out.update(
                map50_95=agreement["map50_95"],
                map50=agreement["map50"],
                reference=ref["agreement"]["map50_95"],
                packed=agreement["map50_95"],
            )
        out["drop"] = out["reference"] - out["packed"]
        collapse = score_collapse(profile, ref["profile"])
        if collapse:
            out["refused"] = collapse
        return out


# With labels, an FP32 mAP50 below this means the labels do not describe what the model detects (another
# class order, another label set, normalised boxes read as pixels): a drop of it means nothing.
VACUOUS_MAP50 = 0.05


def detection_metric(context: TaskContext, spec: DetectionSpec) -> Metric:
    if context.input_hw is None:
        raise UsageError("detection needs an image input with a fixed height and width ([N, C, H, W])")
    truth = context.val.targets
    classes = spec.num_classes or (len(context.class_names) if context.class_names else None)
    agreement_reason = (
        f"box agreement: COCO mAP50-95 of each variant's boxes (conf >= {min(EVAL_CONF, spec.conf)}) against FP32's own at "
        f"conf >= {spec.conf}"
    )
    if truth is not None:
        boxes = sum(len(t) for t in truth)
        reason = f"labelled detection data ({boxes} boxes): COCO mAP50-95 of each variant's boxes (pycocotools)"
        metric = DetectionMetric(
            "map50-95", reason=reason, spec=spec, input_hw=context.input_hw, truth=truth, classes=classes
        )
        fp32 = metric.reference_detections(context.reference, context.output_names)["labels"]
        if not fp32["map50"] >= VACUOUS_MAP50:  # also NaN: no labelled box at all
            warning = (
                f"the FP32 model scores mAP50 {fp32['map50']:.4f} against these box labels ({boxes} boxes): they do "
                "not describe what it detects (class order? another label set? box format?); judging by box "
                "agreement with FP32 instead"
            )
            vacuous = DetectionMetric(
                "box-agreement",
                reason=f"FP32 mAP50 {fp32['map50']:.4f} on the labels is vacuous: {agreement_reason}",
                warning=warning,
                spec=spec,
                input_hw=context.input_hw,
                classes=classes,
            )
            vacuous.reference_detections(context.reference, context.output_names)
            return vacuous
        return metric
    agreement = DetectionMetric(
        "box-agreement",
        reason=f"no box labels: {agreement_reason}",
        spec=spec,
        input_hw=context.input_hw,
        classes=classes,
    )
    try:
        agreement.reference_detections(context.reference, context.output_names)
    except UsageError:
        relative = _own_score_level(agreement, context)
        if relative is None:
            raise  # FP32 finds nothing at any confidence: exit 2 before any candidate is built
        agreement = DetectionMetric(
            "box-agreement",
            reason=f"no box labels, FP32 finds no box at conf >= {spec.conf}: box agreement at FP32's own score "
            f"level (conf >= {relative:.3g}, half its best score)",
            warning=(
                f"the FP32 model finds no box at conf >= {spec.conf} on the validation images (an untrained model, "
                f"or images without objects); its boxes are compared at conf >= {relative:.3g} instead, which "
                "says the variants keep FP32's outputs, not that they detect anything: give images with objects "
                "or labelled data to measure accuracy"
            ),
            spec=spec.model_copy(update={"conf": relative}),
            input_hw=context.input_hw,
            classes=classes,
        )
        agreement.reference_detections(context.reference, context.output_names)
    return agreement


def _own_score_level(metric: DetectionMetric, context: TaskContext) -> float | None:
    """Half of FP32's best score on the validation images, or None when it scores (next to) nothing."""
    found = metric.decode(context.reference, context.output_names, NOTHING_FOUND)
    best = max((float(d.scores.max()) for d in found if len(d.scores)), default=0.0)
    return best / 2 if best > NOTHING_FOUND else None


def _format_from_shape(shape: Sequence[int], names: list[str] | None, end2end: bool | None) -> str | None:
    """The detection format a single output's shape implies, when it is unambiguous."""
    if len(shape) != 3:
        return None
    _, second, third = shape
    if end2end or third == 6 and (names is None or len(names) != 2):
        return "end2end"
    if names is not None and second == 4 + len(names):
        return "yolov8"
    if names is None and 0 < second < third and second > 4:
        return "yolov8"
    return None


def resolve_spec(declared: Any, outputs: Sequence[Any], metadata=None, where: str = "--postprocess") -> DetectionSpec:
    """A detection post-processing from a preset name, a table, or (nothing declared) the model's
    Ultralytics metadata and output shape."""
    if isinstance(declared, str):
        if declared not in FORMATS:
            raise UsageError(f"{where} '{declared}' is not a detection format; use one of {', '.join(FORMATS)}")
        declared = {"format": declared}
    if declared is None:
        names = metadata.names if metadata is not None else None
        end2end = metadata.end2end if metadata is not None else None
        fmt = _format_from_shape(outputs[0].shape, names, end2end) if len(outputs) == 1 else None
        if fmt is None:
            shapes = [list(o.shape) for o in outputs]
            raise UsageError(
                f"detection: cannot tell the detection format from the outputs {shapes}; declare it with "
                f"--postprocess {'|'.join(FORMATS[:4])}|FILE.toml (or a [postprocess] table, POSTPROCESS)"
            )
        declared = {"format": fmt}
    values = {**declared, "type": "detection"}
    try:
        return parse_detection_spec(values, where)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def head_classes(spec: DetectionSpec, outputs: Sequence[Any]) -> int | None:
    """How many classes the head scores, from its output shape (``None`` where the shape does not say)."""
    if spec.num_classes is not None:
        return spec.num_classes
    by_name = {o.name: list(o.shape) for o in outputs}
    if spec.format == "split":
        shape = by_name.get(spec.scores_output or "", [])
        return shape[-1] if len(shape) == 3 and shape[-1] > 0 else None
    shape = by_name.get(spec.boxes_output, []) if spec.boxes_output else list(outputs[0].shape)
    if len(shape) != 3:
        return None
    if spec.format == "yolov8":
        return shape[1] - 4 if shape[1] > 4 else None
    if spec.format in ("yolov5", "yolox"):
        return shape[2] - 5 if shape[2] > 5 else None
    return None  # end2end: class ids are values, not channels


class DetectionTask(Task):
    name = "detection"
    head_in_float = True
    report_columns = (("map50_95", "mAP50-95"), ("map50", "mAP50"), ("box_agreement", "box agreement"))

    def choose_metric(self, context: TaskContext) -> Metric:
        spec = parse_detection_spec(context.postprocess)
        if context.requested_metric in (None, "auto", "map50-95", "box-agreement"):
            metric = detection_metric(context, spec)
            if context.requested_metric not in (None, "auto") and metric.name != context.requested_metric:
                raise UsageError(
                    f"--metric {context.requested_metric} needs "
                    f"{'box labels' if context.requested_metric == 'map50-95' else 'no labels'}; "
                    f"this data gives {metric.name}"
                )
            return metric
        return choose_metric(context.requested_metric, None, context.reference[0], data=context.data)

    def data_labels(self, classes, outputs, postprocess):
        if not classes or postprocess is None:
            return None
        return classes if head_classes(parse_detection_spec(postprocess), outputs) == len(classes) else None

    def check_labels(self, labels, outputs, postprocess) -> None:
        if not labels or postprocess is None:
            return
        classes = head_classes(parse_detection_spec(postprocess), outputs)
        if classes is not None and classes != len(labels):
            raise UsageError(
                f"{len(labels)} labels given but the detection head has {classes} classes "
                f"(format {postprocess['format']}, outputs {[list(o.shape) for o in outputs]}); give one label per class "
                "or set postprocess.num_classes"
            )

    def default_budget(self, metric: Metric) -> float:
        return AGREEMENT_BUDGET if metric.name == "box-agreement" else super().default_budget(metric)

    def postprocess(self, declared, context):
        return resolve_spec(declared, context["outputs"], context.get("metadata")).to_manifest()


def task(name: str) -> Task:
    return DetectionTask(name)
