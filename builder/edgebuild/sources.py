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
    """One model input. ``shape`` is a concrete example shape (batch first) once resolved."""

    name: str
    shape: tuple[int, ...]  # 0 marks a dynamic dimension whose size only the data can tell
    dtype: str  # numpy dtype name
    # Axes the exported model leaves dynamic (-1 in the manifest); None: the batch axis, and the
    # sequence axis of 2-D integer inputs (token ids, masks).
    dynamic: tuple[int, ...] | None = None
    # False when only the name is known (forward()'s parameter): rank, shape and dtype come from the data.
    known: bool = True

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        if self.dynamic is not None:
            return self.dynamic
        if not self.shape:
            return ()
        return (0, 1) if self.dtype.startswith("int") and len(self.shape) == 2 else (0,)

    @property
    def resolved(self) -> bool:
        return self.known and all(d > 0 for d in self.shape)

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

    @property
    def resolved(self) -> bool:
        """Every input's shape and dtype are known (else they come from the data)."""
        return all(spec.resolved for spec in self.inputs)

    @property
    def factory_module(self) -> Any:
        """The module named in ``package.module:callable``: where PREPROCESS, POSTPROCESS, LABELS live."""
        if self.kind != "callable":
            return None
        return sys.modules.get(self.spec.partition(":")[0])

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


# One shape for a single-input model, or one per input name.
InputShapes = tuple[int, ...] | dict[str, tuple[int, ...]]


