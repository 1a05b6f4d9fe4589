"""Host latency measurement: median-of-runs timing of an ORT session at batch 1.

Timings are only ever compared side by side in one process (this machine is shared and
noisy); the timer is injectable so selection logic can be tested deterministically.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def measure_latency(
    run: Callable[[], object],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_seconds: float = 2.0,
    timer: Callable[[], float] = time.perf_counter,
) -> dict:
    """Time ``run()`` repeatedly: p50/p90 in milliseconds and the number of runs."""
    for _ in range(warmup):
        run()
    samples = []
    deadline = timer() + max_seconds
    while len(samples) < min_runs or (timer() < deadline and len(samples) < 2000):
        start = timer()
        run()
        samples.append((timer() - start) * 1000.0)
        if len(samples) >= min_runs and timer() >= deadline:
            break
    data = np.asarray(samples)
    return {"p50_ms": round(float(np.percentile(data, 50)), 4), "p90_ms": round(float(np.percentile(data, 90)), 4), "runs": len(samples)}


def session_latency(session, feed: dict[str, np.ndarray], **kwargs) -> dict:
    return measure_latency(lambda: session.run(None, feed), **kwargs)


def torch_latency(module, feed: dict[str, np.ndarray], names: list[str], **kwargs) -> dict:
    import torch

    args = [torch.from_numpy(feed[n]) for n in names]

    def run():
        with torch.no_grad():
            module(*args)

    return measure_latency(run, **kwargs)
