"""Transformer graph fusion with ONNX Runtime's transformer optimizer, as measured candidates.

``onnxruntime.transformers.optimizer.optimize_model`` rewrites attention blocks into single
kernels (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization, ...); Hugging
Face Optimum's O2/O3 levels are built on it. Whether Attention fuses depends on how the model was
exported, so this pass tries the exports in order and keeps the first whose graph fuses it:

1. the bundle's own export (the dynamo exporter when it worked);
2. the TorchScript exporter with eager attention (a Hugging Face model's ``attn_implementation``
   switched to ``"eager"`` for the export only).

Measured (onnxruntime 1.32, torch 2.14, transformers 5.24, a BERT built from a config): only the
TorchScript export of eager attention fused Attention (and EmbedLayerNormalization); the dynamo
export and every SDPA export fused SkipLayerNormalization, BiasGelu and LayerNormalization only.
The optimizer cannot read the head count from those graphs ("Failed to detect num_heads"), so a
Hugging Face config's ``num_attention_heads``/``hidden_size`` are passed on.

The fused graph becomes candidates like any other (validated, timed, chosen only when faster
within budget): fused FP32 and fused + dynamic INT8; ``fused_partial`` adds fused + partial
dynamic INT8 when the full one misses the budget. A failing library call fails only its
candidate, with the reason recorded.
"""

from __future__ import annotations

import copy
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgebuild.errors import EdgebuildError, first_line
from edgebuild.onnx_utils import check_model
from edgebuild.passes import quantize as q

if TYPE_CHECKING:
    from edgebuild.candidates import Candidate, CandidatePlan
    from edgebuild.export import ExportResult
    from edgebuild.options import PackOptions
    from edgebuild.sources import ModelSource
    from edgebuild.targets import TargetProfile

log = logging.getLogger(__name__)

# The optimizer's model types (onnxruntime.transformers.optimizer.MODEL_TYPES; a test keeps them in step).
MODEL_TYPES = (
    "bart",
    "bert",
    "bert_tf",
    "bert_keras",
    "clip",
    "conformer",
    "gpt2",
    "gpt2_tf",
    "gpt_neox",
    "phi",
    "qwen3",
    "sam2",
    "swin",
    "tnlr",
    "t5",
    "unet",
    "vae",
    "vit",
    "mmdit",
)
# --model-type: auto (from a Hugging Face config, else "bert" when the graph has attention), none, or a type.
MODEL_TYPE_CHOICES = ("auto", "none", *MODEL_TYPES)
# Hugging Face config.model_type -> the optimizer's type (encoders share BERT's fusions).
HF_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "albert": "bert",
    "camembert": "bert",
    "mpnet": "bert",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "vit": "vit",
    "deit": "vit",
    "swin": "swin",
    "clip": "clip",
    "bart": "bart",
    "t5": "t5",
    "phi": "phi",
}
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention")


@dataclass
class FusionConfig:
    """How to call ``optimize_model``."""

    model_type: str = "bert"  # one of the optimizer's MODEL_TYPES
    num_heads: int = 0  # 0: the optimizer detects it (it often cannot)
    hidden_size: int = 0
    opt_level: int | None = None  # None: the optimizer's default for the type (1 for bert and gpt2)


@dataclass
class FusedGraph:
    """The fused FP32 graph and how it came about."""

    path: Path
    export: str  # which export fused, e.g. "torchscript, eager attention"
    fused: dict[str, int]  # fused operator -> count (non-zero entries of get_fused_operator_statistics())
    config: FusionConfig
    attempts: list[dict] = field(default_factory=list)  # every export tried, with its fusions or error

    def describe(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.fused.items(), key=lambda kv: -kv[1])) or "nothing"
        return f"fused {ops} ({self.export})"

    def record(self) -> dict:
        return {"export": self.export, "fused": self.fused, "config": asdict(self.config), "attempts": self.attempts}


