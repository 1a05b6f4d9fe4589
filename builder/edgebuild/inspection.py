"""``edgebuild inspect`` / ``compare``: what a model costs before anything is packed.

MACs and parameters come from ptflops (total, and per layer through ptflops' own per-module
formulas); ONNX sources have no torch module, so their MACs are counted from the shapes ONNX
shape inference gives Conv/Gemm/MatMul. Activation memory is an estimate from the output
tensors of every layer. Latency is measured, not estimated: the model is exported and timed
with ONNX Runtime FP32 at batch 1 on this host.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import UsageError
from edgebuild.sources import ModelSource, load_model


@dataclass
class LayerCost:
    name: str  # module path (torch) or node name (ONNX)
    type: str
    macs: int
    params: int
    output_shape: list[int] = field(default_factory=list)
    activation_bytes: int = 0


@dataclass
class ModelReport:
    """One model's cost: totals, the per-layer table (most expensive first) and measured latency."""

    model: str
    input_shapes: dict[str, list[int]]
    macs: int
    params: int
    layers: list[LayerCost]
    # Sum of every layer's output (what a framework keeping all activations would hold) and the
    # largest single layer input+output (a floor for inference, where buffers are reused).
    activation_bytes_total: int
    activation_bytes_peak: int
    onnx_size_bytes: int | None = None
    latency: dict | None = None  # ORT FP32, batch 1: p50_ms, p90_ms, runs
    accuracy: float | None = None  # filled by compare() when labelled --val-data is given
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        """FLOPs counted as 2 per multiply-accumulate (the usual convention)."""
        return 2 * self.macs

    def to_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}


# ---------------------------------------------------------------------------------------------
# torch models: ptflops


def _torch_costs(source: ModelSource) -> tuple[int, int, list[LayerCost], int]:
    import torch
    from ptflops import get_model_complexity_info
    from ptflops.pytorch_ops import MODULES_MAPPING

    module = source.module
    names = {m: n for n, m in module.named_modules()}
    per_layer: dict[torch.nn.Module, LayerCost] = {}
    peaks: list[int] = [0]

    def recording(hook):
        # ptflops adds each module's MACs to module.__flops__; record the increment per layer.
        def wrapped(mod, inputs, output):
            before = mod.__flops__
            hook(mod, inputs, output)
            out = output[0] if isinstance(output, (tuple, list)) else output
            shape = list(out.shape) if isinstance(out, torch.Tensor) else []
            nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
            in_bytes = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
            cost = per_layer.setdefault(
                mod,
                LayerCost(
                    names.get(mod, type(mod).__name__),
                    type(mod).__name__,
                    0,
                    sum(p.numel() for p in mod.parameters(recurse=False)),
                ),
            )
            cost.macs += int(mod.__flops__ - before)
            cost.output_shape = shape
            cost.activation_bytes += nbytes
            peaks.append(nbytes + in_bytes)

        return wrapped

    feed = source.example_feed()
    args = [torch.from_numpy(feed[n]) for n in source.input_names]

    def constructor(_res):
        return args[0] if len(args) == 1 else dict(zip(_forward_arg_names(module, len(args)), args))

    # ptflops prints its warnings and failures to stdout; keep stdout for our own output.
    chatter = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(chatter):
        macs, params = get_model_complexity_info(
            module,
            tuple(args[0].shape[1:]),
            as_strings=False,
            print_per_layer_stat=False,
            input_constructor=constructor,
            custom_modules_hooks={t: recording(h) for t, h in MODULES_MAPPING.items()},
        )
    if macs is None:
        detail = chatter.getvalue().strip().splitlines()
        raise UsageError(
            f"ptflops could not count '{source.spec}' on its example input {[list(a.shape) for a in args]}: "
            f"{detail[1] if len(detail) > 1 else 'unknown error'}"
        )
    return int(macs), int(params), list(per_layer.values()), max(peaks)


