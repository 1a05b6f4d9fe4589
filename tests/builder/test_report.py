"""report.md notes and report.png: readable when candidates measure alike."""

from __future__ import annotations

from edgebuild.candidates import Candidate
from edgebuild.report import notes, write_plot


def _candidate(name, precision, p50, drop, kib, within=True, **metrics):
    c = Candidate(name, precision, metrics=dict(metrics))
    c.latency = {"p50_ms": p50}
    c.validation = {"packed": 0.9 - drop, "drop": drop}
    c.size_bytes = int(kib * 1024)
    c.within_budget = within
    return c


def test_plot_gives_every_candidate_its_own_row_when_latencies_cluster(tmp_path):
    from PIL import Image

    clustered = [
        _candidate(f"int8-variant-{i}", "int8", 5.0 + 0.01 * i, 0.001 * i, 400 + i, within=i < 5) for i in range(6)
    ]
    few = write_plot(tmp_path / "few.png", clustered[:2], clustered[0], "accuracy")
    many = write_plot(tmp_path / "many.png", clustered, clustered[0], "accuracy")
    assert few is not None and many is not None
    # One bar row per candidate: the figure grows with the candidates instead of stacking labels.
    assert Image.open(many).size[1] > Image.open(few).size[1]


def test_notes_explain_a_quantized_file_not_smaller_than_fp32_and_captured_library_output():
    fp32 = _candidate("fp32", "fp32", 5.0, 0.0, 100)
    qdq = _candidate(
        "int8-qdq",
        "int8",
        6.0,
        0.0,
        101,
        coverage={"fraction": 1.0},
        weight_storage="weights stay float32 behind Q/DQ pairs",
        library_messages={"count": 12, "first": "UserWarning: truncated"},
    )
    small = _candidate("int8-qop", "int8", 4.0, 0.0, 30, coverage={"fraction": 1.0})
    lines = notes([fp32, qdq, small], fp32)
    assert any("`int8-qdq` is 101.0 KiB, not smaller than FP32" in line and "Q/DQ pairs" in line for line in lines)
    assert any("12 library message(s)" in line for line in lines)
    assert not any("int8-qop" in line for line in lines)


def test_plot_draws_failed_candidates_and_writes_drops_as_drops(tmp_path, monkeypatch):
    import matplotlib.axes

    texts = []
    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(
        matplotlib.axes.Axes, "text", lambda self, x, y, s, **kw: texts.append(s) or real(self, x, y, s, **kw)
    )
    fp32 = _candidate("fp32", "fp32", 5.0, 0.0, 100)
    int8 = _candidate("int8-qdq", "int8", 4.0, 0.075, 30, within=False)
    failed = Candidate("int8-dynamic", "int8-dynamic", error="quantized 0 compute ops")
    assert write_plot(tmp_path / "p.png", [fp32, int8, failed], fp32, "accuracy") is not None
    assert any("drop 0.0750" in t for t in texts) and not any("+0.0750" in t for t in texts)
    assert any(t.strip() == "failed: quantized 0 compute ops" for t in texts)
