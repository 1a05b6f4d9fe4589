"""Tasks whose answer is the model's tensors themselves (``embedding``, ``tensor``): no image answer,
so ``/v1/predict`` points the client at the KServe v2 infer route, which returns the raw outputs."""

from __future__ import annotations

from edgerun.errors import RequestError
from edgerun.manifest import Manifest


def refuse_image_answer(manifest: Manifest) -> RequestError:
    """The 400 a tensor/embedding bundle answers on ``/v1/predict``."""
    task = manifest.task_name()
    return RequestError(
        f"model '{manifest.name}' is a {task} model: its answer is its output tensors, which /v1/predict does "
        f"not make; POST the input to /v2/models/{manifest.name}/infer (preprocess the image as the bundle's "
        f"manifest says) to get them"
    )
