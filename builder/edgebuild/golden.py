"""Golden data for the device's parity check, and the pack-time proof that the bundle serves.

Tolerances are derived per shipped variant from what that variant measured on this host (its
largest deviation from the FP32 reference on every output and its top-1 agreement on the golden
inputs; for detectors, its boxes matched against FP32's as the device matches them), with a
margin: a device that drifts further than the host did fails the check, while a variant that
merely behaves as it did here passes it. ``check_serves`` then runs edgerun's own loader on the
staged bundle, so a bundle that packs is one that edgerun on this host accepts.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.data import Batch
from edgebuild.errors import EdgebuildError
from edgebuild.onnx_utils import fixed_batch, make_session
from edgebuild.targets import TargetProfile
from edgebuild.validate import as_outputs, run_session
from edgerun.manifest import GoldenSpec, GoldenThresholds, ProviderSpec
from edgerun.tasks.detection import DetectionSpec, detect, match_detections

log = logging.getLogger(__name__)

GOLDEN_SAMPLES = 8
CPU = "CPUExecutionProvider"
# atol = ATOL_FACTOR x the deviation measured on the host + ATOL_FLOOR x the output scale. The
# floor covers kernels the host CPU does not run: TensorRT computes "fp32" layers in TF32 on
# Ampere GPUs (a 10-bit mantissa); broken outputs (overflow, NaN, garbage) are far beyond it.
ATOL_FACTOR = 2.0
ATOL_FLOOR = 1e-2
# A device may flip this many more golden top-1 decisions than the host did (near-tied
# outputs flip on any kernel change) before the variant is refused.
AGREEMENT_MARGIN_SAMPLES = 2


@dataclass
class ShippedModel:
    """One file of the bundle: its path inside the bundle and the ONNX file on this host."""

    relative: str
    path: Path


def _golden_rows(first: Path, ref: list[np.ndarray]) -> np.ndarray:
    n = min(GOLDEN_SAMPLES, len(ref[0]))
    batch = fixed_batch(first)
    if batch:  # whole batches only: the device runs a model that pins its batch size in chunks of it
        n = max(batch, n - n % batch)
    return np.arange(n) % len(ref[0])


def _deviation(out: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Largest |out - expected| over the finite expected values, and the output's scale."""
    out64, want64 = out.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(want64)
    measured_abs = float(np.abs(out64 - want64)[finite].max()) if finite.any() else 0.0
    scale = max(1.0, float(np.abs(want64[finite]).max()) if finite.any() else 1.0)
    return measured_abs, scale


def variant_thresholds(
    out: np.ndarray | list[np.ndarray], expected: np.ndarray | list[np.ndarray], classifier: bool
) -> GoldenThresholds:
    """Tolerances for one variant from its outputs ``out`` (every output) on the golden inputs (this host).

    One atol covers every output (the device checks each against it): the loosest of the outputs'
    own tolerances (twice the deviation it showed plus the floor of its scale)."""
    outs, wants = as_outputs(out), as_outputs(expected)
    deviations = [_deviation(o, w) for o, w in zip(outs, wants)]
    measured_abs = max(d for d, _ in deviations)
    atol = max(ATOL_FACTOR * d + ATOL_FLOOR * scale for d, scale in deviations)
    first_out, first_want = outs[0].astype(np.float64), wants[0].astype(np.float64)
    measured: dict = {"max_abs": round(measured_abs, 8), "samples": len(first_want)}
    min_agreement = None
    if classifier and first_want.ndim == 2 and first_want.shape[1] > 1:
        agreement = float((first_out.argmax(1) == first_want.argmax(1)).mean())
        measured["top1_agreement"] = round(agreement, 6)
        margin = AGREEMENT_MARGIN_SAMPLES / len(first_want)
        min_agreement = max(0.0, math.floor((agreement - margin) * 1000) / 1000)
    # Rounded up, so the recorded tolerance never falls below what was measured.
    return GoldenThresholds(atol=math.ceil(atol * 1e6) / 1e6, min_top1_agreement=min_agreement, measured=measured)


# Detection: a golden box matches at COCO's base IoU; the recorded IoU is what the variant reached, less
# this margin, and never under the base (a box below IoU 0.5 is not a detection of the object at all).
BASE_BOX_IOU = 0.5
BOX_IOU_MARGIN = 0.05
# Score tolerance: twice the measured drift plus this floor, never above the serving conf (0.25 by
# default): a score moving by more than that makes boxes appear and vanish at the threshold.
SCORE_FLOOR = 0.01


@dataclass
class BoxCheck:
    """What the device's box check needs from the builder: the decode and the task's budget."""

    spec: DetectionSpec
    input_hw: tuple[int, int]
    max_drop: float


