"""Peak memory of Percentile/Entropy calibration: all samples in one collection call vs a few per call.

ONNX Runtime's histogram calibrators keep every intermediate output of a ``collect_data`` call in
memory before they histogram it. edgebuild feeds them through ORT's strided collection
(``CalibStridedMinMax``, ``HISTOGRAM_FEEDS_PER_CALL`` feeds per call, histograms merged between
calls). Each mode runs in its own process, so each peak RSS is its own.

    python benchmarks/calib_memory_bench.py                      # torchvision mobilenet_v2 at 320x320, 24 images
    python benchmarks/calib_memory_bench.py --model det.onnx --images 24 --method entropy
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replace_section

MODES = ("one call", "strided")


def _default_model(path: Path, size: int) -> Path:
    import torch
    import torchvision

    model = torchvision.models.mobilenet_v2().eval()  # random weights: memory does not depend on them
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(path),
        input_names=["images"],
        dynamic_axes={"images": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def _child(mode: str, model: str, images: int, method: str) -> dict:
    """One calibration in this process: quantize_static with the histogram method, peak RSS measured."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgebuild.data import Batch, CalibrationReader, DataSource
    from edgebuild.memory import PeakMemory
    from edgebuild.passes.quantize import HISTOGRAM_FEEDS_PER_CALL

    session = ort.InferenceSession(model)
    first = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in first.shape]
    rng = np.random.default_rng(0)
    x = rng.random((images, *shape[1:]), dtype=np.float32)
    source = DataSource("bench", lambda: [Batch({first.name: x[i : i + 8]}) for i in range(0, images, 8)])
    reader = CalibrationReader(source)
    extra: dict = {}
    if mode == "strided":
        reader.strided(HISTOGRAM_FEEDS_PER_CALL)
        extra["CalibStridedMinMax"] = HISTOGRAM_FEEDS_PER_CALL
    methods = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "int8.onnx"
        peak = PeakMemory()
        start = time.perf_counter()
        quantize_static(
            model,
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=methods[method],
            extra_options=extra,
        )
        seconds = time.perf_counter() - start
        memory = peak.read()
        fp32 = session.run(None, {first.name: x[:4]})[0].reshape(4, -1).astype(np.float64)
        int8 = ort.InferenceSession(str(dst)).run(None, {first.name: x[:4]})[0].reshape(4, -1).astype(np.float64)
    cosine = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    return {**memory, "seconds": round(seconds, 1), "cosine_vs_fp32": round(float(cosine.mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="ONNX model (default: torchvision mobilenet_v2 exported at --size)")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--method", choices=("percentile", "entropy"), default="percentile")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.images, args.method)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(_default_model(Path(tmp) / "model.onnx", args.size))
        results = {}
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--model", model, "--images", str(args.images)]
                + ["--method", args.method],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    one, strided = results["one call"], results["strided"]
    what = args.model or f"torchvision mobilenet_v2 (random weights) at {args.size}x{args.size}"
    lines = [
        f"Command: `python benchmarks/calib_memory_bench.py{' --model ' + args.model if args.model else ''} "
        f"--images {args.images} --method {args.method}` — {what}, {args.images} calibration samples, "
        f"{args.method} calibration, each mode in its own process (peak RSS of the process: model, data and ORT).",
        "",
        "| collection | peak RSS MB | calibration s | INT8 output cosine vs FP32 |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        r = results[mode]
        label = "all samples in one call (ORT default)" if mode == "one call" else "4 feeds per call (edgebuild)"
        lines.append(f"| {label} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | {r['cosine_vs_fp32']:.4f} |")
    ratio = strided["peak_rss_mb"] / one["peak_rss_mb"]
    lines += ["", f"Peak RSS, strided vs one call: {ratio:.2f}× (scope: {strided['peak_rss_scope']})."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        replace_section("Calibration memory (Percentile/Entropy)", body)


if __name__ == "__main__":
    main()
