"""The golden parity check: a session's outputs on the bundle's golden inputs against the recorded ones.

The builder stores a few validation inputs and the FP32 reference's outputs in ``golden.npz``
and, per shipped variant, the tolerances it derived from what that variant measured on the
build host (``GoldenSpec.variants``). The device runs the same inputs through each session it
may serve and drops any that drifts further than the host did: fp16 overflow, provider drift,
a broken accelerator. ``edgebuild pack`` runs this same check on the staged bundle, so a bundle
that packs passes it on the host that packed it.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from edgerun.errors import BundleError, RequestError
from edgerun.manifest import GoldenSpec, GoldenThresholds, Manifest
from edgerun.tasks.detection import detect, match_detections

if TYPE_CHECKING:
    from edgerun.session import ModelSession


class GoldenData(NamedTuple):
    """Golden arrays keyed by input / output name, batch dimension first."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class GoldenResult:
    passed: bool
    reason: str
    samples: int = 0
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Detection bundles: fraction of boxes matched, and the largest score difference of a matched box.
    box_match: float | None = None
    max_score_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "reason": self.reason, "samples": self.samples}
        for key in ("max_abs_diff", "top1_agreement", "box_match", "max_score_diff"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


# golden.npz is a zip the builder writes uncompressed (np.savez); a deflated member can unpack a
# thousandfold, so what the arrays unpack to is bounded before any is read.
MAX_GOLDEN_EXPANSION = 4
MIN_GOLDEN_UNPACKED_BYTES = 64 << 20


def _check_unpacked_size(data: bytes, relpath: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())  # zipfile never reads past these
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: np.load says what it is
    limit = max(MIN_GOLDEN_UNPACKED_BYTES, MAX_GOLDEN_EXPANSION * len(data))
    if unpacked > limit:
        raise BundleError(
            f"golden file '{relpath}' unpacks to {unpacked} bytes from {len(data)}, over the {limit} byte limit "
            f"for golden data; rebuild the bundle"
        )


def load_golden(data: bytes, spec: GoldenSpec, manifest: Manifest) -> GoldenData:
    """Parse ``golden.npz`` bytes (keys ``input:<name>`` / ``output:<name>``) for ``manifest``'s tensors."""
    _check_unpacked_size(data, spec.path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, MemoryError) as exc:  # MemoryError: a header declaring a huge array
        raise BundleError(f"golden file '{spec.path}' cannot be read ({exc}); rebuild the bundle") from None
    inputs = {s.name: arrays.get(f"input:{s.name}") for s in manifest.inputs}
    outputs = {s.name: arrays[f"output:{s.name}"] for s in manifest.outputs if f"output:{s.name}" in arrays}
    missing = [name for name, value in inputs.items() if value is None]
    if missing or not outputs:
        raise BundleError(
            f"golden file '{spec.path}' lacks arrays {[f'input:{m}' for m in missing] or 'output:<name>'} "
            f"(has {sorted(arrays)}); golden keys must be 'input:<input name>' and 'output:<output name>'"
        )
    dtypes = {s.name: s.dtype for s in manifest.inputs}
    return GoldenData({k: np.asarray(v, dtype=np.dtype(dtypes[k])) for k, v in inputs.items()}, outputs)


def thresholds_for(spec: GoldenSpec, variant_path: str) -> GoldenThresholds:
    """The tolerances recorded for one variant, else the bundle-wide ones (older bundles)."""
    own = spec.variants.get(variant_path)
    if own is not None:
        return own
    return GoldenThresholds(
        atol=spec.atol,
        rtol=spec.rtol,
        min_top1_agreement=spec.min_top1_agreement,
        min_box_iou=spec.min_box_iou,
        max_score_diff=spec.max_score_diff,
        min_box_match=spec.min_box_match,
    )


def describe_thresholds(limits: GoldenThresholds) -> str:
    """One line of what a variant is held to: box tolerances for a detector checked by boxes, else atol."""
    if limits.compares_boxes():
        parts = [
            f"{label} {value:g}"
            for label, value in (
                ("box IoU >=", limits.min_box_iou if limits.min_box_iou is not None else DEFAULT_MIN_BOX_IOU),
                ("matched >=", limits.min_box_match if limits.min_box_match is not None else DEFAULT_MIN_BOX_MATCH),
                ("score diff <=", limits.max_score_diff),
            )
            if value is not None
        ]
        return "boxes: " + ", ".join(parts)
    line = f"atol {limits.atol:g}" + (f" rtol {limits.rtol:g}" if limits.rtol else "")
    return line + (f", top-1 >= {limits.min_top1_agreement:g}" if limits.min_top1_agreement is not None else "")


def run_in_chunks(model: ModelSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the rows one at a time when the batch dim is dynamic, else in model-sized chunks.
    Per-call golden data (every array one axis more than its input: the first counts calls) runs
    one call at a time, each output gaining that calls axis."""
    ranks = {s.name: len(s.shape) for s in model.inputs}
    if feeds and all(k in ranks and v.ndim == ranks[k] + 1 for k, v in feeds.items()):
        calls = [
            model.run({k: np.asarray(v[i]) for k, v in feeds.items()}) for i in range(len(next(iter(feeds.values()))))
        ]
        return {name: np.stack([c[name] for c in calls]) for name in model.output_names}
    rows = len(next(iter(feeds.values())))
    fixed = [s.shape[0] for s in model.inputs if s.shape and s.shape[0] > 0]
    # One row at a time unless the model pins its batch: ONNX Runtime's memory arena keeps the
    # size of the largest run, and the checked session goes on to serve single requests.
    step = fixed[0] if fixed else 1
    parts = [model.run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, rows, max(step, 1))]
    return {name: np.concatenate([p[name] for p in parts]) for name in model.output_names}


def _nonfinite_mismatch(got: np.ndarray, want: np.ndarray) -> int:
    """Non-finite golden values must come out the same (Inf sign, NaN for NaN); tolerances cover the rest."""
    finite = np.isfinite(want)
    bad = (np.isfinite(got) != finite) | (np.isinf(want) & (got != want)) | (np.isnan(want) & ~np.isnan(got))
    return int(bad.sum())


def check_golden(model: ModelSession, golden: GoldenData | None) -> GoldenResult:
    """Compare the session's outputs on the golden inputs with the recorded outputs, within the
    tolerances the builder recorded for this variant."""
    spec = model.manifest.golden
    if spec is None or golden is None:
        return GoldenResult(True, "no golden data in bundle; parity not checked")
    limits = thresholds_for(spec, model.variant.path)
    samples = len(next(iter(golden.inputs.values())))
    try:
        actual = run_in_chunks(model, golden.inputs)
    except RequestError as exc:
        return GoldenResult(False, f"golden inputs failed to run: {exc}", samples)
    for name, want in golden.outputs.items():
        got = actual[name]
        if got.shape != want.shape:
            return GoldenResult(
                False, f"output '{name}' has shape {list(got.shape)}, golden has {list(want.shape)}", samples
            )
        mismatched = _nonfinite_mismatch(got.astype(np.float64), want.astype(np.float64))
        if mismatched:
            return GoldenResult(
                False, f"output '{name}' has {mismatched} NaN/Inf values that differ from golden", samples
            )
    if limits.compares_boxes() and model.manifest.detection_spec() is not None:
        return check_boxes(model.manifest, golden, actual, limits)
    worst = 0.0
    agreements = []
    for name, want in golden.outputs.items():
        got64, want64 = actual[name].astype(np.float64), want.astype(np.float64)
        finite = np.isfinite(want64)
        diff = np.abs(got64 - want64)[finite]
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        allowed = limits.atol + limits.rtol * np.abs(want64[finite])
        if diff.size and (diff > allowed).any():
            return GoldenResult(
                False,
                f"output '{name}' drifts from golden: max |diff| {float(diff.max()):.3g} "
                f"exceeds atol {limits.atol:g} + rtol {limits.rtol:g}",
                samples,
                worst,
            )
        if limits.min_top1_agreement is not None and want.ndim >= 2:
            agreements.append(float((got64.argmax(-1) == want64.argmax(-1)).mean()))
    top1 = min(agreements) if agreements else None
    if top1 is not None and limits.min_top1_agreement is not None and top1 < limits.min_top1_agreement:
        return GoldenResult(
            False,
            f"top-1 agreement {top1:.3f} is below the required {limits.min_top1_agreement:.3f}",
            samples,
            worst,
            top1,
        )
    return GoldenResult(True, f"{samples} golden samples match (max |diff| {worst:.3g})", samples, worst, top1)


# Box tolerances not recorded take these: COCO's matching IoU, every box matched.
DEFAULT_MIN_BOX_IOU = 0.5
DEFAULT_MIN_BOX_MATCH = 1.0


def _per_image(array: np.ndarray, rank: int) -> np.ndarray:
    """Per-call golden outputs (one axis more than the model's) as one batch of images."""
    return array.reshape(-1, *array.shape[2:]) if array.ndim == rank + 1 else array


def _input_hw(manifest: Manifest, golden: GoldenData) -> tuple[int, int]:
    pre = manifest.preprocess_spec()
    if pre is not None and pre.size is not None:
        return pre.size
    name = pre.input if pre is not None and pre.input else manifest.inputs[0].name
    shape = golden.inputs[name].shape
    nhwc = pre is not None and pre.layout == "NHWC"
    return (int(shape[-3]), int(shape[-2])) if nhwc else (int(shape[-2]), int(shape[-1]))


def check_boxes(
    manifest: Manifest, golden: GoldenData, actual: dict[str, np.ndarray], limits: GoldenThresholds
) -> GoldenResult:
    """A detector's golden check: decode both output sets with the bundle's own post-processing and
    match the boxes (same class, greedy by IoU) instead of comparing raw values."""
    spec = manifest.detection_spec()
    assert spec is not None
    samples = len(next(iter(golden.inputs.values())))
    ranks = {s.name: len(s.shape) for s in manifest.outputs}
    names = [s.name for s in manifest.outputs if s.name in golden.outputs]
    hw = _input_hw(manifest, golden)
    try:
        want = detect([_per_image(golden.outputs[n], ranks[n]) for n in names], names, spec, hw)
        got = detect([_per_image(actual[n], ranks[n]) for n in names], names, spec, hw)
    except ValueError as exc:
        return GoldenResult(False, f"golden outputs cannot be decoded as '{spec.format}' detections: {exc}", samples)
    min_iou = limits.min_box_iou if limits.min_box_iou is not None else DEFAULT_MIN_BOX_IOU
    min_match = limits.min_box_match if limits.min_box_match is not None else DEFAULT_MIN_BOX_MATCH
    match = match_detections(want, got, min_iou)
    raw = max(float(np.abs(actual[n].astype(np.float64) - golden.outputs[n]).max(initial=0.0)) for n in names)
    measured: dict[str, Any] = {
        "max_abs_diff": raw,
        "box_match": match.fraction,
        "max_score_diff": match.max_score_diff,
    }
    counts = f"{match.matched} of {match.reference_boxes} golden boxes matched ({match.boxes} found)"
    if match.fraction < min_match:
        reason = f"boxes drift from golden: {counts} at IoU >= {min_iou:g}, {match.fraction:.3f} < {min_match:.3f}"
        return GoldenResult(False, reason, samples, **measured)
    if limits.max_score_diff is not None and match.max_score_diff > limits.max_score_diff:
        reason = (
            f"box scores drift from golden: max |score diff| {match.max_score_diff:.3g} exceeds "
            f"{limits.max_score_diff:g} ({counts})"
        )
        return GoldenResult(False, reason, samples, **measured)
    return GoldenResult(True, f"{samples} golden samples match: {counts} at IoU >= {min_iou:g}", samples, **measured)
