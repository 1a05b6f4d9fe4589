"""Compression side by side: PyTorch eager, ORT FP32, each single INT8 recipe, edgebuild's auto choice,
and (digits) channel pruning + distillation.

    python benchmarks/compression_bench.py          # ~5-10 minutes on 2 cores; prints the table, updates BENCHMARKS.md

torchvision models are untrained (weights=None: no downloads here) and calibrated/validated on 32
smooth random "image-like" inputs: that is enough to time them, NOT to judge their accuracy
(measured: random calibration hides real accuracy loss). Their budget uses output cosine.
Accuracy is only reported for digits, which has real labelled data.
"""

from __future__ import annotations

import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_p50, replace_section

COMMAND = "python benchmarks/compression_bench.py"
THREADS = 2
RECIPES = [("QDQ", False), ("QDQ", True), ("QOperator", False), ("QOperator", True)]


def image_like(n: int, seed: int) -> np.ndarray:
    """Smooth random images (low-resolution noise, upsampled) normalised with ImageNet statistics."""
    import torch

    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 3, 14, 14), dtype=np.float32))
    x = torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear", align_corners=False).numpy()
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


def torchvision_factory(name: str):
    import torchvision

    def make():
        model = getattr(torchvision.models, name)(weights=None).eval()
        model.input_shape = (1, 3, 224, 224)
        return model

    return make


