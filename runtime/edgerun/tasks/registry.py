"""The task a bundle's ``/v1/predict`` answer comes from: one module per task, chosen by the manifest."""

from __future__ import annotations

from edgerun.manifest import Manifest
from edgerun.tasks import classification, detection
from edgerun.tasks.base import ImageTask
from edgerun.tasks.dense import refuse_image_answer

IMAGE_TASKS: dict[str, ImageTask] = {task.name: task for task in (classification.TASK, detection.TASK)}


def image_task(manifest: Manifest) -> ImageTask:
    """The task answering ``/v1/predict`` for this bundle; a RequestError (400) for a task with no image answer."""
    task = IMAGE_TASKS.get(manifest.task_name())
    if task is None:
        raise refuse_image_answer(manifest)
    return task
