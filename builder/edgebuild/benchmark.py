"""Host latency measurement: median-of-runs timing of an ORT session at batch 1.

Timings are only ever compared side by side in one process (this machine is shared and
noisy); the timer is injectable so selection logic can be tested deterministically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    samples: list[float] = []
    deadline = timer() + max_seconds
    while len(samples) < min_runs or (timer() < deadline and len(samples) < 2000):
        start = timer()
        run()
        samples.append((timer() - start) * 1000.0)
        if len(samples) >= min_runs and timer() >= deadline:
            break
    data = np.asarray(samples)
    return {
        "p50_ms": round(float(np.percentile(data, 50)), 4),
        "p90_ms": round(float(np.percentile(data, 90)), 4),
        "runs": len(samples),
    }


def session_latency(session: Any, feed: dict[str, np.ndarray], **kwargs: Any) -> dict:
    return measure_latency(lambda: session.run(None, feed), **kwargs)


def bench_bundle(location: str | Path, *, threads: int | None = None, max_seconds: float = 1.0) -> list[dict]:
    """Time every model file of a bundle on this host, with the session options it was validated with."""
    from edgebuild.onnx_utils import make_session
    from edgerun.bundle import open_bundle

    bundle = open_bundle(location)
    feed = {
        spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.dtype)
        for spec in bundle.manifest.inputs
    }
    if bundle.manifest.golden is not None:
        with np.load(bundle.path(bundle.manifest.golden.path)) as golden:
            # As many rows as the zeros above: one, or the batch size the model pins.
            feed = {name: golden[f"input:{name}"][: len(zeros)] for name, zeros in feed.items()}
    rows = []
    for model in bundle.manifest.all_models():
        session = make_session(bundle.path(model.path), model.session_options, threads=threads)
        measured = session_latency(session, feed, max_seconds=max_seconds)
        recorded = (model.benchmark or {}).get("p50_ms")
        rows.append({"path": model.path, "precision": model.precision, **measured, "recorded_p50_ms": recorded})
    return rows
