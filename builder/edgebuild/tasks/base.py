"""What every task module provides (:class:`Task`) and what the pack hands it (:class:`TaskContext`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgebuild.data import Batch
from edgebuild.validate import Metric

# The default --max-accuracy-drop: one point of the task's metric.
DEFAULT_BUDGET = 0.01


@dataclass
class TaskContext:
    """What a task needs to choose its metric: the validation data, the reference's outputs and
    what was declared about the model."""

    requested_metric: str | None
    val: Batch
    reference: list[np.ndarray]
    output_names: list[str]
    data: str = ""
    class_names: list[str] | None = None
    postprocess: dict[str, Any] | None = None
    input_hw: tuple[int, int] | None = None
    # Labels or a declared classification post-processing say the model classifies.
    known_classifier: bool = False


class Task:
    """A task's answers to the pipeline's questions; the defaults are those of a plain tensor model."""

    name = "tensor"
    # Keep the nodes after the last convolutions in float when quantizing (detectors).
    head_in_float = False
    # Extra candidate-table columns: (validation key, header).
    report_columns: tuple[tuple[str, str], ...] = ()

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    def choose_metric(self, context: TaskContext) -> Metric:
        raise NotImplementedError

    def default_budget(self, metric: Metric) -> float:
        """The accuracy budget when ``--max-accuracy-drop`` is not given."""
        return DEFAULT_BUDGET

    def data_labels(
        self, classes: list[str] | None, outputs: list[Any], postprocess: dict[str, Any] | None
    ) -> list[str] | None:
        """Class names the data carries (e.g. a COCO json's categories) taken as labels, when they fit the model."""
        return None

    def check_labels(self, labels: list[str] | None, outputs: list[Any], postprocess: dict[str, Any] | None) -> None:
        """Exit 2 when the class names cannot be the model's classes (the default checks nothing)."""

    def postprocess(self, declared: dict[str, Any] | None, context: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest's ``postprocess`` from what was declared (``None``: nothing to post-process)."""
        return declared
