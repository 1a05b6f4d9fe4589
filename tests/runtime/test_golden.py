"""The golden parity check: golden bytes parsed once, per-variant tolerances, the loader's use of them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from runtime_fixtures import (
    CLASSIFIER_IO,
    W,
    classifier_golden,
    classifier_onnx,
    classifier_reference,
    golden_x,
    make_manifest,
    npz_bytes,
)

from edgebuild.bundle import write_bundle
from edgerun.bundle import VerifiedFile
from edgerun.errors import BundleError, SessionError
from edgerun.golden import check_golden, load_golden, thresholds_for
from edgerun.loader import load_model
from edgerun.manifest import GoldenSpec, GoldenThresholds, ProviderSpec
from edgerun.session import create_model_session


def _manifest(golden: GoldenSpec):
    return make_manifest("clf", **CLASSIFIER_IO, golden=golden)


def test_load_golden_takes_bytes_and_casts_inputs_to_the_manifest_dtype():
    x = golden_x().astype(np.float64)
    data = npz_bytes(**{"input:x": x, "output:probs": classifier_reference(golden_x())})
    spec = GoldenSpec(atol=1e-4)
    golden = load_golden(data, spec, _manifest(spec))
    assert golden.inputs["x"].dtype == np.float32 and golden.inputs["x"].shape == (4, 4)
    assert set(golden.outputs) == {"probs"}


@pytest.mark.parametrize(
    "data, message",
    [(b"not an npz", "cannot be read"), (npz_bytes(**{"input:x": golden_x()}), "lacks arrays")],
)
def test_unreadable_or_incomplete_golden_bytes_are_a_bundle_error(data, message):
    spec = GoldenSpec(atol=1e-4)
    with pytest.raises(BundleError, match=message):
        load_golden(data, spec, _manifest(spec))


def test_variant_tolerances_override_the_bundle_wide_ones():
    spec = GoldenSpec(
        atol=1e-4,
        min_top1_agreement=1.0,
        variants={"variants/int8.onnx": GoldenThresholds(atol=0.5, min_top1_agreement=0.25)},
    )
    assert thresholds_for(spec, "variants/int8.onnx").atol == 0.5
    fallback = thresholds_for(spec, "model.onnx")
    assert (fallback.atol, fallback.min_top1_agreement) == (1e-4, 1.0)


def _session(tmp_path, model: bytes, spec: GoldenSpec):
    manifest = _manifest(spec)
    verified = VerifiedFile("model.onnx", model, hashlib.sha256(model).hexdigest())
    return create_model_session(verified, manifest, manifest.model, [ProviderSpec(name="CPUExecutionProvider")], 1)


def test_a_drift_within_the_variants_own_tolerance_passes_and_beyond_it_fails(tmp_path):
    drifted = classifier_onnx(weight=W * 1.05)  # what a quantized variant might do on the host
    loose = GoldenSpec(atol=1e-6, variants={"model.onnx": GoldenThresholds(atol=1.0)})
    strict = GoldenSpec(atol=1e-6)
    golden = load_golden(classifier_golden(), loose, _manifest(loose))
    assert check_golden(_session(tmp_path, drifted, loose), golden).passed
    result = check_golden(_session(tmp_path, drifted, strict), golden)
    assert not result.passed and "drifts from golden" in result.reason and "atol 1e-06" in result.reason


def test_agreement_threshold_comes_from_the_spec_not_a_fixed_value(tmp_path):
    swapped = classifier_onnx(weight=W[:, ::-1].copy(), bias=np.zeros(3, np.float32))  # other top-1 classes
    spec = GoldenSpec(atol=10.0, variants={"model.onnx": GoldenThresholds(atol=10.0, min_top1_agreement=0.0)})
    golden = load_golden(classifier_golden(), spec, _manifest(spec))
    assert check_golden(_session(tmp_path, swapped, spec), golden).passed
    demanding = GoldenSpec(atol=10.0, variants={"model.onnx": GoldenThresholds(atol=10.0, min_top1_agreement=1.0)})
    result = check_golden(_session(tmp_path, swapped, demanding), golden)
    assert not result.passed and "below the required 1.000" in result.reason


def _bundle(dest, model: bytes, spec: GoldenSpec):
    files = {"model.onnx": model, "golden.npz": classifier_golden()}
    return write_bundle(dest, make_manifest("clf", **CLASSIFIER_IO, golden=spec), files, force=True)


def test_loader_applies_per_variant_tolerances(tmp_path, load_options):
    drifted = classifier_onnx(weight=W * 1.5)
    tight = GoldenSpec(atol=1e-4, rtol=1e-3)
    with pytest.raises(SessionError, match="drifts from golden"):
        load_model(_bundle(tmp_path / "a", drifted, tight), load_options)
    loose = tight.model_copy(update={"variants": {"model.onnx": GoldenThresholds(atol=1.0)}})
    served = load_model(_bundle(tmp_path / "b", drifted, loose), load_options)
    assert served.parameters["golden"]["passed"] is True


def test_the_golden_check_runs_one_row_at_a_time(tmp_path):
    """A batch-sized run would grow the session's memory arena to that batch for good, and the
    checked session goes on to serve single requests."""
    spec = GoldenSpec(atol=1e-4)
    golden = load_golden(classifier_golden(), spec, _manifest(spec))
    session = _session(tmp_path, classifier_onnx(), spec)
    real_run = session.session.run
    batches = []
    session.session.run = lambda names, feeds: (batches.append(len(feeds["x"])), real_run(names, feeds))[1]
    result = check_golden(session, golden)
    rows = len(golden.inputs["x"])
    assert result.passed and rows > 1
    assert batches == [1] * rows


def _detector_check(tmp_path, shift: float, thresholds: GoldenThresholds | None):
    from runtime_fixtures import build_detector_bundle, detector_onnx

    from edgerun.bundle import open_bundle

    spec = GoldenSpec(atol=1e-4, variants={"model.onnx": thresholds} if thresholds else {})
    bundle = open_bundle(build_detector_bundle(tmp_path / f"det{shift}", model=detector_onnx(shift), golden=spec))
    manifest = bundle.manifest
    session = create_model_session(
        bundle.verified_file("model.onnx"), manifest, manifest.model, [ProviderSpec(name="CPUExecutionProvider")], 1
    )
    golden = load_golden(bundle.read_verified(spec.path), spec, manifest)
    return check_golden(session, golden)


BOXES = GoldenThresholds(atol=1e-4, min_box_iou=0.85, max_score_diff=0.01, min_box_match=1.0)


def test_a_detector_is_checked_by_its_boxes_not_its_raw_values(tmp_path):
    # shifting every box 0.5 px right is far past atol 1e-4 but keeps IoU 0.94 (16 px box) and 0.88 (8 px)
    close = _detector_check(tmp_path, 0.5, BOXES)
    assert close.passed, close.reason
    assert close.box_match == 1.0 and close.max_abs_diff == pytest.approx(0.5, abs=1e-4)
    assert "golden boxes matched" in close.reason
    raw = _detector_check(tmp_path, 0.5, None)  # no box tolerances recorded: the raw atol applies
    assert not raw.passed and "drifts from golden" in raw.reason


def test_a_drifted_box_set_fails_the_box_check(tmp_path):
    drifted = _detector_check(tmp_path, 3.0, BOXES)  # IoU 0.68 for the big box, 0.45 for the small one
    assert not drifted.passed and "boxes drift from golden" in drifted.reason and drifted.box_match == 0.0
    lenient = _detector_check(tmp_path, 3.0, BOXES.model_copy(update={"min_box_iou": 0.6, "min_box_match": 0.5}))
    assert lenient.passed and lenient.box_match == pytest.approx(0.5)


def test_box_scores_are_held_to_max_score_diff():
    from runtime_fixtures import detector_golden_inputs, detector_reference

    from edgerun.golden import GoldenData, check_boxes
    from edgerun.manifest import Manifest

    x = detector_golden_inputs()
    want = detector_reference(x)
    got = want.copy()
    got[:, 4:] *= 0.9  # every class score 10% lower: boxes unchanged
    manifest = Manifest.model_validate(
        {
            "format_version": 1,
            "name": "det",
            "created": "2026-01-01T00:00:00Z",
            "model": {"path": "model.onnx", "sha256": "", "size_bytes": 0, "precision": "fp32", "opset": 17},
            "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 3, 64, 64]}],
            "outputs": [{"name": "output0", "dtype": "float32", "shape": [-1, 6, 3]}],
            "postprocess": {"type": "detection"},
        }
    )
    golden = GoldenData({"images": x}, {"output0": want})
    result = check_boxes(manifest, golden, {"output0": got}, BOXES)
    assert not result.passed and "box scores drift" in result.reason
    assert result.max_score_diff == pytest.approx(float(want[:, 4].max()) * 0.1, abs=1e-4)
    assert check_boxes(manifest, golden, {"output0": got}, BOXES.model_copy(update={"max_score_diff": 0.2})).passed
