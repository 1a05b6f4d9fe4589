"""edgebuild profile: ONNX Runtime's per-node profile, per op type, for a MODEL or a BUNDLE."""

import json

import pytest
from click.testing import CliRunner

from edgebuild.cli import main
from edgebuild.profile import ProfileReport, profile_location


def test_node_times_add_up_to_the_run_time_and_name_the_conv_share():
    report = profile_location("tinymodels:conv_stack", batches=[1], runs=10, threads=1)
    (profile,) = report.profiles
    # A consistency check between two numbers the tool reports: the node medians and ORT's own run time.
    assert abs(profile.node_ms - profile.run_ms) <= 0.10 * profile.run_ms
    shares = profile.shares()
    assert shares["conv_matmul"] > 0.5 and shares["conv_matmul"] == shares["conv_matmul_float"]
    assert shares["quantize_dequantize"] == 0.0
    assert {r.op_type for r in profile.by_op_type()} & {"Conv", "FusedConv"}
    (eager,) = report.torch  # a torch MODEL is also profiled eagerly, by aten operator
    assert any("conv" in op["op"] for op in eager["ops"][:3])


def test_json_round_trips_and_markdown_shows_the_shares(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["profile", "tinymodels:conv_stack", "--batch", "1", "--runs", "3", "--json", "--png", str(tmp_path / "p.png")],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert ProfileReport.from_json(data).to_json() == data
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    text = runner.invoke(main, ["profile", "tinymodels:conv_stack", "--batch", "1", "--runs", "3", "--top", "3"])
    assert text.exit_code == 0, text.stderr
    assert "Conv/MatMul-type ops" in text.stdout and "Quantize/DequantizeLinear" in text.stdout
    assert "PyTorch eager by operator" in text.stdout


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    result = CliRunner().invoke(
        main,
        ["pack", "tinymodels:tiny_cnn", "--calib-data", "tinymodels:tiny_images"]
        + ["--max-accuracy-drop", "50%", "--variants", "all", "-o", str(out), "--bench-seconds", "0.05"],
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_a_bundle_profiles_fp32_next_to_the_int8_variant(int8_bundle):
    from edgerun.bundle import open_bundle

    int8 = next(m for m in open_bundle(int8_bundle).manifest.all_models() if m.precision == "int8")
    args = ["profile", int8_bundle, "--variant", int8.path, "--batch", "1,4", "--runs", "3", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    profiles = json.loads(result.stdout)["profiles"]
    assert [p["batch"] for p in profiles] == [1, 1, 4, 4]
    fp32, int8 = profiles[:2]
    assert fp32["label"].endswith("(fp32)") and not int8["label"].endswith("(fp32)")
    assert int8["shares"]["conv_matmul_int8"] > 0 and fp32["shares"]["conv_matmul_int8"] == 0
    assert {o["op_type"] for o in int8["op_types"]} & {"QLinearConv", "QuantizeLinear", "DequantizeLinear"}


def test_the_bundle_report_says_where_the_time_goes(int8_bundle):
    from pathlib import Path

    report = (Path(int8_bundle) / "report.md").read_text()
    assert "## Where the time goes (chosen variant)" in report and "| op type | ms | share | nodes |" in report


def test_an_unknown_variant_is_one_clear_error(int8_bundle):
    result = CliRunner().invoke(main, ["profile", int8_bundle, "--variant", "nope"])
    assert result.exit_code == 2 and "--variant 'nope' is not in the bundle" in result.stderr
