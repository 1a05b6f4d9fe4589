"""What every task module gives ``/v1/predict``: its answer for one preprocessed image, and the
pydantic model of that answer (which the OpenAPI document shows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from edgerun.manifest import Manifest
    from edgerun.preprocess import ImageTransform


@dataclass(frozen=True)
class PredictOptions:
    """Per-request overrides of the manifest's post-processing (None: the manifest's value)."""

    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None

    def given(self) -> list[str]:
        return [name for name in ("conf", "iou", "max_det") if getattr(self, name) is not None]


@dataclass
class ImageResult:
    """One image through the model: what a task turns into its answer."""

    model: str
    manifest: Manifest
    labels: list[str] | None
    outputs: dict[str, np.ndarray]  # output name -> array, batch of one
    transform: ImageTransform
    options: PredictOptions = field(default_factory=PredictOptions)

    def label(self, class_id: int) -> str:
        labels = self.labels
        return labels[class_id] if labels and 0 <= class_id < len(labels) else str(class_id)


@dataclass(frozen=True)
class ImageTask:
    """A task's ``/v1/predict`` side. ``offload``: the answer costs enough (decode + NMS) to run off the
    event loop."""

    name: str
    response_model: type[BaseModel]
    answer: Callable[[ImageResult], BaseModel]
    options: tuple[str, ...] = ()  # the PredictOptions this task reads
    offload: bool = False
