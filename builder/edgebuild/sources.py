"""Model sources: ``package.module:callable``, a ``torch.export`` ``.pt2`` file, or an ``.onnx`` file.

Each becomes a :class:`ModelSource` that knows its example inputs (names, shapes, dtypes), so
every later stage — export, calibration, validation, the manifest, serving — handles one or
several named inputs the same way.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import UsageError, first_line

DEFAULT_MODEL = "edgebuild.examples.digits:pretrained"


@dataclass
class InputSpec:
    name: str
    shape: tuple[int, ...]  # concrete example shape (batch first)
    dtype: str  # numpy dtype name

    def example(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype)


@dataclass
class ModelSource:
    """A loaded model and what it takes.

    ``module`` is a torch ``nn.Module`` (eval mode) for torch sources and ``None`` for ONNX
    sources (torch-level passes are then skipped); ``onnx_path`` is set for ONNX sources.
    """

    kind: str  # "callable" | "pt2" | "onnx"
    spec: str
    inputs: list[InputSpec]
    module: Any = None
    onnx_path: Path | None = None
    output_names: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def example_feed(self) -> dict[str, np.ndarray]:
        return {spec.name: spec.example() for spec in self.inputs}

    @property
    def default_name(self) -> str:
        if self.kind == "callable":
            return self.spec.split(":")[-1].lower().replace("_", "-")
        return Path(self.spec).stem


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)`` with a clear error for anything else."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(
            f"--input-shape '{text}' is not a comma-separated list of integers (e.g. 1,3,224,224)"
        ) from None
    if not shape or any(dim <= 0 for dim in shape):
        raise UsageError(f"--input-shape '{text}' must have positive dimensions (e.g. 1,3,224,224)")
    return shape


def import_callable(spec: str, what: str = "model") -> Any:
    """Resolve ``package.module:callable``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} '{spec}' is not a file or a 'package.module:callable' spec")
    # Like `python -m` and uvicorn: a module in the working directory is importable as typed.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} '{spec}': cannot import module '{module_name}' ({exc})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{what} '{spec}': module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} '{spec}': '{attr}' is not callable")
    return target


def build_module(spec: str, what: str = "model"):
    """Call a ``package.module:callable`` factory and check that it returns an ``nn.Module``."""
    import torch

    factory = import_callable(spec, what=what)
    try:
        module = factory()
    except Exception as exc:  # noqa: BLE001 - user code
        raise UsageError(f"{what} '{spec}': calling the factory failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{what} '{spec}' returned {type(module).__name__}, expected a torch.nn.Module")
    return module


def _torch_dtype_name(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def _inputs_from_examples(examples: Any, input_names: list[str] | None) -> list[InputSpec]:
    import torch

    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if isinstance(examples, dict):
        items = list(examples.items())
    elif isinstance(examples, (tuple, list)):
        names = input_names or (["input"] if len(examples) == 1 else [f"input_{i}" for i in range(len(examples))])
        if len(names) != len(examples):
            raise UsageError(f"--input-names gives {len(names)} names but the model takes {len(examples)} inputs")
        items = list(zip(names, examples))
    else:
        raise UsageError("example_inputs must be a tensor, a tuple of tensors or a dict of name -> tensor")
    return [InputSpec(name, tuple(t.shape), _torch_dtype_name(t)) for name, t in items]


def _torch_inputs(module, input_shape: tuple[int, ...] | None, input_names: list[str] | None) -> list[InputSpec]:
    if input_shape is not None:
        names = input_names or ["input"]
        if len(names) != 1:
            raise UsageError("--input-shape describes one input; give example_inputs on the model for several inputs")
        return [InputSpec(names[0], input_shape, "float32")]
    examples = getattr(module, "example_inputs", None)
    if examples is not None:
        return _inputs_from_examples(examples, input_names)
    shape = getattr(module, "input_shape", None)
    if shape is not None:
        return [InputSpec((input_names or ["input"])[0], tuple(int(d) for d in shape), "float32")]
    raise UsageError(
        "cannot tell the model's input shape: pass --input-shape (e.g. 1,3,224,224) or give the model an "
        "'example_inputs' or 'input_shape' attribute"
    )


def _load_weights(module, weights: Path) -> None:
    import torch

    if not weights.is_file():
        raise UsageError(f"weights file '{weights}' does not exist")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; the message is what matters
        raise UsageError(f"cannot read weights '{weights}': {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"weights '{weights}' do not fit the model: {first_line(exc)}") from None


def _onnx_inputs(path: Path, input_shape: tuple[int, ...] | None) -> tuple[list[InputSpec], list[str]]:
    import onnx

    from edgebuild.onnx_utils import onnx_dtype_name

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"'{path}' is not a readable ONNX model ({exc})") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            dims.append(dim.dim_value if dim.dim_value > 0 else (1 if i == 0 else 0))
        dtype = onnx_dtype_name(value.type.tensor_type.elem_type)
        inputs.append(InputSpec(value.name, tuple(dims), dtype))
    if input_shape is not None:
        if len(inputs) != 1:
            raise UsageError("--input-shape describes one input but the ONNX model has several")
        inputs[0].shape = input_shape
    for spec in inputs:
        if any(d == 0 for d in spec.shape):
            raise UsageError(
                f"ONNX input '{spec.name}' has a dynamic non-batch dimension {spec.shape}: pass --input-shape"
            )
    return inputs, [out.name for out in model.graph.output]


def load_model(
    spec: str | None,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_names: list[str] | None = None,
) -> ModelSource:
    """Load a model from any supported source, with a clear error for each way it can fail."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec)
    if spec.endswith(".onnx"):
        if not path.is_file():
            raise UsageError(f"model file '{spec}' does not exist")
        inputs, outputs = _onnx_inputs(path, input_shape)
        return ModelSource("onnx", spec, inputs, onnx_path=path, output_names=outputs)
    if spec.endswith(".pt2"):
        if not path.is_file():
            raise UsageError(f"model file '{spec}' does not exist")
        import torch

        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"'{spec}' is not a loadable torch.export program ({exc})") from None
        module = program.module()
        examples = program.example_inputs[0] if program.example_inputs else None
        if examples and input_shape is None:
            inputs = _inputs_from_examples(tuple(examples), input_names)
        else:
            inputs = _torch_inputs(module, input_shape, input_names)
        return ModelSource("pt2", spec, inputs, module=module)
    if ":" not in spec:
        if not path.exists():
            raise UsageError(f"model file '{spec}' does not exist (expected .onnx, .pt2 or package.module:callable)")
        raise UsageError(f"model '{spec}': unsupported file type (expected .onnx, .pt2 or package.module:callable)")

    module = build_module(spec)
    if weights:
        _load_weights(module, Path(weights))
    module.eval()
    return ModelSource("callable", spec, _torch_inputs(module, input_shape, input_names), module=module)