def _forward_arg_names(module, count: int) -> list[str]:
    """ptflops calls ``model(**batch)`` for a dict: name the example tensors after forward()'s arguments."""
    import inspect as pyinspect

    params = [
        p.name
        for p in pyinspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < count:
        raise UsageError(f"cannot map {count} example inputs onto forward({', '.join(params)})")
    return params[:count]


# ---------------------------------------------------------------------------------------------
# ONNX models: shapes from onnx shape inference


def _onnx_costs(path: Path, source: ModelSource) -> tuple[int, int, list[LayerCost], int]:
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    init = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    params = int(sum(a.size for a in init.values()))
    # Fix the graph inputs to the example shape so inference yields concrete dims.
    for value in graph.input:
        spec = next((s for s in source.inputs if s.name == value.name), None)
        if spec is not None:
            for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    elem_bytes: dict[str, int] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
        try:
            elem_bytes[value.name] = np.dtype(
                onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            ).itemsize
        except Exception:  # noqa: BLE001 - unknown/undefined element type
            elem_bytes[value.name] = 4
    for name, array in init.items():
        shapes[name] = list(array.shape)

    layers, peak = [], 0
    for i, node in enumerate(graph.node):
        out = node.output[0] if node.output else ""
        out_shape = shapes.get(out, [])
        macs = 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in shapes and out_shape:
            w = shapes[node.input[1]]  # [out_ch, in_ch/groups, k...]
            macs = int(np.prod(out_shape, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        elif node.op_type in ("MatMul", "Gemm") and node.input[0] in shapes and out_shape:
            a = shapes[node.input[0]]
            transposed = node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if transposed else a[-1]
            macs = int(np.prod(out_shape, dtype=np.int64) * k)
        node_params = int(sum(init[n].size for n in node.input if n in init))
        nbytes = int(np.prod(out_shape, dtype=np.int64)) * elem_bytes.get(out, 4) if out_shape else 0
        in_bytes = sum(
            int(np.prod(shapes[n], dtype=np.int64)) * elem_bytes.get(n, 4)
            for n in node.input
            if n in shapes and n not in init
        )
        peak = max(peak, nbytes + in_bytes)
        layers.append(LayerCost(node.name or f"{node.op_type}_{i}", node.op_type, macs, node_params, out_shape, nbytes))
    return sum(c.macs for c in layers), params, layers, peak


# ---------------------------------------------------------------------------------------------


def _latency(path: Path, source: ModelSource, seconds: float, threads: int | None) -> dict:
    from edgebuild.benchmark import session_latency
    from edgebuild.onnx_utils import make_session

    session = make_session(path, threads=threads)
    return session_latency(session, source.example_feed(), max_seconds=seconds)


def inspect_source(
    source: ModelSource,
    *,
    measure_latency: bool = True,
    bench_seconds: float = 1.0,
    threads: int | None = None,
    opset: int = 18,
    workdir: Path | None = None,
) -> ModelReport:
    """Cost of an already loaded model; exports it to ONNX (in ``workdir``) only to time it."""
    from edgebuild.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgebuild-inspect-") as tmp:
        work = Path(workdir or tmp)
        notes: list[str] = []
        onnx_path = None
        if source.module is not None:
            macs, params, layers, peak = _torch_costs(source)
            notes.append("MACs/params from ptflops (torch modules and functional ops)")
        else:
            onnx_path = export_onnx(source, work, opset).path
            macs, params, layers, peak = _onnx_costs(onnx_path, source)
            notes.append("MACs from ONNX shape inference (Conv/Gemm/MatMul only)")
        report = ModelReport(
            model=source.spec,
            input_shapes={s.name: list(s.shape) for s in source.inputs},
            macs=macs,
            params=params,
            layers=sorted(layers, key=lambda c: (-c.macs, -c.params, c.name)),
            activation_bytes_total=int(sum(c.activation_bytes for c in layers)),
            activation_bytes_peak=int(peak),
            notes=notes,
        )
        if measure_latency:
            if onnx_path is None:
                onnx_path = export_onnx(source, work, opset).path
            report.onnx_size_bytes = onnx_path.stat().st_size
            report.latency = _latency(onnx_path, source, bench_seconds, threads)
            report.notes.append("latency: ONNX Runtime FP32, CPU provider, batch 1, this host")
    return report


def inspect_model(
    spec: str | None,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    measure_latency: bool = True,
    bench_seconds: float = 1.0,
    threads: int | None = None,
) -> ModelReport:
    """``edgebuild inspect MODEL``: load any model spec (as ``pack`` does) and report its cost."""
    source = load_model(spec, weights=weights, input_shape=input_shape)
    return inspect_source(source, measure_latency=measure_latency, bench_seconds=bench_seconds, threads=threads)


def _accuracy(source: ModelSource, val_spec: str, limit: int, preprocess: Any = None) -> float | None:
    from edgebuild.data import open_data
    from edgebuild.validate import torch_outputs

    image = preprocess.for_input(source.inputs[0].shape, source.inputs[0].name) if preprocess else None
    batch = open_data(val_spec, source.inputs, purpose="validation", limit=limit, preprocess=image).collect()
    if batch.labels is None:
        return None
    if source.module is not None:
        out = torch_outputs(source, batch.inputs)[0]
    else:
        from edgebuild.onnx_utils import make_session
        from edgebuild.validate import run_session

        assert source.onnx_path is not None  # a source without a module is an ONNX file
        out = run_session(make_session(source.onnx_path), batch.inputs)[0]
    if out.ndim != 2:
        return None
    return float((out.argmax(1) == batch.labels).mean())


def _load_with_data(spec: str, input_shape: Any, val_data: str | None, preprocess: Any) -> ModelSource:
    """Load a model as ``pack`` does: shapes the model does not declare come from ``val_data``.

    An image folder says nothing about the model's input size: that comes from ``--input-shape`` or
    the ``size`` of a ``--preprocess`` file.
    """
    from edgebuild.data import resolve_inputs
    from edgebuild.sources import require_shapes

    folder = val_data is not None and Path(val_data).is_dir()
    if input_shape is None and folder and preprocess is not None and preprocess.tensor_shape():
        input_shape = (1, *preprocess.tensor_shape())
    source = load_model(spec, input_shape=input_shape, shapes_from_data=bool(val_data))
    if source.resolved:
        return source
    if folder:
        raise UsageError(
            f"model '{spec}': an image folder ('{val_data}') does not tell the model's input size; pass "
            "--input-shape (e.g. 1,3,224,224) or a --preprocess FILE.toml with size = [H, W]"
        )
    if val_data:
        source.inputs = resolve_inputs(source.inputs, val_data, "validation", source.module)
    require_shapes(source.inputs)
    return source


def compare_models(
    specs: list[str],
    *,
    val_data: str | None = None,
    val_samples: int = 1000,
    input_shape: tuple[int, ...] | None = None,
    bench_seconds: float = 1.0,
    threads: int | None = None,
    sort_by: str = "latency",
    preprocess: str | None = None,
) -> list[ModelReport]:
    """``edgebuild compare``: inspect each model, measure its accuracy on labelled data, rank them.

    Latencies are measured one after another in this process, so they compare with each other
    (not with numbers from another run on this shared, noisy host).
    """
    if len(specs) < 1:
        raise UsageError("compare needs at least one MODEL")
    keys = {
        "latency": lambda r: r.latency["p50_ms"] if r.latency else float("inf"),
        "macs": lambda r: r.macs,
        "params": lambda r: r.params,
        "accuracy": lambda r: -(r.accuracy if r.accuracy is not None else -1.0),
    }
    if sort_by not in keys:
        raise UsageError(f"--sort-by '{sort_by}' is unknown; use one of {', '.join(keys)}")
    from edgebuild.recipe import load_preprocess

    reports = []
    spec_pre = load_preprocess(preprocess) if preprocess is not None else None
    for spec in specs:
        source = _load_with_data(spec, input_shape, val_data, spec_pre)
        report = inspect_source(source, bench_seconds=bench_seconds, threads=threads)
        if val_data:
            report.accuracy = _accuracy(source, val_data, val_samples, spec_pre)
            if report.accuracy is None:
                report.notes.append("accuracy: validation data has no labels or the output is not [batch, classes]")
        reports.append(report)
    return sorted(reports, key=keys[sort_by])


# ---------------------------------------------------------------------------------------------
# text rendering (the CLI prints these)


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_report(report: ModelReport, top: int = 20) -> str:
    lines = [
        f"model: {report.model}  inputs: {report.input_shapes}",
        f"MACs: {_human(report.macs, 'MAC')} ({_human(report.flops, 'FLOP')})   params: {_human(report.params)} "
        f"({report.params * 4 / 2**20:.2f} MiB fp32)",
        f"activations (estimate): {report.activation_bytes_total / 2**20:.2f} MiB all layers, "
        f"peak layer in+out {report.activation_bytes_peak / 2**20:.2f} MiB",
    ]
    if report.latency:
        lines.append(
            f"ORT FP32 latency, batch 1: p50 {report.latency['p50_ms']:.3f} ms, p90 {report.latency['p90_ms']:.3f} ms "
            f"({report.latency['runs']} runs); ONNX file {(report.onnx_size_bytes or 0) / 2**20:.2f} MiB"
        )
    shown = report.layers[:top]
    lines += ["", f"{'layer':<40} {'type':<18} {'MACs':>12} {'%':>6} {'params':>10} output"]
    total = max(report.macs, 1)
    for c in shown:
        lines.append(
            f"{c.name[:40]:<40} {c.type[:18]:<18} {_human(c.macs):>12} {100 * c.macs / total:>5.1f}% "
            f"{_human(c.params):>10} {c.output_shape}"
        )
    if len(report.layers) > top:
        lines.append(f"... {len(report.layers) - top} more layers (use --top)")
    lines += ["", *[f"note: {n}" for n in report.notes]]
    return "\n".join(lines)


def format_comparison(reports: list[ModelReport]) -> str:
    fastest = min((r.latency["p50_ms"] for r in reports if r.latency), default=None)
    lines = [
        "| rank | model | MACs | params | p50 ms (ORT FP32, batch 1) | vs fastest | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, r in enumerate(reports, 1):
        p50 = r.latency["p50_ms"] if r.latency else None
        rel = f"{p50 / fastest:.2f}×" if p50 and fastest else "–"
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "–"
        lines.append(
            f"| {rank} | {r.model} | {_human(r.macs)} | {_human(r.params)} | {p50:.3f} | {rel} | {acc} |"
            if p50 is not None
            else f"| {rank} | {r.model} | {_human(r.macs)} | {_human(r.params)} | – | – | {acc} |"
        )
    return "\n".join(lines)
