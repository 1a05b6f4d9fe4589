"""One module per task: how its candidates are validated, which nodes quantization keeps in float,
what the report shows.

- :mod:`edgebuild.tasks.classification`: accuracy with labels, top-1 agreement without.
- :mod:`edgebuild.tasks.detection`: COCO mAP of boxes (against labels, or against FP32's own
  detections), a score-collapse guard, the head tail in float.
- :mod:`edgebuild.tasks.tensor`: ``tensor`` and ``embedding``: cosine on every output.

Adding a task is one module here (a :class:`Task` named ``TASK``), one in ``edgerun.tasks`` and
their tests. Modules are imported when first asked for, so this package stays light.
"""

from __future__ import annotations

import importlib

from edgebuild.errors import UsageError
from edgebuild.tasks.base import Task, TaskContext

__all__ = ["ALIASES", "TASK_NAMES", "Task", "TaskContext", "canonical", "get_task"]

TASK_NAMES = ("classification", "detection", "embedding", "tensor")
# What --task accepts besides the names: the verbs Ultralytics metadata and CLIs use.
ALIASES = {"classify": "classification", "detect": "detection", "embed": "embedding"}
_MODULES = {"classification": "classification", "detection": "detection", "embedding": "tensor", "tensor": "tensor"}


def canonical(name: str, where: str = "--task") -> str:
    """A task name or alias -> the task name; exit 2 naming the choices for anything else."""
    task = ALIASES.get(name, name)
    if task not in TASK_NAMES:
        choices = ", ".join([*ALIASES, *TASK_NAMES])
        raise UsageError(f"{where} '{name}' is unknown; use one of {choices}")
    return task


def get_task(name: str) -> Task:
    task = canonical(name)
    module = importlib.import_module(f"edgebuild.tasks.{_MODULES[task]}")
    return module.task(task)
