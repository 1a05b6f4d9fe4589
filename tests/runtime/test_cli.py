"""The edgerun CLI: one-line errors, info/verify/bench, and a real server driven by tritonclient."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_fixtures import classifier_reference, free_port
from server_process import start_server, stop_server

from edgerun.cli import main


def test_runtime_never_imports_torch_or_builder():
    code = (
        "import sys, edgerun.server, edgerun.cli, edgerun.loader, edgerun.reload, edgerun.preprocess; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'edgebuild')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_import_is_light():
    code = "import sys, edgerun.cli; print([m for m in ('numpy', 'onnxruntime', 'fastapi') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_info_and_verify(bundles, cache_dir):
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(bundles["classifier"])])
    assert result.exit_code == 0, result.output
    assert "clf" in result.output and "x  float32  [-1, 4]" in result.output
    result = runner.invoke(main, ["info", "--json", str(bundles["pair"])])
    assert json.loads(result.output)["inputs"][1]["name"] == "attention_mask"
    result = runner.invoke(main, ["verify", str(bundles["classifier"]), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK clf") and "golden samples match" in result.output


def test_info_shows_the_task_and_its_postprocess(tmp_path, bundles):
    from runtime_fixtures import build_detector_bundle

    runner = CliRunner()
    detector = build_detector_bundle(
        tmp_path / "det", postprocess={"type": "detection", "format": "yolov8", "iou": 0.5}
    )
    result = runner.invoke(main, ["info", str(detector)])
    assert result.exit_code == 0, result.output
    assert "task       detection  format=yolov8 conf=0.25 iou=0.5 max_det=300" in result.output
    summary = json.loads(runner.invoke(main, ["info", "--json", str(detector)]).output)
    assert summary["task"] == "detection" and summary["postprocess"]["iou"] == 0.5
    assert (
        "task       classification  softmax=True top_k=2" in runner.invoke(main, ["info", str(bundles["image"])]).output
    )


def test_info_shows_what_the_golden_check_holds_the_model_to(tmp_path, bundles):
    from runtime_fixtures import build_detector_bundle

    from edgerun.manifest import GoldenSpec, GoldenThresholds

    runner = CliRunner()
    classifier = runner.invoke(main, ["info", str(bundles["classifier"])]).output
    assert "golden     golden.npz atol 0.0001 rtol 0.001, top-1 >= 1" in classifier
    boxes = GoldenThresholds(atol=9.0, min_box_iou=0.8, max_score_diff=0.02, min_box_match=0.95)
    checked = build_detector_bundle(tmp_path / "boxes", golden=GoldenSpec(atol=9.0, variants={"model.onnx": boxes}))
    line = "golden     golden.npz boxes: box IoU >= 0.8, matched >= 0.95, score diff <= 0.02"
    assert line in runner.invoke(main, ["info", str(checked)]).output


def test_bench_json(bundles, cache_dir):
    result = CliRunner().invoke(
        main, ["bench", str(bundles["classifier"]), "--json", "--batch", "4", "--cache-dir", str(cache_dir)]
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.output)["benchmark"]
    assert set(numbers) >= {"batch_1", "batch_4"}
    assert numbers["batch_4"]["p50_ms"] > 0 and numbers["batch_1"]["throughput_per_s"] > 0
    again = CliRunner().invoke(main, ["bench", str(bundles["classifier"]), "--json", "--cache-dir", str(cache_dir)])
    assert "cached" not in json.loads(again.output)["benchmark"]  # measured now, not the cached numbers


def test_bad_bundle_is_one_line_no_traceback(tmp_path, bundles):
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ nope")
    result = runner.invoke(main, ["verify", str(broken)])
    assert result.exit_code == 2 and "not valid JSON" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["--debug", "verify", str(broken)])
    assert result.exit_code != 0 and result.exception is not None


@pytest.fixture()
def served(bundles, cache_dir):
    proc, url = start_server([str(bundles["classifier"])], cache_dir)
    try:
        yield url.removeprefix("http://")
    finally:
        stop_server(proc)  # SIGTERM drains and exits cleanly


def test_real_server_with_tritonclient_json_and_binary(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=served)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("clf")
    meta = client.get_model_metadata("clf")
    assert meta["inputs"][0]["name"] == "x"
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    for binary in (False, True):
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("probs", binary_data=binary)]
        result = client.infer("clf", [tensor], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("probs"), classifier_reference(x), rtol=1e-5)
    # No requested outputs: tritonclient asks for all outputs in binary.
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    np.testing.assert_allclose(client.infer("clf", [tensor]).as_numpy("probs"), classifier_reference(x), rtol=1e-5)
    bad = httpclient.InferInput("x", [2, 3], "FP32")
    bad.set_data_from_numpy(np.ones((2, 3), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match="expects shape"):
        client.infer("clf", [bad])
    assert client.is_server_ready()


@pytest.mark.parametrize(
    "option",
    [["--max-batch", "0"], ["--max-queue", "0"], ["--timeout", "0"], ["--max-body-mb", "-1"], ["--threads", "0"]],
)
def test_serve_refuses_non_positive_limits_in_one_line(bundles, cache_dir, option, monkeypatch):
    import edgerun.server

    monkeypatch.setattr(edgerun.server, "serve", lambda app, **kwargs: None)  # never bind in this test
    result = CliRunner().invoke(
        main,
        [
            "serve",
            str(bundles["classifier"]),
            "--port",
            str(free_port()),
            "--cache-dir",
            str(cache_dir),
            "--no-bench",
            *option,
        ],
    )
    assert result.exit_code == 2, result.output
    assert option[0] in result.output and "Traceback" not in result.output


def test_short_help_and_debug_after_the_command():
    assert CliRunner().invoke(main, ["-h"]).exit_code == 0
    result = CliRunner().invoke(main, ["info", "/nonexistent-bundle", "--debug"])
    assert "No such option" not in result.output and result.exception is not None


def test_a_model_file_is_told_it_needs_a_bundle(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07")  # any model file: it is not opened as an archive
    result = CliRunner().invoke(main, ["info", str(model)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "is a model file, not a bundle" in result.stderr and "edgebuild pack model.onnx" in result.stderr
    assert "method gz" not in result.stderr
