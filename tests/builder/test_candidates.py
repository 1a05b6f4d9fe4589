"""Choosing among candidates uses recorded measurements (no wall-clock thresholds); CLI exit codes for budgets and bad combinations."""

import itertools

import pytest
from click.testing import CliRunner

from edgebuild.benchmark import measure_latency
from edgebuild.candidates import Candidate, apply_budget, select
from edgebuild.cli import main


def _candidate(name, precision, p50, drop, size, finite=True, error=None):
    c = Candidate(name, precision, error=error)
    c.path = None if error else object()  # usable without a file: selection only reads measurements
    c.latency = {"p50_ms": p50, "p90_ms": p50, "runs": 20}
    c.validation = {"drop": drop, "finite": finite, "metric": "accuracy", "packed": 0.9 - drop}
    c.size_bytes = size
    return c


def test_auto_picks_the_measured_fastest_candidate_within_budget():
    fp32 = _candidate("fp32", "fp32", 1.0, 0.0, 1000)
    qdq = _candidate("int8-qdq", "int8", 0.6, 0.004, 300)
    qop = _candidate("int8-qop", "int8", 0.4, 0.03, 250)  # fastest but over budget
    mixed = _candidate("int8-partial", "mixed", 0.5, 0.009, 400)
    broken = _candidate("fp16", "fp16", 0.1, 0.0, 500, finite=False)
    failed = _candidate("int8-dynamic", "int8-dynamic", 0.05, 0.0, 200, error="quantized 0 compute ops")
    candidates = [fp32, qdq, qop, mixed, broken, failed]
    apply_budget(candidates, 0.01)
    assert [c.within_budget for c in candidates] == [True, True, False, True, False, False]
    assert select(candidates) is mixed
    assert select(candidates, "size") is qdq
    apply_budget(candidates, 0.005)
    assert select(candidates) is qdq
    apply_budget(candidates, -1.0)
    assert select(candidates) is None


def test_speed_ties_within_timing_noise_go_to_the_smaller_file():
    qdq = _candidate("int8-qdq", "int8", 1.00, 0.0, 460)
    qop = _candidate("int8-qop", "int8", 1.04, 0.0, 375)  # 4 % slower: a tie on a noisy host
    fp32 = _candidate("fp32", "fp32", 1.20, 0.0, 1270)  # 20 % slower: not a tie
    apply_budget([qdq, qop, fp32], 0.01)
    assert select([qdq, qop, fp32]) is qop
    qop.latency["p50_ms"] = 1.10
    assert select([qdq, qop, fp32]) is qdq


def test_latency_measurement_uses_the_injected_timer():
    ticks = itertools.count(0.0, 0.001)  # every timer call advances 1 ms
    result = measure_latency(lambda: None, warmup=1, min_runs=5, max_seconds=0.0, timer=lambda: next(ticks))
    assert result == {"p50_ms": 1.0, "p90_ms": 1.0, "runs": 5}


def _pack(tmp_path, *args):
    return CliRunner().invoke(main, ["pack", *args, "-o", str(tmp_path / "out"), "--bench-seconds", "0.02"])


@pytest.mark.slow
def test_forced_int8_over_budget_exits_3_with_report_and_no_bundle(tmp_path):
    result = _pack(
        tmp_path,
        "tinymodels:tiny_cnn",
        "--quantize",
        "int8",
        "--calib-data",
        "tinymodels:tiny_images",
        "--val-data",
        "tinymodels:tiny_images",
        "--metric",
        "cosine",
        "--max-accuracy-drop",
        "0",
        "--no-partial",
    )
    assert result.exit_code == 3, result.output
    assert "no variant within --max-accuracy-drop 0.0" in result.stderr and "cosine" in result.stderr
    out = tmp_path / "out"
    assert (out / "tiny-cnn-x86.report.md").is_file() and not (out / "tiny-cnn-x86").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--distill"], "--distill needs --train-data"),
        (["--prune", "1.5"], "strictly between 0 and 1"),
        (["--prune", "0"], "strictly between 0 and 1"),
        (["--quantize", "fp16"], "not allowed on target 'x86'"),
        (["--student", "tinymodels:tiny_cnn"], "--student needs --distill"),
        (["--prune-method", "channel"], "--prune-method needs --prune"),
        (["--train-data", "tinymodels:tiny_images"], "--train-data is used by --distill"),
        (["--distill", "--train-data", "random"], "real training samples"),
        (
            [
                "--prune",
                "0.3",
                "--distill",
                "--train-data",
                "tinymodels:tiny_images",
                "--student",
                "tinymodels:tiny_cnn",
            ],
            "--student replaces",
        ),
        (["--distill", "--train-data", "tinymodels:tiny_images", "--alpha", "2"], "--alpha"),
    ],
)
def test_bad_combinations_exit_2_with_a_clear_message_and_nothing_written(tmp_path, args, message):
    result = _pack(tmp_path, "tinymodels:tiny_cnn", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_report_table_shows_precision_coverage_and_failures():
    from edgebuild.report import candidate_table

    mixed = _candidate("int8-partial", "mixed", 0.5, 0.009, 400)
    mixed.metrics = {
        "recipe": "QDQ U8S8 per-channel 2 nodes float",
        "coverage": {"quantized_compute_ops": 4, "compute_ops": 6, "fraction": 0.67},
    }
    failed = _candidate("int8-dynamic", "int8-dynamic", 0.05, 0.0, 200, error="quantized 0 compute ops")
    failed.metrics = {"coverage": {"quantized_compute_ops": 0, "compute_ops": 2, "fraction": 0.0}}
    apply_budget([mixed, failed], 0.01)
    lines = candidate_table([mixed, failed], mixed)
    assert "| int8-partial **(chosen)** | mixed | QDQ U8S8 per-channel 2 nodes float |" in lines[2] and lines[
        2
    ].endswith("| yes | 4/6 |")
    assert "failed: quantized 0 compute ops" in lines[3] and lines[3].endswith("| no | 0/2 |")


def test_a_forced_precision_slower_than_fp32_is_not_called_fastest():
    from edgebuild.candidates import choice_reason

    fp32 = _candidate("fp32", "fp32", 1.231, 0.0, 1000)
    int8 = _candidate("int8-qdq-u8s8-per-channel", "int8", 2.207, 0.0, 300)
    reason = choice_reason(int8, fp32, None, "latency", forced="int8")
    assert reason.startswith("fastest in-budget variant of the precision --quantize int8 forces")
    assert "WARNING: 0.56x the speed of FP32, SLOWER on this host" in reason and "--quantize auto" in reason
    faster = _candidate("int8-qdq", "int8", 0.8, 0.0, 300)
    assert "SLOWER" not in choice_reason(faster, fp32, None, "latency", forced="int8")
    assert choice_reason(faster, fp32, None, "latency").startswith("fastest in-budget variant on this host")


def test_report_table_keeps_a_failed_candidates_whole_reason():
    from edgebuild.report import candidate_table

    reason = (
        "quantized 0 compute ops (weights inside If/Loop subgraphs are not quantized); not an INT8 model | "
        "the tail of the reason is no longer cut"
    )
    failed = _candidate("int8-dynamic", "int8-dynamic", 0.05, 0.0, 200, error=reason)
    line = candidate_table([failed], None)[2]
    assert "not an INT8 model \\| the tail of the reason is no longer cut |" in line
