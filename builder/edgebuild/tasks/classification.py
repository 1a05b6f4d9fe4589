"""Classification: accuracy against labels, top-1 agreement with the FP32 reference without them.

The classifier output is the first one; every other output is still compared (cosine, worst
output recorded). ``/v1/predict`` answers the top-k labels.
"""

from __future__ import annotations

from edgebuild.tasks.base import Task, TaskContext
from edgebuild.validate import Metric, choose_metric


class ClassificationTask(Task):
    name = "classification"

    def choose_metric(self, context: TaskContext) -> Metric:
        metric = choose_metric(
            context.requested_metric,
            context.val.labels,
            context.reference[0],
            known_classifier=context.known_classifier,
            data=context.data,
        )
        if metric.warning:  # the labels are vacuous: say what is judged instead
            metric.warning += "; judging by top-1 agreement with the FP32 reference instead"
        return metric

    def postprocess(self, declared, context):
        if declared is not None:
            return declared
        return {"type": "classification", "softmax": True, "top_k": 5}


def task(name: str) -> Task:
    return ClassificationTask(name)
