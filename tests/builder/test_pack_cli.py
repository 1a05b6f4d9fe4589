import json
import re

import pytest
from click.testing import CliRunner

from edgebuild.candidates import Candidate, select
from edgebuild.cli import main
from edgebuild.errors import UsageError
from edgerun.bundle import open_bundle

FAST = ["--bench-seconds", "0.05"]


def _pack(tmp_path, *args):
    return CliRunner().invoke(main, ["pack", *args, "-o", str(tmp_path / "out"), *FAST])


def test_pack_tiny_model_writes_verified_bundle_and_prints_path_last(tmp_path):
    result = _pack(
        tmp_path,
        "tinymodels:tiny_cnn",
        "--calib-data",
        "tinymodels:tiny_images",
        "--val-data",
        "tinymodels:tiny_images",
        "--max-accuracy-drop",
        "0.1",
    )
    assert result.exit_code == 0, result.stderr
    # One progress line per measured candidate with its elapsed time; the total is the last stderr line.
    err = result.stderr.splitlines()
    measured = [line for line in err if re.match(r"edgebuild: \[\d+/\d+\] \S+: .* \(\d+\.\d s\)$", line)]
    assert len(measured) >= 2 and measured[0].startswith("edgebuild: [1/")
    assert re.fullmatch(r"edgebuild: done in \d+\.\d s", err[-1])
    path = result.stdout.strip().splitlines()[-1]
    assert path.endswith("tiny-cnn-x86")  # the bundle path stays last on stdout
    bundle = open_bundle(path)
    m = bundle.manifest
    assert m.name == "tiny-cnn" and m.inputs[0].shape == [-1, 3, 8, 8] and m.inputs[0].dtype == "float32"
    assert m.validation.metric == "accuracy" and m.validation.samples == 48 and m.validation.validated
    assert m.validation.drop <= 0.1
    assert {r.name for r in m.passes} >= {"export", "candidate:fp32"}
    assert m.golden is not None and "golden.npz" in m.files and "report.md" in m.files
    rows = m.benchmark["candidates"]
    assert {r["name"] for r in rows} >= {"fp32", "int8-qdq-u8s8-per-channel"}
    # The bundle ships what the selection rule picks from the recorded measurements.
    recorded = [
        Candidate(
            r["name"],
            r["precision"],
            latency={"p50_ms": r["p50_ms"]} if "p50_ms" in r else None,
            within_budget=r["within_budget"],
            size_bytes=r["size_bytes"],
        )
        for r in rows
    ]
    chosen = select(recorded)
    assert chosen is not None and chosen.within_budget
    assert m.model.precision == chosen.precision
    assert m.benchmark["packed"]["p50_ms"] == chosen.latency["p50_ms"]
    assert m.model.size_bytes == chosen.size_bytes


@pytest.mark.slow
def test_multi_input_model_packs_with_named_int64_inputs(tmp_path):
    result = _pack(
        tmp_path,
        "tinymodels:token_classifier",
        "--calib-data",
        "tinymodels:token_data",
        "--val-data",
        "tinymodels:token_data",
        "--quantize",
        "none",
    )
    assert result.exit_code == 0, result.stderr
    m = open_bundle(result.stdout.strip().splitlines()[-1]).manifest
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [
        ("input_ids", "int64", [-1, -1]),
        ("attention_mask", "int64", [-1, -1]),
    ]
    assert m.validation.metric == "cosine"  # an [N, 3] output with no labels is not known to classify


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "does not exist"),
        (["tinymodels:nope"], "has no attribute"),
        (["tinymodels:no_shape", "--input-shape", "1,x"], "comma-separated"),
        (["tinymodels:tiny_cnn", "--target", "toaster"], "unknown target 'toaster'"),
        (["tinymodels:tiny_cnn", "--quantize", "int8"], "needs --calib-data"),
        (["tinymodels:tiny_cnn", "--val-data", "random"], "calibration only"),
        (["tinymodels:tiny_cnn", "--quantize", "fp16"], "not allowed on target 'x86'"),
        (["tinymodels:tiny_cnn", "--name", "../escape"], "must be one path component"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    result = _pack(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_existing_bundle_is_kept_without_force(tmp_path):
    args = ["tinymodels:tiny_cnn", "--calib-data", "tinymodels:tiny_images", "--quantize", "none"]
    first = _pack(tmp_path, *args)
    assert first.exit_code == 0, first.stderr
    manifest = (tmp_path / "out" / "tiny-cnn-x86" / "manifest.json").read_text()
    second = _pack(tmp_path, *args)
    assert second.exit_code == 2 and "--force" in second.stderr
    assert (tmp_path / "out" / "tiny-cnn-x86" / "manifest.json").read_text() == manifest
    third = _pack(tmp_path, *args, "--force")
    assert third.exit_code == 0
    assert json.loads((tmp_path / "out" / "tiny-cnn-x86" / "manifest.json").read_text())["created"]


@pytest.mark.slow
def test_random_calibration_is_recorded_as_not_validated(tmp_path):
    result = _pack(tmp_path, "tinymodels:tiny_cnn", "--calib-data", "random", "--max-accuracy-drop", "100%")
    assert result.exit_code == 0, result.stderr
    assert "NOT validated" in result.stderr
    m = open_bundle(result.stdout.strip().splitlines()[-1]).manifest
    assert m.validation.validated is False and m.validation.data == "random"


def test_targets_lists_builtin_profiles():
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0 and result.stdout.splitlines()[-1].split()[0] in {"arm64", "jetson", "x86"}
    assert any(line.startswith("x86 ") for line in result.stdout.splitlines())


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    result = _pack(tmp_path, "tinymodels:tiny_cnn", "--quantize", "none")
    assert result.exit_code == 2, result.output
    assert "not a directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_token_model_without_validation_data_packs_on_random_token_ids(tmp_path):
    result = _pack(tmp_path, "tinymodels:token_classifier", "--quantize", "none")
    assert result.exit_code == 0, result.output
    assert "NOT validated" in result.stderr


def test_model_failing_on_the_data_is_one_line_exit_2(tmp_path):
    import numpy as np

    ids = np.full((4, 6), 99, dtype=np.int64)  # beyond the 50-token vocabulary
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = _pack(
        tmp_path, "tinymodels:token_classifier", "--val-data", str(tmp_path / "tokens.npz"), "--quantize", "none"
    )
    assert result.exit_code == 2, result.output
    assert "validation data" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags", [["--prune", "0.3"], ["--distill", "--train-data", "tinymodels:tiny_images"]])
def test_torch_passes_on_a_pt2_program_are_one_line_exit_2(tmp_path, flags):
    import torch
    from tinymodels import TinyCNN

    program = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(TinyCNN().eval(), (torch.zeros(1, 3, 8, 8),)), str(program))
    result = _pack(tmp_path, str(program), "--quantize", "none", *flags)
    assert result.exit_code == 2, result.output
    assert "package.module:callable" in result.stderr and "Traceback" not in result.stderr


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    plain = CliRunner().invoke(main, ["pack", str(tmp_path / "missing.onnx")])
    assert plain.exit_code == 2 and plain.stderr.count("edgebuild: error:") == 1 and "Traceback" not in plain.stderr
    debug = CliRunner().invoke(main, ["pack", str(tmp_path / "missing.onnx"), "--debug"])
    assert "No such option" not in debug.output
    assert isinstance(debug.exception, UsageError)  # --debug lets the error through with its traceback
