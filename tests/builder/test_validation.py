"""Validation that cannot be vacuous, the right metric, and pack => serve, through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgebuild.cli import main

FAST = ["--bench-seconds", "0.02"]


def _pack(tmp_path, *args):
    return CliRunner().invoke(main, ["pack", *args, "-o", str(tmp_path / "out"), *FAST])


def _manifest(result) -> dict:
    from pathlib import Path

    return json.loads((Path(result.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())


NEAR_UNIFORM_INT8 = [
    "validation_models:near_uniform",
    "--calib-data",
    "validation_models:images",
    "--val-data",
    "validation_models:images",
    "--quantize",
    "int8",
    "--max-accuracy-drop",
    "1.0",
]


@pytest.mark.slow
def test_near_uniform_classifier_packed_as_int8_serves_on_the_same_host(tmp_path):
    from edgerun.loader import LoadOptions, load_model

    result = _pack(tmp_path, *NEAR_UNIFORM_INT8)
    assert result.exit_code == 0, result.stderr
    assert "edgerun check on this host: model.onnx: 8 golden samples match" in result.stderr
    manifest = _manifest(result)
    assert manifest["model"]["precision"] == "int8"
    own = manifest["golden"]["variants"]["model.onnx"]
    # Top-1 of near-tied logits flips under INT8: the tolerance follows what the host measured.
    assert own["measured"]["top1_agreement"] < 0.75
    assert own["min_top1_agreement"] <= own["measured"]["top1_agreement"]
    assert own["atol"] >= own["measured"]["max_abs"]
    served = load_model(
        result.stdout.strip().splitlines()[-1], LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1)
    )
    assert served.parameters["golden"]["passed"] is True and served.parameters["precision"] == "int8"


@pytest.mark.slow
def test_a_bundle_edgerun_would_refuse_is_refused_at_pack_time_and_nothing_is_written(tmp_path, monkeypatch):
    import edgebuild.golden as golden

    monkeypatch.setattr(golden, "ATOL_FACTOR", 0.0)  # tolerances tighter than what the host measured
    monkeypatch.setattr(golden, "ATOL_FLOOR", 0.0)
    result = _pack(tmp_path, *NEAR_UNIFORM_INT8)
    assert result.exit_code == 1, result.output
    assert "edgerun on this host refuses the bundle" in result.stderr and "drifts from golden" in result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []
