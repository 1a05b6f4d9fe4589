"""Shared helpers for the benchmark scripts: interleaved timing and BENCHMARKS.md sections."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def interleaved_p50(
    runs: Mapping[str, Callable[[], object]], rounds: int = 5, per_round: int = 100
) -> dict[str, float]:
    """p50 latency (ms) of each callable, timed in alternating rounds so drift hits all alike.

    The order rotates every round and each block starts with a few untimed calls: whichever
    callable runs right after another one (PyTorch's thread pool winding down, caches holding
    the previous model) measured up to 1.5x slower on this machine.
    """
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for fn in runs.values():
        for _ in range(10):
            fn()
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = runs[name]
            for _ in range(3):
                fn()
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.percentile(values, 50)) for name, values in samples.items()}


def replace_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Write ``## heading`` + body into BENCHMARKS.md, replacing only that section."""
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nRatios measured side by side in one run; absolute times drift on this shared machine.\n"
    )
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