def parse_input_shapes(value: Any) -> InputShapes | None:
    """``--input-shape`` values (repeatable): ``1,3,224,224`` for a single input, or ``NAME=1,576`` per input.

    Recipes may also give a list of integers or a table ``{name: [dims]}``.
    """
    if value is None or value == () or value == []:
        return None
    if isinstance(value, dict):
        return {str(k): _shape_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return _shape_value(list(value))
    texts = [value] if isinstance(value, str) else [str(v) for v in value]
    named: dict[str, tuple[int, ...]] = {}
    plain: list[tuple[int, ...]] = []
    for text in texts:
        name, sep, dims = text.partition("=")
        if sep:
            if not name.strip():
                raise UsageError(f"--input-shape '{text}' has no input name before '=' (e.g. input_ids=1,128)")
            named[name.strip()] = parse_shape(dims)
        else:
            plain.append(parse_shape(text))
    if plain and (named or len(plain) > 1):
        raise UsageError(
            "--input-shape without a name describes the only input; for several inputs give NAME=DIMS for each "
            "(e.g. --input-shape input_ids=1,128 --input-shape attention_mask=1,128)"
        )
    return plain[0] if plain else named


def _shape_value(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_shape(value)
    if isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return parse_shape(",".join(str(d) for d in value))
    raise UsageError(f"input shape {value!r} must be a list of integers like [1, 3, 224, 224]")


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


def forward_parameters(module) -> tuple[list[str], list[str]]:
    """forward()'s parameter names that take tensors: (required, optional), in order, as torch.onnx names inputs."""
    import inspect

    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return [], []
    required: list[str] = []
    optional: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.KEYWORD_ONLY):
            continue
        (required if param.default is param.empty else optional).append(param.name)
    return required, optional


def _default_names(module, count: int, input_names: list[str] | None) -> list[str]:
    """``--input-names``, then the module's ``input_names``, then forward()'s parameter names.

    A single input keeps the name ``input`` unless the module or the flag names it.
    """
    declared = input_names or getattr(module, "input_names", None)
    if declared:
        return list(declared)
    if count == 1:
        return ["input"]
    required, optional = forward_parameters(module)
    params = required + optional
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def _inputs_from_examples(examples: Any, input_names: list[str] | None, module=None) -> list[InputSpec]:
    import torch

    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if isinstance(examples, dict):
        items = list(examples.items())
    elif isinstance(examples, (tuple, list)):
        names = _default_names(module, len(examples), input_names)
        if len(names) != len(examples):
            raise UsageError(f"--input-names gives {len(names)} names but the model takes {len(examples)} inputs")
        items = list(zip(names, examples))
    else:
        raise UsageError("example_inputs must be a tensor, a tuple of tensors or a dict of name -> tensor")
    return [InputSpec(name, tuple(t.shape), _torch_dtype_name(t)) for name, t in items]


def _torch_inputs(module, input_shape: InputShapes | None, input_names: list[str] | None) -> list[InputSpec]:
    examples = getattr(module, "example_inputs", None)
    if isinstance(input_shape, dict):
        if examples is None:
            return [InputSpec(name, shape, "float32") for name, shape in input_shape.items()]
        inputs = _inputs_from_examples(examples, input_names, module)
        _apply_shapes(inputs, input_shape, "the model")
        return inputs
    if input_shape is not None:
        names = input_names or list(getattr(module, "input_names", None) or ["input"])
        if len(names) != 1:
            raise UsageError(
                "--input-shape DIMS describes one input; give --input-shape NAME=DIMS for each of "
                f"{names} (or example_inputs on the model)"
            )
        return [InputSpec(names[0], input_shape, "float32")]
    if examples is not None:
        return _inputs_from_examples(examples, input_names, module)
    shape = getattr(module, "input_shape", None)
    if shape is not None:
        return [InputSpec(_default_names(module, 1, input_names)[0], tuple(int(d) for d in shape), "float32")]
    # Only the names are known: forward()'s parameters; shapes and dtypes come from the data.
    declared = input_names or getattr(module, "input_names", None)
    required, optional = forward_parameters(module)
    names = list(declared) if declared else required + optional
    if not declared and len(required) == 1 and not optional:
        names = ["input"]
    return [InputSpec(name, (), "", known=False) for name in names]


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


def _onnx_inputs(path: Path, input_shape: InputShapes | None) -> tuple[list[InputSpec], list[str]]:
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
        dims, dynamic = [], []
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_value <= 0:
                dynamic.append(i)
            # A dynamic batch axis is exported at 1; any other dynamic size comes from --input-shape or the data.
            dims.append(dim.dim_value if dim.dim_value > 0 else (1 if i == 0 else 0))
        dtype = onnx_dtype_name(value.type.tensor_type.elem_type)
        inputs.append(InputSpec(value.name, tuple(dims), dtype, dynamic=tuple(dynamic)))
    _apply_shapes(inputs, input_shape, "the ONNX model")
    return inputs, [out.name for out in model.graph.output]


def _apply_shapes(inputs: list[InputSpec], input_shape: InputShapes | None, what: str) -> None:
    if input_shape is None:
        return
    if isinstance(input_shape, tuple):
        if len(inputs) != 1:
            raise UsageError(
                f"--input-shape DIMS describes one input but {what} has {[s.name for s in inputs]}; "
                "give --input-shape NAME=DIMS per input"
            )
        input_shape = {inputs[0].name: input_shape}
    by_name = {s.name: s for s in inputs}
    for name, shape in input_shape.items():
        if name not in by_name:
            raise UsageError(f"--input-shape {name}=...: {what} has no input '{name}' (inputs: {list(by_name)})")
        spec = by_name[name]
        if spec.known and len(shape) != len(spec.shape):
            raise UsageError(
                f"--input-shape {name}={','.join(map(str, shape))} has {len(shape)} dimensions; "
                f"input '{name}' has {len(spec.shape)}"
            )
        spec.shape = shape


def require_shapes(inputs: list[InputSpec]) -> None:
    """Exit 2 when a dimension is still unknown and no data can tell it."""
    for spec in inputs:
        if not spec.known:
            raise UsageError(
                f"cannot tell the shape of input '{spec.name}': pass --input-shape (e.g. 1,3,224,224, or "
                f"{spec.name}=1,128 per input), give the model 'example_inputs', or give --calib-data/--val-data"
            )
        if not spec.resolved:
            raise UsageError(
                f"input '{spec.name}' has a dynamic non-batch dimension {list(spec.shape)} (0 = dynamic): pass "
                f"--input-shape {spec.name}=... or give --calib-data/--val-data (shapes are then taken from the data)"
            )


def load_model(
    spec: str | None,
    *,
    weights: str | None = None,
    input_shape: InputShapes | None = None,
    input_names: list[str] | None = None,
    shapes_from_data: bool = False,
) -> ModelSource:
    """Load a model from any supported source, with a clear error for each way it can fail.

    With ``shapes_from_data`` an input may stay unresolved (a dynamic non-batch dimension, or only
    forward()'s parameter name): the caller then resolves it from its data (``edgebuild.data.resolve_inputs``).
    """
    source = _load(spec or DEFAULT_MODEL, weights, input_shape, input_names)
    if not shapes_from_data:
        require_shapes(source.inputs)
    return source


def _load(
    spec: str, weights: str | None, input_shape: InputShapes | None, input_names: list[str] | None
) -> ModelSource:
    path = Path(spec)
    if weights and spec.endswith((".onnx", ".pt2")):
        raise UsageError(
            f"--weights applies to a package.module:callable model; '{spec}' carries its own weights "
            "(export it again with the weights loaded)"
        )
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
            inputs = _inputs_from_examples(tuple(examples), input_names, module)
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