def has_attention(path: Path) -> bool:
    """An attention block in the graph: a fused attention op, or a Softmax between two MatMuls of
    activations (scores = Q x K^T, then scores x V; weight MatMuls read an initializer)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(n.op_type in ATTENTION_OPS for n in graph.node):
        return True
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    producer = {o: n for n in graph.node for o in n.output}

    def weightless_matmul(node) -> bool:
        return node.op_type == "MatMul" and not any(_from_constant(i, producer, constants) for i in node.input)

    activation_matmuls = sum(weightless_matmul(n) for n in graph.node)
    return activation_matmuls >= 2 and any(n.op_type == "Softmax" for n in graph.node)


def _from_constant(name: str, producer: dict, constants: set[str], depth: int = 4) -> bool:
    """``name`` is a constant, or a Transpose/Cast/Reshape of one (a weight the exporter transposed)."""
    if name in constants:
        return True
    node = producer.get(name)
    if node is None or depth == 0 or node.op_type not in ("Transpose", "Cast", "Reshape", "Identity"):
        return False
    return _from_constant(node.input[0], producer, constants, depth - 1)


def fusion_config(options: PackOptions, source: ModelSource, fp32_path: Path) -> FusionConfig | None:
    """What to fuse as, or None (``--model-type none``, or no attention in the graph)."""
    wanted = getattr(options, "model_type", "auto") or "auto"
    if wanted == "none":
        return None
    hf = getattr(source.module, "config", None)
    heads = int(getattr(hf, "num_attention_heads", 0) or getattr(hf, "n_head", 0) or 0)
    hidden = int(getattr(hf, "hidden_size", 0) or getattr(hf, "n_embd", 0) or 0)
    if wanted != "auto":
        return FusionConfig(wanted, heads, hidden)
    hf_type = HF_MODEL_TYPES.get(str(getattr(hf, "model_type", "")))
    if hf_type is None and not has_attention(fp32_path):
        return None
    return FusionConfig(hf_type or "bert", heads, hidden)


def fuse(src: Path, dst: Path, config: FusionConfig) -> dict[str, int]:
    """Run the optimizer on ``src``, write ``dst`` (single file, load-checked); the fusions that happened."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        model = optimize_model(
            str(src),
            model_type=config.model_type,
            num_heads=config.num_heads,
            hidden_size=config.hidden_size,
            opt_level=config.opt_level,
        )
        statistics = model.get_fused_operator_statistics()
        model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as exc:  # noqa: BLE001 - the optimizer raises assorted errors
        raise EdgebuildError(f"transformer optimizer failed: {first_line(exc)}") from None
    check_model(dst)
    return {op: int(n) for op, n in statistics.items() if n}


class _Outputs:
    """Wraps a module so its output is a tuple of tensors (TorchScript cannot export a ModelOutput)."""

    @staticmethod
    def wrap(module, input_names: list[str]):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, *args):
                out = self.inner(**dict(zip(input_names, args)))
                if isinstance(out, torch.Tensor):
                    return out
                if hasattr(out, "to_tuple"):
                    return out.to_tuple()
                return tuple(out.values()) if isinstance(out, dict) else tuple(out)

        return Wrapped().eval()


