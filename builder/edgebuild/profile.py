"""``edgebuild profile``: where the time goes, per op type and per node.

ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) writes one Chrome-trace event
per node per run; each node's time is the median over the profiled runs, next to the median of
ORT's own ``model_run`` events (the run time the node times add up to, minus ORT's overhead
between nodes). The session is made with the options the bundle was validated with, so the
graph profiled is the one served (ORT fuses QDQ pairs into QLinear ops at load: the profile
shows what really runs).

Shares answer the usual question about an INT8 variant that is not faster: how much time sits
in Conv/MatMul-type ops at all, how much of that still runs in float, and how much goes to
Quantize/DequantizeLinear around the ops left in float. For a torch ``MODEL`` the eager model is
profiled too (``torch.profiler``, self CPU time per aten operator).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import UsageError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
INTEGER_OPS = frozenset(
    {"ConvInteger", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
)
# Op types whose work is a convolution or a matrix product (any precision, fused or not).
DENSE_MARKERS = ("Conv", "MatMul", "Gemm", "Attention")


def is_dense(op_type: str) -> bool:
    return any(marker in op_type for marker in DENSE_MARKERS)


def is_integer(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in INTEGER_OPS


@dataclass
class NodeTime:
    name: str
    op_type: str
    provider: str
    ms: float  # median over the profiled runs


@dataclass
class OpTypeTime:
    op_type: str
    ms: float
    share: float  # of the node total
    nodes: int


@dataclass
class Profile:
    """One model file at one batch size."""

    label: str  # "fp32", "model.onnx (int8)", ...
    path: str
    batch: int
    runs: int
    run_ms: float  # median of ORT's model_run events
    wall_ms: float  # median wall time of session.run around them
    nodes: list[NodeTime] = field(default_factory=list)

    @property
    def node_ms(self) -> float:
        return float(sum(n.ms for n in self.nodes))

    def by_op_type(self) -> list[OpTypeTime]:
        totals: dict[str, list[float]] = {}
        for node in self.nodes:
            totals.setdefault(node.op_type, []).append(node.ms)
        total = self.node_ms or 1.0
        rows = [OpTypeTime(op, float(sum(ms)), float(sum(ms)) / total, len(ms)) for op, ms in totals.items()]
        return sorted(rows, key=lambda r: -r.ms)

    def shares(self) -> dict[str, float]:
        """Fractions of the node total: Conv/MatMul-type ops (and those in float, those in integer),
        Quantize/DequantizeLinear, and everything else left in float."""
        total = self.node_ms or 1.0

        def share(predicate) -> float:
            return round(sum(n.ms for n in self.nodes if predicate(n.op_type)) / total, 4)

        return {
            "conv_matmul": share(is_dense),
            "conv_matmul_float": share(lambda op: is_dense(op) and not is_integer(op)),
            "conv_matmul_int8": share(lambda op: is_dense(op) and is_integer(op)),
            "quantize_dequantize": share(lambda op: op in QDQ_OPS),
            "other_float": share(lambda op: not is_dense(op) and op not in QDQ_OPS and not is_integer(op)),
            "other_int8": share(lambda op: not is_dense(op) and is_integer(op)),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "nodes"},
            "node_ms": round(self.node_ms, 4),
            "shares": self.shares(),
            "op_types": [asdict(r) for r in self.by_op_type()],
            "nodes": [asdict(n) for n in self.nodes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        own = {k: data[k] for k in ("label", "path", "batch", "runs", "run_ms", "wall_ms")}
        return cls(**own, nodes=[NodeTime(**n) for n in data["nodes"]])


def _events_per_run(trace: list[dict], skip: int) -> list[list[dict]]:
    """Node kernel events grouped by the model_run they fall in (the first ``skip`` runs are warm-up)."""
    runs = sorted(
        (e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    kernels = sorted(
        (e for e in trace if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    grouped: list[list[dict]] = [[] for _ in runs]
    i = 0
    for event in kernels:
        while i < len(runs) and event["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            i += 1
        if i < len(runs) and event["ts"] >= runs[i]["ts"]:
            grouped[i].append(event)
    return [[runs[j]] + grouped[j] for j in range(skip, len(runs))]


def profile_file(
    path: Path,
    feeds: dict[str, np.ndarray],
    session_options: Any = "all",
    *,
    label: str | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> Profile:
    """Profile ``runs`` runs of ``path`` on ``feeds`` (after ``warmup`` unprofiled-in-the-result runs)."""
    import time

    import onnxruntime as ort

    from edgerun.manifest import SessionOptionsSpec
    from edgerun.session import CPU, make_session_options

    if isinstance(session_options, str):
        session_options = SessionOptionsSpec.model_validate({"graph_optimization_level": session_options})
    with tempfile.TemporaryDirectory(prefix="edgebuild-profile-") as tmp:
        options = make_session_options(session_options, threads or 0)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        wall = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= warmup:
                wall.append((time.perf_counter() - start) * 1000.0)
        trace = json.loads(Path(session.end_profiling()).read_text())
    per_run = _events_per_run(trace, warmup)
    if not per_run:
        raise UsageError(f"ONNX Runtime recorded no runs while profiling {path}")
    times: dict[str, list[float]] = {}
    info: dict[str, tuple[str, str]] = {}
    for events in per_run:
        seen: dict[str, float] = {}
        for event in events[1:]:
            name = event["name"][: -len("_kernel_time")]
            seen[name] = seen.get(name, 0.0) + event["dur"] / 1000.0
            args = event.get("args", {})
            info[name] = (str(args.get("op_name", "?")), str(args.get("provider", "")))
        for name in info:
            times.setdefault(name, []).append(seen.get(name, 0.0))
    nodes = [
        NodeTime(name, info[name][0], info[name][1], round(float(np.median(values)), 5))
        for name, values in times.items()
    ]
    return Profile(
        label=label or Path(path).name,
        path=str(path),
        batch=_rows(feeds),
        runs=len(per_run),
        run_ms=round(float(np.median([e[0]["dur"] / 1000.0 for e in per_run])), 5),
        wall_ms=round(float(np.median(wall)), 5),
        nodes=sorted(nodes, key=lambda n: -n.ms),
    )


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return max((len(v) for v in feeds.values() if v.ndim), default=1)


def torch_profile(module: Any, feeds: dict[str, np.ndarray], runs: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Eager PyTorch by aten operator: self CPU time per run (ms), most expensive first (``feeds`` in
    the model's input order)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    args = [torch.from_numpy(v) for v in feeds.values()]  # positional, in input order, as the export calls it
    wall = []
    with torch.no_grad():
        for _ in range(warmup):
            module(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                start = time.perf_counter()
                module(*args)
                wall.append((time.perf_counter() - start) * 1000.0)
    ops = [
        {"op": e.key, "ms": round(e.self_cpu_time_total / 1000.0 / runs, 5), "calls": int(e.count // runs)}
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    return {
        "batch": _rows(feeds),
        "runs": runs,
        "wall_ms": round(float(np.median(wall)), 5),
        "ops": sorted(ops, key=lambda o: -o["ms"]),
    }


@dataclass
class ProfileReport:
    source: str
    profiles: list[Profile]
    torch: list[dict] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "profiles": [p.to_json() for p in self.profiles], "torch": self.torch}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProfileReport:
        return cls(data["source"], [Profile.from_json(p) for p in data["profiles"]], list(data.get("torch", [])))


# The largest batch profiled when the bundle records none: edgerun's default --max-batch.
DEFAULT_MAX_BATCH = 8


def _is_bundle(location: str) -> bool:
    return Path(location).is_dir() or location.endswith((".tar.gz", ".tgz"))


def _batched(example: dict[str, np.ndarray], batch: int, batchable: set[str]) -> dict[str, np.ndarray]:
    return {
        k: np.ascontiguousarray(np.concatenate([v] * batch)[: len(v) * batch]) if k in batchable else v
        for k, v in example.items()
    }


def profile_location(
    location: str,
    *,
    variant: str | None = None,
    batches: list[int] | None = None,
    runs: int = 20,
    threads: int | None = None,
    weights: str | None = None,
    input_shape: Any = None,
) -> ProfileReport:
    """Profile a BUNDLE (its FP32 variant next to the chosen one, or ``variant``) or a MODEL (its
    FP32 ONNX export, and the eager model by operator)."""
    if _is_bundle(location):
        return _profile_bundle(location, variant, batches, runs, threads)
    if variant is not None:
        raise UsageError(f"--variant names a variant of a bundle; '{location}' is a model, not a bundle directory")
    return _profile_model(location, batches, runs, threads, weights, input_shape)


def _profile_bundle(location: str, variant: str | None, batches: list[int] | None, runs: int, threads: int | None):
    from types import SimpleNamespace

    from edgerun.bench import example_feeds
    from edgerun.bundle import open_bundle
    from edgerun.golden import load_golden

    bundle = open_bundle(location)
    try:
        manifest = bundle.manifest
        models = manifest.all_models()
        chosen = manifest.model
        if variant is not None:
            named = [m for m in models if variant in (m.path, Path(m.path).stem, Path(m.path).name)]
            if not named:
                raise UsageError(
                    f"--variant '{variant}' is not in the bundle; its models are {', '.join(m.path for m in models)}"
                )
            chosen = named[0]
        fp32 = next((m for m in models if m.precision == "fp32" and m is not chosen), None)
        golden = (
            load_golden(bundle.read_verified(manifest.golden.path), manifest.golden, manifest).inputs
            if manifest.golden is not None
            else None
        )
        specs = SimpleNamespace(inputs=manifest.inputs)
        per_call = golden is not None and all(
            v.ndim == len(next(s.shape for s in manifest.inputs if s.name == k)) + 1 for k, v in golden.items()
        )
        fixed = next((s.shape[0] for s in manifest.inputs if s.shape and s.shape[0] > 0), None)
        largest = int((manifest.serving or {}).get("max_batch") or DEFAULT_MAX_BATCH)  # TensorRT profiles record one
        wanted = [1] if per_call else [fixed] if fixed else (batches or [1, largest])
        profiles = []
        for batch in wanted:
            feeds = example_feeds(specs, batch, golden)  # type: ignore[arg-type]
            for model in [m for m in (fp32, chosen) if m is not None]:
                label = f"{model.path} ({model.precision})"
                profiles.append(
                    profile_file(
                        bundle.path(model.path), feeds, model.session_options, label=label, runs=runs, threads=threads
                    )
                )
        return ProfileReport(str(location), profiles)
    finally:
        bundle.close()


def _profile_model(location, batches, runs, threads, weights, input_shape) -> ProfileReport:
    from edgebuild.export import export_onnx
    from edgebuild.sources import load_model, require_shapes
    from edgebuild.targets import load_target

    source = load_model(location, weights=weights, input_shape=input_shape, input_names=None, shapes_from_data=False)
    require_shapes(source.inputs)
    example = {spec.name: spec.example() for spec in source.inputs}
    batchable = {spec.name for spec in source.inputs if 0 in spec.dynamic_axes}
    target = load_target("x86")
    profiles, eager = [], []
    with tempfile.TemporaryDirectory(prefix="edgebuild-profile-") as tmp:
        exported = export_onnx(source, Path(tmp), target.opset)
        for batch in (batches or [1, DEFAULT_MAX_BATCH]) if batchable else [1]:
            feeds = _batched(example, batch, batchable) if batch > 1 else example
            label = f"fp32 ONNX ({exported.exporter} export)"
            profiles.append(profile_file(exported.path, feeds, target.session, label=label, runs=runs, threads=threads))
            if source.module is not None:
                eager.append(torch_profile(source.module, feeds, runs=max(3, runs // 2)))
    return ProfileReport(location, profiles, eager)
