"""Classification: top-k labels of the first image's scores (softmax first when the manifest says so).

``manifest.postprocess``: ``{"type": "classification", "softmax": true, "top_k": 5, "output": NAME}``
(``output`` defaults to the first output).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgerun.tasks.base import ImageResult, ImageTask


class ClassPrediction(BaseModel):
    model_config = ConfigDict(defer_build=True)

    index: int = Field(description="class index in the model's output")
    label: str = Field(description="the class name from the bundle's labels, else the index")
    score: float = Field(description="probability (softmax) or the raw score")


class ClassificationResponse(BaseModel):
    model_config = ConfigDict(defer_build=True)  # built on first answer, not at server start

    model_name: str
    predictions: list[ClassPrediction] = Field(description="top-k classes, best first")


def classify(scores: np.ndarray, spec: dict[str, Any], labels: list[str] | None) -> list[dict[str, Any]]:
    """Top-k of the first row of ``scores``; softmax first when the manifest asks for it."""
    row = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)[0]
    if spec.get("softmax"):
        row = np.exp(row - row.max())
        row = row / row.sum()
    k = max(1, min(int(spec.get("top_k", 5)), row.size))
    top = np.argsort(-row, kind="stable")[:k]
    return [
        {"index": int(i), "label": labels[i] if labels and i < len(labels) else str(int(i)), "score": float(row[i])}
        for i in top
    ]


def answer(result: ImageResult) -> ClassificationResponse:
    post = result.manifest.postprocess or {"type": "classification", "top_k": 5}
    name = post.get("output", result.manifest.outputs[0].name)
    predictions = [ClassPrediction(**p) for p in classify(result.outputs[name], post, result.labels)]
    return ClassificationResponse(model_name=result.model, predictions=predictions)


TASK = ImageTask("classification", ClassificationResponse, answer)