def _eager_copy(module) -> tuple[Any, bool]:
    """A copy of a Hugging Face model with eager attention (the original keeps its own), and whether
    anything changed."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) in (None, "eager"):
        return module, False
    clone = copy.deepcopy(module)
    if hasattr(clone, "set_attn_implementation"):
        clone.set_attn_implementation("eager")
    else:  # older transformers read the config at forward time
        clone.config._attn_implementation = "eager"
    return clone.eval(), True


def torchscript_export(source: ModelSource, dst: Path, opset: int, output_names: list[str]) -> str:
    """Export ``source`` with the TorchScript exporter (eager attention for Hugging Face models)."""
    import torch

    module, eager = _eager_copy(source.module)
    wrapped = _Outputs.wrap(module, source.input_names)
    args = tuple(torch.from_numpy(spec.example()) for spec in source.inputs)
    names = {0: "batch", 1: "sequence"}
    axes: dict[str, dict[int, str]] = {
        spec.name: {axis: names.get(axis, f"dim{axis}") for axis in spec.dynamic_axes} for spec in source.inputs
    }
    for name in output_names:
        axes[name] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            args,
            str(dst),
            dynamo=False,
            opset_version=min(opset, 20),
            input_names=source.input_names,
            output_names=output_names,
            dynamic_axes=axes,
        )
    check_model(dst)
    return "torchscript, eager attention" if eager else "torchscript"


def _output_names(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _io_names(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights], [o.name for o in graph.output]


class FusionPlanner:
    """Fuses once (on the first candidate built), then serves the fused FP32 file to each candidate."""

    def __init__(
        self,
        source: ModelSource,
        exported: ExportResult,
        config: FusionConfig,
        workdir: Path,
        opset: int,
        progress: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.source, self.exported, self.config = source, exported, config
        self.workdir, self.opset, self.progress = workdir / "fusion", opset, progress
        self._result: FusedGraph | None = None
        self._error: str | None = None

    def fused(self) -> FusedGraph:
        if self._result is None and self._error is None:
            try:
                self._result = self._fuse()
            except EdgebuildError as exc:
                self._error = str(exc)
        if self._result is None:
            raise EdgebuildError(self._error or "fusion failed")
        return self._result

    def _fuse(self) -> FusedGraph:
        self.workdir.mkdir(exist_ok=True)
        attempts: list[dict] = []
        best: FusedGraph | None = None
        exports: list[tuple[str, Callable[[Path], str]]] = [
            (f"pack export ({self.exported.exporter})", lambda dst: self._copy_export(dst))
        ]
        if self.source.module is not None:
            names = _output_names(self.exported.path)
            exports.append(("torchscript", lambda dst: torchscript_export(self.source, dst, self.opset, names)))
        for i, (label, export) in enumerate(exports):
            raw, fused_path = self.workdir / f"export-{i}.onnx", self.workdir / f"fused-{i}.onnx"
            try:
                label = export(raw)
                if _io_names(raw) != _io_names(self.exported.path):
                    raise EdgebuildError(f"inputs/outputs {_io_names(raw)} differ from the bundle's export")
                fused = fuse(raw, fused_path, self.config)
            except Exception as exc:  # noqa: BLE001 - exporters and the optimizer raise many types
                attempts.append({"export": label, "error": first_line(exc)})
                self.progress(f"fusion: {label}: {first_line(exc)}")
                continue
            attempts.append({"export": label, "fused": fused})
            self.progress(f"fusion: {label}: {', '.join(f'{k} x{v}' for k, v in fused.items()) or 'nothing fused'}")
            graph = FusedGraph(fused_path, label, fused, self.config)
            if best is None or (_attention(fused) and not _attention(best.fused)):
                best = graph
            if _attention(fused):
                break
        if best is None or not best.fused:
            reasons = "; ".join(f"{a['export']}: {a.get('error', 'nothing fused')}" for a in attempts)
            raise EdgebuildError(f"no fusion happened ({reasons})")
        best.attempts = attempts
        return best

    def _copy_export(self, dst: Path) -> str:
        shutil.copyfile(self.exported.path, dst)
        return f"pack export ({self.exported.exporter})"

    def build_fp32(self, src: Path, dst: Path) -> dict:
        graph = self.fused()
        shutil.copyfile(graph.path, dst)
        return {"recipe": f"fp32 {graph.describe()}", "fusion": graph.record()}

    def build_dynamic(self, config: q.DynamicInt8Config) -> Callable[[Path, Path], dict]:
        def build(src: Path, dst: Path) -> dict:
            graph = self.fused()
            metrics = q.quantize_dynamic_int8(graph.path, dst, config)
            return {**metrics, "recipe": f"{metrics['recipe']}, {graph.describe()}", "fusion": graph.record()}

        return build


def _attention(fused: dict[str, int]) -> bool:
    return any(fused.get(op, 0) for op in ATTENTION_OPS)


def fusion_plans(
    options: PackOptions,
    target: TargetProfile,
    source: ModelSource,
    exported: ExportResult,
    workdir: Path,
    progress: Callable[[str], None] = lambda message: None,
) -> list[CandidatePlan]:
    """Fused FP32 and fused + dynamic INT8, for models with attention on CPU targets under ``auto``."""
    from edgebuild.candidates import CandidatePlan

    if options.quantize != "auto" or target.device != "cpu":
        return []
    config = fusion_config(options, source, exported.path)
    if config is None:
        return []
    progress(f"fusion: attention found; trying ONNX Runtime's transformer optimizer (model type {config.model_type})")
    planner = FusionPlanner(source, exported, config, workdir, target.opset, progress)
    plans = [CandidatePlan("fused-fp32", "fp32", planner.build_fp32)]
    if "int8-dynamic" in target.precisions:
        per_channel = True if options.per_channel is None else options.per_channel
        dynamic = q.DynamicInt8Config(per_channel=per_channel)
        plans.append(CandidatePlan("fused-int8-dynamic", "int8-dynamic", planner.build_dynamic(dynamic)))
    return plans


def fused_partial(
    options, target, candidates: list[Candidate], workdir: Path, ref, val, metric, feed1, progress
) -> list[Candidate]:
    """Fused + partial dynamic INT8 when fused + full dynamic INT8 was built but misses the budget."""
    from edgebuild.candidates import Candidate, measure_candidate
    from edgebuild.onnx_utils import make_session
    from edgebuild.passes import partial
    from edgebuild.validate import evaluate, output_names, run_session

    by_name = {c.name: c for c in candidates}
    fp32, full = by_name.get("fused-fp32"), by_name.get("fused-int8-dynamic")
    if not options.partial_quantization or fp32 is None or full is None or not fp32.usable or not full.usable:
        return []
    if full.within_budget or full.validation is None:
        return []
    progress(f"fused + dynamic INT8 breaks the budget (drop {full.validation['drop']:.4f}); trying partial ...")

    def validate(path: Path) -> dict:
        session = make_session(path, target.session.graph_optimization_level, config=target.session.config)
        return evaluate(metric, ref, run_session(session, val.inputs), val.labels, output_names(session))

    candidate = Candidate("fused-int8-dynamic-partial", "mixed", workdir / "fused-int8-dynamic-partial.onnx")
    settings = {k: v for k, v in full.metrics["settings"].items() if k != "weight_type"}
    ranking = {k: v[: partial.PartialConfig().ranking_samples] for k, v in val.inputs.items()}
    try:
        result = partial.partial_quantize_dynamic(
            fp32.file,
            candidate.file,
            q.DynamicInt8Config(**{**settings, "nodes_to_exclude": []}),
            validate,
            float(options.max_accuracy_drop),
            ranking,
            progress=progress,
        )
    except Exception as exc:  # noqa: BLE001 - a failed candidate is recorded, not fatal
        candidate.error = f"partial quantization of the fused graph failed: {first_line(exc)}"
        return [candidate]
    if result is None:
        candidate.error = "budget not met even with half of the compute nodes in float"
        return [candidate]
    candidate.metrics = {
        **result.metrics,
        "recipe": f"{result.metrics.get('recipe', 'partial dynamic')}, fused",
        "fusion": fp32.metrics.get("fusion"),
    }
    candidate.refresh_size()
    measure_candidate(candidate, target, ref, val, metric, feed1, options.bench_seconds, result.validation)
    return [candidate]
