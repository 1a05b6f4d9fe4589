"""Self-benchmark: measure the session on this device before serving, and remember the choice.

Numbers are taken where the model will run (after the golden check), so the variant that is
served is the one that was fastest *here*, not on the build host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.isa import cpu_isa
from edgerun.session import ModelSession

log = logging.getLogger("edgerun")

# Stand-in for a dynamic non-batch dimension (sequence length, image side) with no golden data.
DEFAULT_DYNAMIC_DIM = 8


def example_feeds(
    model: ModelSession, batch: int, golden_inputs: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Feeds of ``batch`` rows: golden rows repeated when available, else zeros of the right shape.

    Zeros keep integer inputs (token ids, masks) in range for embeddings and gathers.
    """
    ranks = {spec.name: len(spec.shape) for spec in model.inputs}
    if golden_inputs and all(k in ranks and v.ndim == ranks[k] + 1 for k, v in golden_inputs.items()):
        # Per-call golden data (a first axis counting whole calls): one call is the example.
        return {k: np.ascontiguousarray(v[0]) for k, v in golden_inputs.items()}
    feeds = {}
    for spec in model.inputs:
        fixed_batch = spec.shape[0] if spec.shape and spec.shape[0] > 0 else None
        rows = fixed_batch or batch
        if golden_inputs is not None and spec.name in golden_inputs and len(golden_inputs[spec.name]):
            source = golden_inputs[spec.name]
            reps = -(-rows // len(source))
            feeds[spec.name] = np.ascontiguousarray(np.concatenate([source] * reps)[:rows])
        elif not spec.shape:  # a scalar input (a threshold, a temperature) has no batch dim
            feeds[spec.name] = np.zeros((), dtype=np.dtype(spec.dtype))
        else:
            shape = [rows] + [d if d > 0 else DEFAULT_DYNAMIC_DIM for d in spec.shape[1:]]
            feeds[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
    return feeds


def measure(
    model: ModelSession, feeds: dict[str, np.ndarray], *, warmup: int = 3, iters: int = 50, budget_s: float = 1.0
) -> dict[str, float]:
    """Latency percentiles (ms) and throughput (rows/s) of ``model.run`` on ``feeds``."""
    for _ in range(warmup):
        model.run(feeds)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < iters and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        model.run(feeds)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000.0
    rows = max((len(value) for value in feeds.values() if value.ndim), default=1)
    return {
        "batch": rows,
        "iterations": len(times),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "throughput_per_s": round(rows * 1000.0 / float(ms.mean()), 1),
    }


# What times one session on one feed: ``timer(model, feeds, budget_s=...)`` -> ``measure``'s numbers.
# The variant benchmark takes one so a test can make a variant look slow without a slow model.
Timer = Callable[..., dict[str, float]]


def self_benchmark(
    model: ModelSession,
    max_batch: int,
    golden_inputs: dict[str, np.ndarray] | None = None,
    *,
    budget_s: float = 1.0,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Warm up, then measure at batch 1 and (when the batch dim is dynamic) at ``max_batch``."""
    timer = timer or measure
    limit = getattr(model, "max_batch", None)
    if limit:
        max_batch = min(max_batch, limit)  # a TensorRT profile runs nothing larger
    results = {"batch_1": timer(model, example_feeds(model, 1, golden_inputs), budget_s=budget_s)}
    if max_batch > 1 and model.batchable:
        results[f"batch_{max_batch}"] = timer(model, example_feeds(model, max_batch, golden_inputs), budget_s=budget_s)
    return results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decision_key(
    bundle_sha256: str,
    providers: list[str],
    cpu: str | None = None,
    threads: int | None = None,
    isa: list[str] | None = None,
) -> str:
    """A variant choice is valid for one bundle, one provider list, one CPU model, one thread
    count (a variant that wins on 4 threads may lose on 1) and one set of ISA flags (INT8 wins
    with VNNI/AMX and loses without: a VM moved to another host keeps its model name but not
    always its flags)."""
    flags = sorted(isa if isa is not None else cpu_isa())
    text = json.dumps([bundle_sha256, providers, cpu if cpu is not None else cpu_model(), threads, flags])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def find_decisions(cache_dir: Path, bundle_sha256: str) -> list[dict[str, Any]]:
    """The cached variant decisions recorded for one bundle (any provider list, thread count or ISA)."""
    directory = Path(cache_dir).expanduser() / "decisions"
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            decision = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(decision, dict) and decision.get("bundle") == bundle_sha256 and "variant" in decision:
            found.append(decision)
    return found


def read_decision(cache_dir: Path, key: str) -> dict[str, Any] | None:
    path = Path(cache_dir).expanduser() / "decisions" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_decision(cache_dir: Path, key: str, decision: dict[str, Any]) -> None:
    directory = Path(cache_dir).expanduser() / "decisions"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{key}.tmp"
        tmp.write_text(json.dumps(decision, indent=2))
        tmp.replace(directory / f"{key}.json")
    except OSError as exc:  # a read-only cache must not stop serving
        log.warning("could not cache the variant decision in %s: %s", directory, exc)
