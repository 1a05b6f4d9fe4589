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


# ---- presentation ----


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


SHARE_ROWS = (
    ("conv_matmul", "Conv/MatMul-type ops"),
    ("conv_matmul_float", "  of which in float"),
    ("conv_matmul_int8", "  of which in int8"),
    ("quantize_dequantize", "Quantize/DequantizeLinear"),
    ("other_float", "other ops in float"),
    ("other_int8", "other ops in int8"),
)


def format_markdown(report: ProfileReport, top: int = 15) -> str:
    lines = [f"# Where the time goes: {report.source}", ""]
    for batch in sorted({p.batch for p in report.profiles}):
        group = [p for p in report.profiles if p.batch == batch]
        lines += [f"## Batch {batch}", "", "| | " + " | ".join(p.label for p in group) + " |"]
        lines.append("|---|" + "---|" * len(group))
        lines.append(
            f"| run time (ORT model_run, median of {group[0].runs}) | "
            + " | ".join(f"{p.run_ms:.3f} ms" for p in group)
            + " |"
        )
        lines.append(
            "| node time (sum of node medians) | "
            + " | ".join(f"{p.node_ms:.3f} ms ({p.node_ms / p.run_ms:.0%} of run)" for p in group)
            + " |"
        )
        lines.append("| wall time of session.run | " + " | ".join(f"{p.wall_ms:.3f} ms" for p in group) + " |")
        for key, title in SHARE_ROWS:
            lines.append(f"| {title} | " + " | ".join(_pct(p.shares()[key]) for p in group) + " |")
        lines += ["", "### By op type", "", op_type_table(group, top), ""]
        for p in group:
            lines += [f"### Slowest nodes: {p.label}", "", "| node | op type | ms | share |", "|---|---|---|---|"]
            total = p.node_ms or 1.0
            lines += [f"| `{n.name}` | {n.op_type} | {n.ms:.4f} | {_pct(n.ms / total)} |" for n in p.nodes[:top]]
            lines.append("")
    for eager in report.torch:
        lines += [
            f"## PyTorch eager by operator (batch {eager['batch']}, wall {eager['wall_ms']:.3f} ms per run)",
            "",
            "| operator | self CPU ms per run | calls per run |",
            "|---|---|---|",
        ]
        lines += [f"| {o['op']} | {o['ms']:.4f} | {o['calls']} |" for o in eager["ops"][:top]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def op_type_table(group: list[Profile], top: int) -> str:
    """Op types side by side, ordered by the last profile's (the chosen variant's) time."""
    per = [{r.op_type: r for r in p.by_op_type()} for p in group]
    order = [r.op_type for r in group[-1].by_op_type()]
    order += [op for table in per[:-1] for op in table if op not in order]
    header = "| op type | " + " | ".join(f"{p.label} ms | share | nodes" for p in group) + " |"
    lines = [header, "|---|" + "---|---|---|" * len(group)]
    for op in order[:top]:
        cells = []
        for table in per:
            row = table.get(op)
            cells.append(f"{row.ms:.4f} | {_pct(row.share)} | {row.nodes}" if row else "– | – | –")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(report: ProfileReport, path: Path, top: int = 10) -> Path:
    """Horizontal bars per op type (ms), one colour per profiled file, at the smallest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(p.batch for p in report.profiles)
    group = [p for p in report.profiles if p.batch == batch]
    per = [{r.op_type: r.ms for r in p.by_op_type()} for p in group]
    order = [r.op_type for r in group[-1].by_op_type()][:top]
    order += [op for table in per[:-1] for op in list(table)[:top] if op not in order][: max(0, top - len(order))]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(order) + 1.5))
    height = 0.8 / len(group)
    for i, (p, table) in enumerate(zip(group, per)):
        ax.barh(
            [y + i * height for y in range(len(order))], [table.get(op, 0.0) for op in order], height, label=p.label
        )
    ax.set_yticks([y + height * (len(group) - 1) / 2 for y in range(len(order))], order)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per run (median), batch {batch}")
    ax.set_title(f"Where the time goes: {Path(report.source).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_section(path: Path, session_options: Any, feeds: dict[str, np.ndarray], top: int = 8) -> list[str]:
    """The bundle report's short "where the time goes" table for the chosen variant (batch of ``feeds``)."""
    p = profile_file(path, feeds, session_options, runs=10)
    shares = p.shares()
    lines = [
        "## Where the time goes (chosen variant)",
        "",
        f"ONNX Runtime profile at batch {p.batch}, median of {p.runs} runs: run {p.run_ms:.3f} ms, nodes "
        f"{p.node_ms:.3f} ms; Conv/MatMul-type ops {_pct(shares['conv_matmul'])} (in float "
        f"{_pct(shares['conv_matmul_float'])}), Quantize/DequantizeLinear {_pct(shares['quantize_dequantize'])}, "
        f"other float ops {_pct(shares['other_float'])}. `edgebuild profile BUNDLE` shows every node and FP32 next to it.",
        "",
        "| op type | ms | share | nodes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.op_type} | {r.ms:.4f} | {_pct(r.share)} | {r.nodes} |" for r in p.by_op_type()[:top]]
    return lines + [""]


def append_report_section(report_md: Path, path: Path, session_options: Any, feeds: dict[str, np.ndarray]) -> None:
    """Add the section to a written report.md; a profiler failure costs only the section."""
    try:
        lines = report_section(path, session_options, feeds)
    except Exception as exc:  # noqa: BLE001 - the report must not fail a bundle that was validated
        lines = ["## Where the time goes (chosen variant)", "", f"profiling failed: {exc}", ""]
    with report_md.open("a") as out:
        out.write("\n" + "\n".join(lines))
