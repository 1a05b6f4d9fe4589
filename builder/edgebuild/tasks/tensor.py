"""``tensor`` and ``embedding``: raw outputs, judged by cosine on every output (the worst one counts).

``/v1/predict`` has no image answer for these bundles (the runtime points at the KServe v2
``infer`` route instead), so there is no post-processing to declare.
"""

from __future__ import annotations

from edgebuild.tasks.base import Task, TaskContext
from edgebuild.validate import Metric, choose_metric


class TensorTask(Task):
    def choose_metric(self, context: TaskContext) -> Metric:
        if context.requested_metric in (None, "auto"):
            return Metric("cosine", reason=f"{self.name} task: output similarity on every output (worst output counts)")
        return choose_metric(context.requested_metric, context.val.labels, context.reference[0], data=context.data)

    def postprocess(self, declared, context):
        return None


def task(name: str) -> Task:
    return TensorTask(name)
