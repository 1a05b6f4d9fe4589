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
