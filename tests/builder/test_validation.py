"""Validation that cannot be vacuous, the right metric, and pack => serve, through the CLI."""

from __future__ import annotations

import json

import numpy as np
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
    "100%",
    "--metric",
    "agreement",
]


@pytest.mark.slow
def test_near_uniform_classifier_packed_as_int8_serves_on_the_same_host(tmp_path):
    from edgerun.loader import LoadOptions, load_model

    result = _pack(tmp_path, *NEAR_UNIFORM_INT8)
    assert result.exit_code == 0, result.stderr
    assert (
        "edgerun on this host serves it: 1 of 1 variant(s) pass the golden check on CPUExecutionProvider"
        in result.stderr
    )
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


@pytest.mark.parametrize(
    "value, message",
    [
        ("1", "would allow a drop of 100 points. For 1 percent write 0.01 or 1%"),
        ("0.6", "write 60%"),
        ("150%", "between 0 and 1"),
        ("a lot", "is not a number"),
    ],
)
def test_a_budget_that_would_switch_validation_off_exits_2_with_one_line(tmp_path, value, message):
    result = _pack(tmp_path, "tinymodels:tiny_cnn", "--max-accuracy-drop", value)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_labels_outside_the_models_outputs_exit_2_naming_both_counts(tmp_path):
    result = _pack(
        tmp_path, "tinymodels:tiny_cnn", "--val-data", "validation_models:labelled_images", "--quantize", "none"
    )
    assert result.exit_code == 2, result.output
    assert "labels for 10 classes" in result.stderr and "the model has 4 outputs" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_reference_below_chance_warns_and_judges_by_agreement(tmp_path):
    result = _pack(
        tmp_path, "validation_models:near_uniform", "--val-data", "validation_models:wrong_labels", "--quantize", "none"
    )
    assert result.exit_code == 0, result.stderr
    assert (
        "WARNING: the FP32 reference scores accuracy 0.0000" in result.stderr
        and "at or below chance (0." in result.stderr
    )
    validation = _manifest(result)["validation"]
    assert validation["metric"] == "agreement" and "below chance" in validation["metric_reason"]


def test_explicit_accuracy_on_labels_the_reference_cannot_score_exits_2(tmp_path):
    result = _pack(
        tmp_path,
        "validation_models:near_uniform",
        "--val-data",
        "validation_models:wrong_labels",
        "--metric",
        "accuracy",
    )
    assert result.exit_code == 2, result.output
    assert "--metric accuracy is vacuous here" in result.stderr


@pytest.mark.slow
def test_a_percent_budget_is_recorded_as_a_fraction_and_all_samples_are_used(tmp_path):
    result = _pack(
        tmp_path,
        "validation_models:embedder",
        "--val-data",
        "validation_models:vectors16",
        "--quantize",
        "none",
        "--max-accuracy-drop",
        "1%",
    )
    assert result.exit_code == 0, result.stderr
    validation = _manifest(result)["validation"]
    assert validation["max_accuracy_drop"] == 0.01 and validation["samples"] == 48


@pytest.mark.slow
def test_dense_output_without_labels_is_judged_by_cosine_with_worst_and_mean(tmp_path):
    result = _pack(
        tmp_path, "validation_models:embedder", "--val-data", "validation_models:vectors16", "--quantize", "none"
    )
    assert result.exit_code == 0, result.stderr
    validation = _manifest(result)["validation"]
    assert validation["metric"] == "cosine"
    assert validation["cosine_worst"] <= validation["cosine_mean"] <= 1.0 + 1e-9


@pytest.mark.slow
def test_class_outputs_without_labels_are_cosine_unless_declared_or_asked(tmp_path):
    args = ["tinymodels:tiny_cnn", "--val-data", "validation_models:images", "--quantize", "none"]
    assert _manifest(_pack(tmp_path / "a", *args))["validation"]["metric"] == "cosine"
    asked = _pack(tmp_path / "b", *args, "--metric", "agreement")
    assert _manifest(asked)["validation"]["metric"] == "agreement"


