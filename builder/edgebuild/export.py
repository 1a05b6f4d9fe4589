"""Export to one self-contained ONNX file with torch.onnx, dynamic batch (and sequence) axes.

The dynamo exporter is tried first; when it cannot capture the model the TorchScript exporter
is used and the reason is recorded. Weights are re-saved inside the file (no ``.data``
sidecar) since bundles are single-file models under 2 GB.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.errors import UsageError, first_line
from edgebuild.onnx_utils import check_model, model_opset
from edgebuild.quiet import Captured, captured_library_output
from edgebuild.sources import ModelSource

log = logging.getLogger(__name__)

# Below this the dynamo exporter converts versions itself and often fails (keeping 18).
DYNAMO_MIN_OPSET = 18


@dataclass
class ExportResult:
    path: Path
    exporter: str  # "dynamo" | "torchscript" | "onnx-source"
    opset: int
    fallback_reason: str | None = None
    # What torch's exporters logged (symbolic-shape notes, deprecation warnings): summarised, not printed.
    said: Captured = field(default_factory=Captured)

    def record(self) -> dict:
        params: dict = {"exporter": self.exporter, "opset": self.opset}
        if self.fallback_reason:
            params["fallback_reason"] = self.fallback_reason
        if self.said.summary():
            params["library_messages"] = self.said.summary()
        return params

    def library_line(self) -> str | None:
        return self.said.line(f"export ({self.exporter})")


def _dynamic_axes(source: ModelSource) -> dict[str, dict[int, str]]:
    """Each input's dynamic axes (by default the batch, and the sequence axis of 2-D integer token inputs).

    Axes with the same meaning share one symbol across inputs, so ``input_ids`` and ``attention_mask``
    keep one batch and one sequence length.
    """
    names = {0: "batch", 1: "sequence"}
    return {spec.name: {axis: names.get(axis, f"dim{axis}") for axis in spec.dynamic_axes} for spec in source.inputs}


def by_name(module, names: list[str]) -> bool:
    """True when every input name is a forward() parameter that takes a keyword: the model is then
    called, traced and exported with keyword arguments. Passed positionally, the inputs of a model whose
    forward() has more parameters than it is given (a Hugging Face ``BertModel``) can land on the wrong ones."""
    import inspect

    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    keyword = {p.name for p in parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return bool(names) and all(n in keyword for n in names)


def call_module(module, tensors: dict):
    """``module(**tensors)`` when the names are forward()'s parameters, else positionally in order."""
    if by_name(module, list(tensors)):
        return module(**tensors)
    return module(*tensors.values())


def _example_args(source: ModelSource) -> dict:
    import torch

    return {spec.name: torch.from_numpy(spec.example()) for spec in source.inputs}


def _split(module, args: dict) -> tuple[tuple, dict]:
    """(positional, keyword) arguments for torch.onnx.export."""
    return ((), args) if by_name(module, list(args)) else (tuple(args.values()), {})


def _output_names(module, args: dict) -> list[str]:
    import torch

    with torch.no_grad():
        out = call_module(module, args)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict):
        return list(out)
    return [f"output_{i}" for i in range(len(out))]


def _export_dynamo(module, args, source: ModelSource, path: Path, opset: int, output_names: list[str]) -> None:
    import torch

    dims: dict[str, object] = {}
    per_input = {}
    for spec in source.inputs:
        per_axis = {}
        for axis, axis_name in _dynamic_axes(source)[spec.name].items():
            per_axis[axis] = dims.setdefault(axis_name, torch.export.Dim.AUTO)
        per_input[spec.name] = per_axis
    positional, keyword = _split(module, args)
    # dynamic_shapes follows the arguments' structure: by name for keyword arguments, in order otherwise.
    dynamic_shapes = per_input if keyword else tuple(per_input.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            positional,
            kwargs=keyword or None,
            dynamo=True,
            opset_version=opset,
            input_names=source.input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    if program is None:  # only with dynamo=False
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def _export_torchscript(module, args, source: ModelSource, path: Path, opset: int, output_names: list[str]) -> None:
    import torch

    axes = _dynamic_axes(source)
    for name in output_names:
        axes[name] = {0: "batch"}
    traced = _KeywordAdapter(module, list(args)) if by_name(module, list(args)) else module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced,
            tuple(args.values()),
            str(path),
            dynamo=False,
            opset_version=min(opset, 20),
            input_names=source.input_names,
            output_names=output_names,
            dynamic_axes=axes,
        )