def bench_model(
    label: str,
    spec: str,
    module,
    work: Path,
    calib: str,
    val: str,
    feed: dict,
    metric: str | None,
    max_drop: float,
    labelled_val=None,
    extra_packs: dict | None = None,
) -> dict:
    """Every variant of one model, timed side by side (interleaved rounds, batch 1, 2 threads)."""
    import torch

    from edgebuild.data import open_data
    from edgebuild.export import export_onnx
    from edgebuild.onnx_utils import make_session
    from edgebuild.pack import PackOptions, pack
    from edgebuild.passes import quantize as q
    from edgebuild.sources import load_model

    source = load_model(spec)
    t0 = time.monotonic()
    fp32 = export_onnx(source, work, 18).path
    calibration = open_data(calib, source.inputs, purpose="calibration", limit=32)
    files = {"ORT FP32": fp32}
    for fmt, reduce_range in RECIPES:
        path = work / f"{fmt}-{reduce_range}.onnx"
        q.quantize_static_int8(
            fp32, path, calibration, q.StaticInt8Config(format=fmt.lower(), reduce_range=reduce_range)
        )
        files[f"{fmt}{' reduce_range' if reduce_range else ''}"] = path
    packs: dict[str, dict[str, Any]] = {"edgebuild auto": {}}
    packs.update(extra_packs or {})
    chosen = {}
    for name, extra in packs.items():
        result = pack(
            PackOptions(
                model=spec,
                target="x86",
                output_dir=work / name.replace(" ", "-"),
                calib_data=calib,
                val_data=val,
                metric=metric,
                max_accuracy_drop=max_drop,
                bench_seconds=0.5,
                calib_samples=32,
                force=True,
                **extra,
            ),
            progress=lambda m: None,
        )
        files[name] = result.bundle / "model.onnx"
        chosen[name] = result
    sessions = {name: make_session(path, threads=THREADS) for name, path in files.items()}
    runs: dict[str, Callable[[], object]] = {name: partial(s.run, None, feed) for name, s in sessions.items()}
    args = [torch.from_numpy(feed[n]) for n in source.input_names]
    runs["PyTorch eager"] = lambda: module(*args)
    torch.set_num_threads(THREADS)
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(3):
            runs["ORT FP32"]()
        per_call = (time.perf_counter() - start) / 3
        # Many short rounds: two sessions of the same file differ by ±6% over 3 long rounds, ±2% over 10.
        p50 = interleaved_p50(runs, rounds=10, per_round=max(5, min(30, int(0.1 / max(per_call, 1e-5)))))
    rows = {}
    for name in ["PyTorch eager", *files]:
        row: dict[str, Any] = {"p50_ms": p50[name]}
        if name in files:
            row["size"] = files[name].stat().st_size
        if name in chosen:
            row["chosen"] = chosen[name].chosen.name
            row["precision"] = chosen[name].chosen.precision
        if labelled_val is not None:
            x, y = labelled_val
            if name == "PyTorch eager":
                with torch.no_grad():
                    out = module(torch.from_numpy(x)).numpy()
            else:
                out = sessions[name].run(None, {source.input_names[0]: x})[0]
            row["accuracy"] = float((out.argmax(1) == y).mean())
        rows[name] = row
    print(f"{label}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    results: dict[str, dict] = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="compression-bench-") as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(work))
        np.savez(work / "calib.npz", x=image_like(32, 0))
        np.savez(work / "val.npz", x=image_like(32, 1))
        factories = {}
        for name in ("resnet18", "mobilenet_v2", "mobilenet_v3_small"):
            factories[name] = torchvision_factory(name)
        module_file = work / "bench_models.py"
        module_file.write_text(
            "from compression_bench import torchvision_factory\n"
            + "\n".join(f"{n} = torchvision_factory('{n}')" for n in factories)
            + "\n"
        )
        sys.path.insert(0, str(Path(__file__).parent))
        image_feed = {"input": image_like(1, 2)}
        for name, factory in factories.items():
            model_dir = work / name
            model_dir.mkdir()
            results[name] = bench_model(
                name,
                f"bench_models:{name}",
                factory(),
                model_dir,
                str(work / "calib.npz"),
                str(work / "val.npz"),
                image_feed,
                "cosine",
                0.01,
            )

        from edgebuild.examples import digits

        _, _, x_val, y_val = digits._splits()
        digits_dir = work / "digits"
        digits_dir.mkdir()
        prune_pack = {"pruned 30% channels + distilled": dict(torch_passes=_prune_distill_passes())}
        results["digits"] = bench_model(
            "digits",
            "edgebuild.examples.digits:pretrained",
            digits.pretrained(),
            digits_dir,
            "edgebuild.examples.digits:calibration_data",
            "edgebuild.examples.digits:validation_data",
            {"input": x_val[:1]},
            None,
            0.01,
            labelled_val=(x_val, y_val),
            extra_packs=prune_pack,
        )
    body = render(results, time.monotonic() - began)
    print(body)
    replace_section("Compression", body)


def _prune_distill_passes() -> list:
    from edgebuild.passes.distill import DistillConfig, DistillPass
    from edgebuild.passes.prune import PruneConfig, PrunePass

    return [
        PrunePass(PruneConfig(amount=0.3, method="channel")),
        DistillPass(DistillConfig(train_data="edgebuild.examples.digits:train_data", epochs=10, learning_rate=1e-3)),
    ]


def render(results: dict[str, dict], seconds: float) -> str:
    lines = [
        f"Command: `{COMMAND}` (one process, {seconds / 60:.1f} min) — batch 1, {THREADS} threads, interleaved rounds, "
        f"p50 latency; {platform.machine()}. torchvision models are untrained (weights=None) and calibrated and validated on 32 "
        "smooth random image-like inputs, which is fine for timing only: their accuracy is not measured (budget: output cosine "
        "drop ≤ 0.01 vs PyTorch). Digits uses its real splits (accuracy on 450 held-out images). Hand recipes are U8S8 per-channel "
        "MinMax static INT8.",
        "",
        "| model | variant | p50 ms | speed-up vs eager | vs ORT FP32 | size MiB | size vs FP32 | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    speedups = []
    for model, rows in results.items():
        eager, fp32 = rows["PyTorch eager"]["p50_ms"], rows["ORT FP32"]["p50_ms"]
        fp32_size = rows["ORT FP32"]["size"]
        for name, row in rows.items():
            label = name + (f" → {row['chosen']} ({row['precision']})" if "chosen" in row else "")
            size = f"{row['size'] / 2**20:.2f}" if "size" in row else ""
            ratio = f"{row['size'] / fp32_size:.2f}×" if "size" in row else ""
            acc = f"{row['accuracy']:.4f}" if "accuracy" in row else "–"
            lines.append(
                f"| {model} | {label} | {row['p50_ms']:.3f} | {eager / row['p50_ms']:.2f}× | {fp32 / row['p50_ms']:.2f}× | "
                f"{size} | {ratio} | {acc} |"
            )
        auto = rows["edgebuild auto"]
        hand = [rows[k]["p50_ms"] for k in rows if k.startswith(("QDQ", "QOperator"))]
        best_hand = min(hand)
        ok_hand = auto["p50_ms"] <= 1.05 * best_hand
        ok_fp32 = auto["p50_ms"] <= 1.05 * fp32
        size_ok = auto["precision"] != "int8" or auto["size"] <= 0.30 * fp32_size
        checks.append(
            f"- {model}: auto {auto['p50_ms']:.3f} ms vs best hand recipe {best_hand:.3f} ms "
            f"({auto['p50_ms'] / best_hand:.2f}×: {'OK' if ok_hand else 'MISSED'} ±5%), vs ORT FP32 {fp32:.3f} ms "
            f"({'OK' if ok_fp32 else 'MISSED'}); size {auto['size'] / fp32_size:.2f}× FP32"
            f"{'' if auto['precision'] != 'int8' else (' (INT8 ≤ 0.30×: OK)' if size_ok else ' (INT8 ≤ 0.30×: MISSED)')}"
        )
        if model != "digits":
            speedups.append(eager / auto["p50_ms"])
    geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups)) if speedups else float("nan")
    checks.append(
        f"- geomean speed-up of auto over PyTorch eager, three torchvision models: {geomean:.2f}× "
        f"(target ≥ 4×: {'OK' if geomean >= 4 else 'MISSED'})"
    )
    digits_rows = results.get("digits", {})
    pruned = digits_rows.get("pruned 30% channels + distilled")
    if pruned:
        base = digits_rows["edgebuild auto"]
        checks.append(
            f"- digits, 30% channels pruned + distilled (then auto): speed-up {base['p50_ms'] / pruned['p50_ms']:.2f}× over "
            f"the unpruned auto bundle, accuracy {pruned.get('accuracy', float('nan')):.4f} vs "
            f"{base.get('accuracy', float('nan')):.4f}, size {pruned['size'] / base['size']:.2f}×"
        )
    checks.append(
        "- digits runs at 30–70 µs per call, where this VM's run-to-run variation (the same file measured 39 µs in one "
        "run, 67 µs in the next) exceeds the differences between variants: its latency checks are not meaningful, its "
        "size and accuracy are."
    )
    return "\n".join(lines + ["", "Targets:", *checks])


if __name__ == "__main__":
    main()