def test_val_samples_caps_validation_and_says_so(tmp_path):
    result = _pack(
        tmp_path,
        "validation_models:embedder",
        "--val-data",
        "validation_models:vectors16",
        "--quantize",
        "none",
        "--val-samples",
        "20",
    )
    assert result.exit_code == 0, result.stderr
    assert "on 20 samples (the --val-samples cap)" in result.stderr
    assert _manifest(result)["validation"]["samples"] == 20


@pytest.mark.slow
def test_dynamic_int8_that_misses_the_budget_gets_a_mixed_variant_that_meets_it(tmp_path):
    result = _pack(
        tmp_path,
        "validation_models:outlier_mlp",
        "--val-data",
        "validation_models:vectors32",
        "--quantize",
        "int8-dynamic",
        "--max-accuracy-drop",
        "0.01",
    )
    assert result.exit_code == 0, result.stderr
    assert "every full dynamic INT8 candidate breaks the budget" in result.stderr
    manifest = _manifest(result)
    assert manifest["model"]["precision"] == "mixed" and manifest["validation"]["drop"] <= 0.01
    quantization = manifest["model"]["quantization"]
    assert quantization["recipe"].startswith("dynamic S8") and quantization["nodes_to_exclude"]
    rows = {r["name"]: r for r in manifest["benchmark"]["candidates"]}
    assert not rows["int8-dynamic"]["within_budget"] and rows["int8-dynamic-partial"]["within_budget"]


def test_int8_skipped_without_calibration_data_is_said_once_with_the_flag(tmp_path):
    result = _pack(tmp_path, "tinymodels:tiny_cnn", "--val-data", "tinymodels:tiny_images")
    assert result.exit_code == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if "INT8 skipped" in line]
    assert len(skipped) == 1 and "--calib-data" in skipped[0]


@pytest.mark.slow
def test_library_warnings_are_summarised_and_a_gpu_choice_says_why(tmp_path):
    result = _pack(
        tmp_path,
        "validation_models:tiny_weights",
        "--target",
        "jetson",
        "--quantize",
        "fp16",
        "--val-data",
        "validation_models:vectors16",
    )
    assert result.exit_code == 0, result.stderr
    # Four truncated fp16 weights: one summary line, no raw warnings.
    mentions = [line for line in result.stderr.splitlines() if "truncated" in line]
    assert len(mentions) == 1 and "4 library message(s) captured" in mentions[0]
    assert "warnings.warn" not in result.stderr
    assert "TensorRT decides on the device; host CPU timings do not rank GPU variants" in result.stderr
    manifest = _manifest(result)
    assert next(p for p in manifest["passes"] if p["name"] == "candidate:fp16")


@pytest.mark.slow
def test_tensorrt_int8_file_size_is_explained_and_the_working_directory_stays_clean(tmp_path):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        result = runner.invoke(
            main,
            [
                "pack",
                "tinymodels:tiny_cnn",
                "--target",
                "jetson",
                "--calib-data",
                "tinymodels:tiny_images",
                "--val-data",
                "tinymodels:tiny_images",
                "--max-accuracy-drop",
                "0.2",
                "-o",
                "out",
                *FAST,
            ],
        )
        assert result.exit_code == 0, result.stderr
        from pathlib import Path

        assert sorted(p.name for p in Path(cwd).iterdir()) == ["out"]
        assert "edgerun on this host serves it: 3 of 3 variant(s) pass the golden check" in result.stderr
        report = (Path(cwd) / "out" / "tiny-cnn-jetson" / "report.md").read_text()
        rows = {r["name"]: r for r in _manifest(result)["benchmark"]["candidates"]}
    int8 = next(name for name in rows if name.startswith("int8-qdq"))
    assert rows[int8]["size_bytes"] >= rows["fp32"]["size_bytes"]
    # A model this small is all Q/DQ scales: the note says so, and no longer blames float32 weights.
    assert f"`{int8}` is" in report and "not smaller than FP32" in report
    assert "added more than the int8 weights saved" in report and "float32 behind" not in report
    assert "TensorRT decides on the device" in report