def _KeywordAdapter(module, names: list[str]):
    """``forward(*inputs)`` that calls ``module(**dict(zip(names, inputs)))`` and returns its outputs as a
    tuple. The TorchScript tracer binds even keyword examples to forward()'s parameters by position, which
    breaks models whose forward() takes more parameters than given or wraps them in decorators (a
    Hugging Face ``BertModel``: "got multiple values for argument 'use_cache'")."""
    import torch

    class KeywordAdapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *inputs):
            out = self.inner(**dict(zip(names, inputs)))
            return tuple(out.values()) if isinstance(out, dict) else out

    return KeywordAdapter().eval()


def export_onnx(source: ModelSource, workdir: Path, opset: int) -> ExportResult:
    """Produce ``workdir/fp32.onnx`` from any model source and load-check it."""
    path = workdir / "fp32.onnx"
    if source.onnx_path is not None:
        return _upgrade_onnx(source.onnx_path, path, opset)
    args = _example_args(source)
    try:
        output_names = _output_names(source.module, args)
    except Exception as exc:  # noqa: BLE001 - user model code
        shapes = ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in source.inputs)
        raise UsageError(
            f"model fails on its example input ({shapes}): {first_line(exc)}; check --input-shape, the model's "
            "example_inputs or, when the shapes come from data, the data's layout"
        ) from None
    exporter, reason = "dynamo", None
    with captured_library_output() as said:
        try:
            if opset < DYNAMO_MIN_OPSET:
                raise ValueError(f"the dynamo exporter emits opset >= {DYNAMO_MIN_OPSET}, the target needs {opset}")
            _export_dynamo(source.module, args, source, path, opset, output_names)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            reason = first_line(exc)
            log.info("dynamo exporter not used (%s); using the TorchScript exporter", reason)
            exporter = "torchscript"
            try:
                _export_torchscript(source.module, args, source, path, opset, output_names)
            except Exception as exc2:  # noqa: BLE001
                raise UsageError(
                    f"model could not be exported to ONNX. dynamo: {reason}; torchscript: {first_line(exc2)}; "
                    f"{_next_step(source, opset)}"
                ) from None
        _inline_external_data(path)
    check_model(path)
    return ExportResult(path, exporter, model_opset(path), reason, said)


def _next_step(source: ModelSource, opset: int) -> str:
    """What a user can try when both exporters fail."""
    dynamo_hint = (
        f"the target pins opset {opset}, below the dynamo exporter's {DYNAMO_MIN_OPSET}: "
        if opset < DYNAMO_MIN_OPSET
        else ""
    )
    return (
        f"next step: {dynamo_hint}wrap the model in a small nn.Module whose forward({', '.join(source.input_names)}) "
        "calls it with keyword arguments and returns tensors, or export it yourself (torch.onnx.export) "
        "and pack the .onnx file"
    )


def _inline_external_data(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))  # pulls in any external .data next to it
    onnx.save(model, str(path), save_as_external_data=False)
    sidecar = path.with_name(path.name + ".data")
    sidecar.unlink(missing_ok=True)


def _upgrade_onnx(src: Path, dst: Path, opset: int) -> ExportResult:
    """Copy an ONNX model, converting opsets below 13 (per-channel QDQ needs ``axis``)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    reason = None
    if current < 13:
        try:
            model = version_converter.convert_version(model, opset)
            reason = f"converted from opset {current} to {opset}"
        except Exception as exc:  # noqa: BLE001
            raise UsageError(
                f"ONNX model '{src}' uses opset {current} and could not be converted to {opset}: {first_line(exc)}"
            ) from None
    if any(not out.type.tensor_type.HasField("shape") for out in model.graph.output):
        # Outputs declared without a shape fail the ONNX checker though ONNX Runtime runs them: infer it.
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:  # noqa: BLE001 - shape inference raises several types
            log.info("shape inference failed (%s); outputs keep no shape", first_line(exc))
    onnx.save(model, str(dst), save_as_external_data=False)
    check_model(dst)
    return ExportResult(dst, "onnx-source", model_opset(dst), reason)