def box_thresholds(
    out: list[np.ndarray], expected: list[np.ndarray], names: list[str], check: BoxCheck
) -> dict[str, Any]:
    """``min_box_iou``, ``max_score_diff``, ``min_box_match`` from what one variant measured on the golden
    inputs (decoded and matched as the device does), with margins; ``min_box_match`` never drops below
    1 - the task's budget unless the variant itself measured less."""
    want = detect(expected, names, check.spec, check.input_hw)
    got = detect(out, names, check.spec, check.input_hw)
    match = match_detections(want, got, BASE_BOX_IOU)
    fraction = match.fraction
    floor_match = 1.0 - check.max_drop
    margin = 1.0 / max(match.reference_boxes, 1)  # one box more may be missed on the device
    min_match = fraction if fraction < floor_match else max(fraction - margin, floor_match)
    min_iou = max(BASE_BOX_IOU, math.floor((match.worst_iou - BOX_IOU_MARGIN) * 100) / 100)
    score = min(check.spec.conf, math.ceil((2 * match.max_score_diff + SCORE_FLOOR) * 1000) / 1000)
    return {
        "min_box_iou": min_iou,
        "max_score_diff": max(score, math.ceil(match.max_score_diff * 1000) / 1000),
        "min_box_match": math.floor(min_match * 1000) / 1000,
        "measured": {
            "golden_boxes": match.reference_boxes,
            "boxes": match.boxes,
            "box_match": round(fraction, 6),
            "worst_iou": round(match.worst_iou, 6),
            "max_score_diff": round(match.max_score_diff, 6),
        },
    }


def make_golden(
    output_names: list[str],
    shipped: list[ShippedModel],
    ref: list[np.ndarray],
    val: Batch,
    target: TargetProfile,
    classifier: bool,
    boxes: BoxCheck | None = None,
) -> tuple[bytes, GoldenSpec]:
    """``golden.npz`` bytes (reference inputs, FP32-reference outputs) and its spec with the
    tolerances of every shipped variant, each measured with the session options the device uses."""
    rows = _golden_rows(shipped[0].path, ref)
    inputs = {k: v[rows] for k, v in val.inputs.items()}
    expected = [r[rows] for r in ref]
    per_variant = {}
    for model in shipped:
        session = make_session(model.path, target.session.graph_optimization_level, config=target.session.config)
        out = run_session(session, inputs)
        limits = variant_thresholds(out, expected, classifier)
        if boxes is not None:
            found = box_thresholds(out, expected, output_names, boxes)
            measured = {**limits.measured, **found.pop("measured")}
            limits = limits.model_copy(update={**found, "measured": measured})
        per_variant[model.relative] = limits
    buffer = io.BytesIO()
    arrays = {f"input:{k}": v for k, v in inputs.items()}
    for name, values in zip(output_names, expected):  # every output: the device checks each
        arrays[f"output:{name}"] = values.astype(np.float32)
    np.savez(buffer, **arrays)
    # Bundle-wide values (for readers that predate per-variant tolerances): the loosest.
    agreements = [t.min_top1_agreement for t in per_variant.values() if t.min_top1_agreement is not None]
    spec = GoldenSpec(
        atol=max(t.atol for t in per_variant.values()),
        min_top1_agreement=min(agreements) if agreements else None,
        variants=per_variant,
    )
    return buffer.getvalue(), spec


class ServeCheckError(EdgebuildError):
    """edgerun on this host would refuse the staged bundle (exit code 1; nothing written)."""

    exit_code = 1


def check_serves(bundle_dir: Path) -> str:
    """Load the staged bundle with edgerun's own loader (verify -> session -> golden check on the
    CPU provider, no self-benchmark, a throw-away cache) and golden-check every other shipped
    variant the same way.

    Raises ``ServeCheckError`` naming the variant and edgerun's reason when any would be refused.
    Returns a one-line verdict for the progress output.
    """
    from edgerun.errors import EdgerunError
    from edgerun.golden import check_golden, load_golden
    from edgerun.loader import LoadOptions, load_model
    from edgerun.session import create_model_session

    hint = "nothing was written; rerun with --debug to see edgerun's log"
    with tempfile.TemporaryDirectory(prefix="edgebuild-servecheck-") as cache:
        try:
            # On the CPU provider: every host has it, the host's validation numbers (and so the golden
            # tolerances) were measured on it, and a TensorRT engine build would take minutes here.
            options = LoadOptions(bench=False, cache_dir=Path(cache), providers=[CPU])
            served = load_model(bundle_dir, options)
        except EdgerunError as exc:
            raise ServeCheckError(f"edgerun on this host refuses the bundle: {exc}; {hint}") from None
        manifest = served.manifest
        if served.session.variant.path != manifest.model.path:
            dropped = "; ".join(served.status.dropped)
            raise ServeCheckError(f"edgerun on this host drops the selected model: {dropped}; {hint}")
        golden = (
            load_golden(served.bundle.read_verified(manifest.golden.path), manifest.golden, manifest)
            if manifest.golden
            else None
        )
        worst = served.status.golden.max_abs_diff or 0.0
        checked, skipped = [manifest.model.path], []
        providers = list(served.session.providers)
        for variant in manifest.variants:
            chain = [ProviderSpec(name=p) for p in providers if not variant.providers or p in variant.providers]
            if not chain:
                skipped.append(variant.path)
                continue
            try:
                session = create_model_session(
                    served.bundle.verified_file(variant.path), manifest, variant, chain, served.session.threads
                )
            except EdgerunError as exc:
                raise ServeCheckError(
                    f"edgerun on this host cannot load variant {variant.path}: {exc}; {hint}"
                ) from None
            result = check_golden(session, golden)
            if not result.passed:
                raise ServeCheckError(
                    f"edgerun on this host would drop variant {variant.path}: golden check failed: {result.reason}; {hint}"
                )
            checked.append(variant.path)
            worst = max(worst, result.max_abs_diff or 0.0)
    line = (
        f"edgerun on this host serves it: {len(checked)} of {len(manifest.all_models())} variant(s) pass the golden "
        f"check on {CPU} (worst max |diff| {worst:.3g})"
    )
    return line + (f"; not checked here (providers this host lacks): {', '.join(skipped)}" if skipped else "")