def test_golden_tolerances_follow_what_the_host_measured_with_a_margin():
    import numpy as np

    from edgebuild.golden import variant_thresholds

    expected = np.eye(8, 4, dtype=np.float32)  # 8 samples whose top-1 is class 0..3, then ties
    expected[4:, 0] = 1.0
    out = expected.copy()
    out[:4] = out[:4, ::-1]  # half of the top-1 decisions flip on this host
    out += 0.01
    limits = variant_thresholds(out, expected, classifier=True)
    assert limits.measured["top1_agreement"] == 0.5 and limits.measured["max_abs"] == pytest.approx(1.01, abs=1e-6)
    assert limits.min_top1_agreement == 0.25  # two more of eight may flip on the device
    assert limits.atol >= 2 * limits.measured["max_abs"]
    dense = variant_thresholds(out, expected, classifier=False)
    assert dense.min_top1_agreement is None and "top1_agreement" not in dense.measured


def test_every_output_is_compared_and_the_worst_one_is_the_figure():
    import numpy as np

    from edgebuild.validate import Metric, evaluate

    rng = np.random.default_rng(0)
    first, second = rng.random((6, 4)), rng.random((6, 5))
    broken = second[:, ::-1].copy()
    numbers = evaluate(Metric("cosine"), [first, second], [first, broken], None, ["scores", "boxes"])
    assert numbers["outputs"][0]["cosine"] == pytest.approx(1.0)
    assert numbers["worst_output"] == "boxes"
    assert numbers["cosine"] == pytest.approx(numbers["outputs"][1]["cosine"]) and numbers["cosine"] < 0.99
    assert numbers["drop"] == pytest.approx(1.0 - numbers["outputs"][1]["cosine"])


def test_a_model_whose_second_output_degrades_under_int8_is_caught(tmp_path):
    from tinymodels import write_images_npz

    from edgebuild.pack import PackOptions, pack

    data = str(write_images_npz(tmp_path / "data.npz", n=16))
    result = pack(
        PackOptions(
            model="tinymodels:two_heads",
            output_dir=tmp_path / "out",
            calib_data=data,
            val_data=data,
            bench_seconds=0.02,
            partial_quantization=False,
        ),
        progress=lambda message: None,
    )
    static = [c for c in result.candidates if c.name.startswith("int8-") and c.validation]
    assert static
    for candidate in static:
        first, second = candidate.validation["outputs"]
        assert first["name"] == "output_0" and first["cosine"] > 0.99  # output 0 alone would have passed
        assert candidate.validation["worst_output"] == "output_1" and not candidate.within_budget
    assert result.chosen.name == "fp32"
    golden = np.load(result.bundle / "golden.npz")
    assert {"output:output_0", "output:output_1"} <= set(golden.files)


def _list_metric(reference, packed, labels):
    assert isinstance(reference, list) and len(reference) == 2
    return float(np.mean([np.allclose(r, p, atol=1e-3) for r, p in zip(reference, packed)]))


def _array_metric(reference, packed, labels):
    return float(-np.abs(reference - packed).max())


def test_a_custom_metric_receives_every_output_and_an_array_metric_still_works_on_one_output():
    from edgebuild.validate import Metric, evaluate

    rng = np.random.default_rng(0)
    a, b = rng.random((4, 3)), rng.random((4, 2))
    listed = evaluate(Metric("custom", _list_metric), [a, b], [a, b + 1], None)
    assert listed["reference"] == 1.0 and listed["packed"] == 0.5
    single = evaluate(Metric("custom", _array_metric), [a], [a + 0.5], None)
    assert single["packed"] == pytest.approx(-0.5) and "first only" in single["metric_outputs"]
    with pytest.raises(TypeError):
        evaluate(Metric("custom", _array_metric), [a, b], [a, b], None)
