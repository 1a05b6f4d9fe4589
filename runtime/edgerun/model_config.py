"""Triton's model configuration for a served model (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``).

Clients written for Triton read it before their first request: Ultralytics' ``TritonRemoteModel``
takes the input data types, the output names and ``parameters.metadata`` (a Python literal with the
task, the class names and the image size, as Ultralytics' own Triton export writes it) from here.
"""

from __future__ import annotations

from typing import Any

from edgerun.loader import ServedModel
from edgerun.manifest import KSERVE_DATATYPES, TensorSpec

PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX Runtime model

# edgebuild's task names and the ones Ultralytics' metadata uses.
_ULTRALYTICS_TASKS = {"detection": "detect", "classification": "classify", "segmentation": "segment"}


def triton_datatype(dtype: str) -> str:
    """``float32`` -> ``TYPE_FP32`` (Triton's model-configuration spelling of the KServe datatype)."""
    return "TYPE_" + KSERVE_DATATYPES[dtype]


def _batched(specs: list[TensorSpec]) -> bool:
    return bool(specs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)


def triton_config(served: ServedModel) -> dict[str, Any]:
    """The configuration in Triton's JSON shape.

    As in Triton, ``max_batch_size > 0`` means the first dimension of every input and output is the
    batch and ``dims`` leave it out; a model without a dynamic first dimension on every tensor, or
    without a batch limit, is described with ``max_batch_size: 0`` and its full shapes (-1 = any size).
    """
    session = served.session
    inputs, outputs = list(session.inputs), list(session.outputs)
    limit = session.max_batch
    batched = _batched(inputs + outputs) and limit is not None and limit > 0
    skip = 1 if batched else 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "data_type": triton_datatype(spec.dtype), "dims": list(spec.shape[skip:])}

    config: dict[str, Any] = {
        "name": served.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": int(limit) if batched and limit is not None else 0,
        "input": [tensor(spec) for spec in inputs],
        "output": [tensor(spec) for spec in outputs],
    }
    metadata = _metadata(served)
    if metadata:
        config["parameters"] = {"metadata": {"string_value": repr(metadata)}}
    return config


def _metadata(served: ServedModel) -> dict[str, Any]:
    """What a Triton client learns about the model beyond its tensors: task, class names, image size."""
    metadata: dict[str, Any] = {}
    task = served.manifest.task_name()
    if task != "tensor":  # a plain tensor model: its tensors say it all
        metadata["task"] = _ULTRALYTICS_TASKS.get(task, task)
    if served.labels:
        metadata["names"] = dict(enumerate(served.labels))
    spec = served.manifest.preprocess_spec()
    if spec is not None and spec.size is not None:
        metadata["imgsz"] = list(spec.size)
    return metadata
