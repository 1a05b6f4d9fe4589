"""CPU bundles ship the validated contenders; the device's self-benchmark picks among them per ISA."""

import json

import pytest
from click.testing import CliRunner

from edgebuild.candidates import Candidate
from edgebuild.cli import main
from edgebuild.shipping import MAX_INT8, contenders, family
from edgerun.bench import decision_key
from edgerun.bundle import open_bundle
from edgerun.isa import parse_flags
from edgerun.loader import LoadOptions, describe_bundle, load_model


@pytest.fixture(scope="module")
def x86_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("x86")
    result = CliRunner().invoke(
        main,
        ["pack", "tinymodels:tiny_cnn", "--calib-data", "tinymodels:tiny_images", "--max-accuracy-drop", "0.5"]
        + ["--target", "x86", "-o", str(out), "--bench-seconds", "0.05"],
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _fake_timer(slow_precisions):
    """A timing source that sees the given precisions 10x slower than the others."""

    def timer(model, feeds, budget_s=1.0):
        p50 = 10.0 if model.variant.precision in slow_precisions else 1.0
        rows = max((len(v) for v in feeds.values() if v.ndim), default=1)
        return {
            "batch": rows,
            "iterations": 5,
            "p50_ms": p50,
            "p90_ms": p50,
            "p99_ms": p50,
            "throughput_per_s": rows * 1000.0 / p50,
        }

    return timer


def test_x86_bundle_carries_fp32_and_int8_with_the_host_isa(x86_bundle):
    manifest = open_bundle(x86_bundle).manifest
    precisions = [m.precision for m in manifest.all_models()]
    assert "fp32" in precisions and any(p in ("int8", "mixed") for p in precisions)
    assert len(precisions) <= 1 + MAX_INT8
    isa = manifest.benchmark["host"]["isa"]
    assert isinstance(isa, list)
    assert all(m.benchmark and m.benchmark["isa"] == isa for m in manifest.all_models())


@pytest.mark.parametrize("slow, served", [({"int8", "mixed"}, "fp32"), ({"fp32"}, "int8")])
def test_the_device_benchmark_decides_the_precision(x86_bundle, tmp_path, slow, served):
    options = LoadOptions(cache_dir=tmp_path, bench=True, threads=1, variant_timer=_fake_timer(slow))
    model = load_model(x86_bundle, options)
    try:
        assert model.parameters["precision"] in ({served, "mixed"} if served == "int8" else {served})
        assert model.parameters["benchmark"]["isa"] == describe_bundle(x86_bundle)["device"]["isa"]
    finally:
        model.close()
    info = describe_bundle(x86_bundle, cache_dir=tmp_path)
    (choice,) = info["device"]["choices"]
    assert choice["variant"] == model.parameters["variant"] and len(choice["p50_ms"]) >= 2


def test_edgerun_info_shows_the_device_isa_and_the_choice(x86_bundle, tmp_path):
    from edgerun.cli import main as edgerun_main

    runner = CliRunner()
    before = runner.invoke(edgerun_main, ["info", x86_bundle, "--cache-dir", str(tmp_path)])
    assert before.exit_code == 0, before.output
    assert "device " in before.output and "not measured on this device yet" in before.output
    load_model(x86_bundle, LoadOptions(cache_dir=tmp_path, threads=1, variant_timer=_fake_timer({"fp32"}))).close()
    after = runner.invoke(edgerun_main, ["info", x86_bundle, "--cache-dir", str(tmp_path), "--json"])
    summary = json.loads(after.output)
    assert summary["device"]["choices"][0]["precision"] != "fp32"
    assert summary["host_isa"] == open_bundle(x86_bundle).manifest.benchmark["host"]["isa"]


def test_variants_one_keeps_a_single_variant_bundle(tmp_path):
    result = CliRunner().invoke(
        main,
        ["pack", "tinymodels:tiny_cnn", "--calib-data", "tinymodels:tiny_images", "--max-accuracy-drop", "0.5"]
        + ["--variants", "one", "-o", str(tmp_path), "--bench-seconds", "0.05"],
    )
    assert result.exit_code == 0, result.stderr
    assert open_bundle(result.stdout.strip().splitlines()[-1]).manifest.variants == []


def _candidate(name, precision, p50, **settings):
    return Candidate(
        name,
        precision,
        metrics={"settings": settings} if settings else {},
        latency={"p50_ms": p50},
        within_budget=True,
        size_bytes=1,
    )


def test_contenders_are_one_float_and_the_best_int8_of_each_family_bounded():
    fp32 = _candidate("fp32", "fp32", 5.0)
    qdq = _candidate("int8-qdq", "int8", 2.0, format="qdq", reduce_range=False)
    qdq_slow = _candidate("int8-qdq-entropy", "int8", 2.5, format="qdq", reduce_range=False)
    qop = _candidate("int8-qop", "int8", 3.0, format="qoperator", reduce_range=False)
    rr = _candidate("int8-qdq-rr", "int8", 3.5, format="qdq", reduce_range=True)
    out_of_budget = _candidate("int8-fast-but-wrong", "int8", 0.5, format="qoperator", reduce_range=True)
    out_of_budget.within_budget = False
    shipped = contenders(qdq, [fp32, qdq, qdq_slow, qop, rr, out_of_budget])
    assert [c.name for c in shipped] == ["int8-qdq", "fp32", "int8-qop"]
    assert family(qdq) != family(qop) != family(rr)
    # FP32 chosen: it is the float contender; two INT8 families join it.
    assert [c.name for c in contenders(fp32, [fp32, qdq, qdq_slow, qop, rr])] == ["fp32", "int8-qdq", "int8-qop"]


def test_isa_flags_are_parsed_and_key_the_decision():
    flags = parse_flags("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8\n")
    assert flags == ["amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx512f"]
    assert parse_flags("flags : fpu avx2\n") == ["avx2"]
    key = decision_key("b" * 64, ["CPUExecutionProvider"], "cpu", threads=2, isa=["avx2"])
    assert key != decision_key("b" * 64, ["CPUExecutionProvider"], "cpu", threads=2, isa=["avx2", "avx512_vnni"])
