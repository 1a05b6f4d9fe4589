"""FP32 vs INT8 for the embedded digits example: latency ratio, size ratio, accuracy delta.

python benchmarks/pack_digits.py            # prints the table and updates BENCHMARKS.md
"""

from __future__ import annotations

import platform
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_p50, replace_section

from edgebuild.examples.digits import pretrained, validation_data
from edgebuild.onnx_utils import make_session
from edgebuild.pack import PackOptions, pack

COMMAND = "python benchmarks/pack_digits.py"


def main() -> None:
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        result = pack(
            PackOptions(target="x86", output_dir=Path(tmp), ship_variants=True, bench_seconds=0.5),
            progress=lambda m: None,
        )
        manifest = result.manifest
        models = {m.path: m for m in manifest.all_models()}
        x = next(validation_data(batch_size=1))[0]
        sessions = {path: make_session(result.bundle / path, threads=2) for path in models}
        runs: dict[str, Callable[[], object]] = {
            path: partial(s.run, None, {"input": x}) for path, s in sessions.items()
        }
        module = pretrained()
        tx = torch.from_numpy(x)
        runs["torch-eager"] = lambda: module(tx)
        with torch.no_grad():
            p50 = interleaved_p50(runs)
    fp32_path = next(p for p, m in models.items() if m.precision == "fp32")
    fp32 = models[fp32_path]
    rows = [
        "| variant | precision | p50 ms | time vs ORT FP32 (lower = faster) | size KiB | size vs FP32 | accuracy | drop vs FP32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, m in models.items():
        v = m.validation or {}
        rows.append(
            f"| {path}{' (chosen)' if path == 'model.onnx' else ''} | {m.precision} | {p50[path]:.4f} | "
            f"{p50[path] / p50[fp32_path]:.2f}× | {m.size_bytes / 1024:.1f} | {m.size_bytes / fp32.size_bytes:.2f}× | "
            f"{v['packed']:.4f} | {v['drop']:+.4f} |"
        )
    rows.append(
        f"| PyTorch eager | fp32 | {p50['torch-eager']:.4f} | {p50['torch-eager'] / p50[fp32_path]:.2f}× | | | | |"
    )
    body = "\n".join(
        [
            f"Command: `{COMMAND}` — batch 1, 2 threads, interleaved rounds; {platform.machine()}.",
            "",
            *rows,
            "",
            "The digits CNN is tiny (~30k parameters, well under 0.1 ms per image), so fixed per-op costs dominate: INT8 "
            "shrinks the file less than the 0.30× expected of large models (quantization parameters and the graph are a "
            "bigger share) and its speed edge is within a few tens of percent at best. At 20–70 µs per call the run-to-run "
            "variation of this VM is as large as the differences (the same file measured 39 µs in one run and 67 µs in the "
            "next), so these latency ratios are not meaningful; size and accuracy are. Within 5 % timing noise `auto` "
            "prefers the smaller file.",
        ]
    )
    print(body)
    replace_section("Digits example: FP32 vs INT8 (pack)", body)


if __name__ == "__main__":
    main()
