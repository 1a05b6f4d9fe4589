"""inspect/compare: ptflops totals and per-layer rows, ONNX shape-based counts, CLI output."""

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgebuild.cli import main
from edgebuild.inspection import compare_models, format_comparison, format_report, inspect_source
from edgebuild.sources import InputSpec, ModelSource, load_model


class TwoConv(nn.Module):
    example_inputs = (torch.zeros(1, 3, 8, 8),)

    def __init__(self):
        super().__init__()
        self.small = nn.Conv2d(3, 4, 1, bias=False)  # 8*8*4*3 = 768 MACs
        self.big = nn.Conv2d(4, 16, 3, padding=1, bias=False)  # 8*8*16*4*9 = 36864 MACs
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.big(self.small(x)).mean((2, 3)))


def two_conv():
    return TwoConv().eval()


def _conv_onnx(path, out_channels=16):
    w = numpy_helper.from_array(np.ones((out_channels, 4, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, 8, 8])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_torch_model_totals_and_per_layer_rows_sorted_by_macs():
    source = ModelSource("callable", "t:two_conv", [InputSpec("input", (1, 3, 8, 8), "float32")], module=two_conv())
    report = inspect_source(source, measure_latency=False)
    assert report.params == sum(p.numel() for p in source.module.parameters())
    by_name = {c.name: c for c in report.layers}
    assert by_name["big"].macs == 36864 and by_name["small"].macs == 768
    assert by_name["big"].output_shape == [1, 16, 8, 8] and by_name["big"].activation_bytes == 16 * 64 * 4
    assert [c.name for c in report.layers][:2] == ["big", "small"]
    assert report.macs >= 36864 + 768 and report.flops == 2 * report.macs
    assert report.activation_bytes_peak >= 16 * 64 * 4 and report.latency is None
    assert "big" in format_report(report)


def test_onnx_model_counts_macs_from_shapes_and_measures_latency(tmp_path):
    source = load_model(str(_conv_onnx(tmp_path / "conv.onnx")))
    report = inspect_source(source, bench_seconds=0.01, workdir=tmp_path)
    assert report.macs == 8 * 8 * 16 * 4 * 9 and report.params == 16 * 4 * 9
    assert report.latency["p50_ms"] > 0 and report.onnx_size_bytes > 0


def test_compare_ranks_models(tmp_path):
    big = str(_conv_onnx(tmp_path / "big.onnx", out_channels=16))
    small = str(_conv_onnx(tmp_path / "small.onnx", out_channels=2))
    for sort_by in ("macs", "params"):
        reports = compare_models([big, small], bench_seconds=0.01, sort_by=sort_by)
        assert [Path(r.model).name for r in reports] == ["small.onnx", "big.onnx"], sort_by
    assert reports[0].macs * 8 == reports[1].macs and reports[0].params * 8 == reports[1].params
    rows = format_comparison(reports).splitlines()[2:]
    assert rows[0].startswith("| 1 | ") and "small.onnx" in rows[0]
    assert rows[1].startswith("| 2 | ") and "big.onnx" in rows[1]


def test_cli_inspect_json_and_compare_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "test_inspection:two_conv", "--no-latency", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layers"][0]["name"] == "big" and data["flops"] == 2 * data["macs"]
    path = str(_conv_onnx(tmp_path / "conv.onnx"))
    result = runner.invoke(main, ["compare", path, "--bench-seconds", "0.01"])
    assert result.exit_code == 0 and result.stdout.startswith("| rank | model | MACs")
    bad = runner.invoke(main, ["inspect", "test_inspection:nope"])
    assert bad.exit_code == 2 and "has no attribute" in bad.stderr
