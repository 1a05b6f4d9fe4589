"""Which task a model has: declared (``--task``, ``task`` in a recipe), read from its Ultralytics
metadata or its declared post-processing, else told by its first output's shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgebuild.tasks import canonical
from edgebuild.tasks.metadata import ModelMetadata

# Ultralytics metadata ``task`` -> ours; tasks we have no module for yet are reported and served as tensors.
METADATA_TASKS = {"detect": "detection", "classify": "classification"}
# A detector's preprocessing when nothing is declared: Ultralytics' (RGB, /255, letterbox centred, fill 114).
DETECTION_PREPROCESS = {"preset": "unit", "resize": "letterbox", "pad": "center", "fill": 114}


def declared_task(
    requested: str | None,
    postprocess: Any,
    metadata: ModelMetadata | None,
    progress: Callable[[str], None] = lambda message: None,
) -> str | None:
    """The task known before the model runs, or ``None`` (then :func:`infer_task` decides from the outputs)."""
    if requested:
        return canonical(requested)
    if metadata is not None and metadata.task:
        task = METADATA_TASKS.get(metadata.task)
        if task is not None:
            progress(f"task {task}: from the model's metadata (task: {metadata.task})")
            return task
        progress(
            f"the model's metadata says task '{metadata.task}', which edgebuild has no module for: packed as tensor"
        )
        return "tensor"
    if isinstance(postprocess, str):  # a detection preset name
        return "detection"
    if isinstance(postprocess, dict) and postprocess.get("type") in ("detection", "classification"):
        return str(postprocess["type"])
    if isinstance(postprocess, dict) and "type" not in postprocess and "format" in postprocess:
        return "detection"  # a [postprocess] table of detection keys (format = "yolov8", ...)
    return None


def infer_task(postprocess: Any, first_output: np.ndarray) -> str:
    """Nothing declared: ``[batch, classes]`` (classes > 1) is a classifier (top-k on /v1/predict), anything
    else a tensor model (KServe v2 infer only)."""
    if isinstance(postprocess, dict) and postprocess.get("type") == "classification":
        return "classification"
    if first_output.ndim == 2 and first_output.shape[1] > 1:
        return "classification"
    return "tensor"
