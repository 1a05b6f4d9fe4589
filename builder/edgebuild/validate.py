"""Accuracy validation: the packed model against the FP32 reference on real data.

The reference is the original model (torch eager for torch sources, ONNX Runtime FP32 for
ONNX sources). Metrics are computed on the first output. ``accuracy`` needs labels;
``agreement`` (top-1 vs the reference) and ``cosine`` (output similarity, for embeddings and
dense heads) need none. ``drop`` is always "higher is better" reference minus packed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgebuild.data import Batch, fill_rows, is_per_call, run_calls
from edgebuild.errors import UsageError
from edgebuild.sources import ModelSource, import_callable

METRICS = ("accuracy", "agreement", "cosine")


def run_session(session, inputs: dict[str, np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    """Run an ORT session over many samples in chunks; a model that pins its batch size gets exactly
    that many rows per run (the last chunk filled, its extra outputs dropped). Per-call data runs one call at a time."""
    if is_per_call(inputs, {i.name: len(i.shape) for i in session.get_inputs()}):
        return run_calls(lambda feed: session.run(None, feed), inputs)
    fixed = [i.shape[0] for i in session.get_inputs() if isinstance(i.shape[0], int)]
    step = min(fixed) if fixed else batch_size
    total = len(next(iter(inputs.values())))
    parts: list[list[np.ndarray]] = []
    for start in range(0, total, step):
        chunk = {k: v[start : start + step] for k, v in inputs.items()}
        rows = len(Batch(chunk))
        if fixed and rows < step:
            parts.append([out[:rows] for out in session.run(None, fill_rows(chunk, step))])
        else:
            parts.append(session.run(None, chunk))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def torch_outputs(source: ModelSource, inputs: dict[str, np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    import torch

    names = source.input_names
    if is_per_call(inputs, {s.name: len(s.shape) for s in source.inputs}):
        with torch.no_grad():
            return run_calls(
                lambda feed: _as_list(source.module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names])),
                inputs,
            )
    total = len(inputs[names[0]])
    parts = []
    with torch.no_grad():
        for start in range(0, total, batch_size):
            out = source.module(
                *[torch.from_numpy(np.ascontiguousarray(inputs[n][start : start + batch_size])) for n in names]
            )
            if isinstance(out, torch.Tensor):
                out = [out]
            elif isinstance(out, dict):
                out = list(out.values())
            parts.append([o.detach().float().numpy() for o in out])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _as_list(out) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        out = [out]
    elif isinstance(out, dict):
        out = list(out.values())
    return [o.detach().float().numpy() for o in out]


def _cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = norm_a * norm_b
    # Two all-zero outputs agree (1.0); a packed output collapsed to zeros against a non-zero
    # reference (a broken quantization) must not count as a perfect match.
    both_zero = (norm_a == 0) & (norm_b == 0)
    return np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), np.where(both_zero, 1.0, 0.0))


def compare_outputs(reference: np.ndarray, packed: np.ndarray, labels: np.ndarray | None) -> dict:
    """Every number we know how to compute for a packed output vs its reference."""
    out: dict = {"samples": int(len(reference))}
    finite = bool(np.isfinite(packed).all())
    out["finite"] = finite
    out["max_abs"] = (
        float(np.abs(reference.astype(np.float64) - packed.astype(np.float64)).max()) if finite else float("inf")
    )
    cos = _cosine_per_sample(reference, packed) if finite else np.zeros(len(reference))
    out["cosine"] = float(cos.mean())
    out["cosine_min"] = float(cos.min())
    if reference.ndim == 2 and reference.shape[1] > 1:
        ref_top1, packed_top1 = reference.argmax(1), packed.argmax(1)
        out["agreement"] = float((ref_top1 == packed_top1).mean())
        if labels is not None:
            out["accuracy"] = float((packed_top1 == labels).mean())
            out["reference_accuracy"] = float((ref_top1 == labels).mean())
    return out


@dataclass
class Metric:
    """The number the accuracy budget applies to, and why it was chosen."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float] | None = None
    # Why this metric (recorded in the manifest's validation), and a warning worth printing loudly.
    reason: str = ""
    warning: str | None = None

    @property
    def is_classification(self) -> bool:
        return self.name in ("accuracy", "agreement")

    def reference_value(self, reference: np.ndarray, labels: np.ndarray | None) -> float:
        if self.fn is not None:
            return float(self.fn(reference, reference, labels))
        if self.name == "accuracy":
            return float((reference.argmax(1) == labels).mean())
        return 1.0  # agreement and cosine of the reference with itself

    def packed_value(
        self, numbers: dict, reference: np.ndarray, packed: np.ndarray, labels: np.ndarray | None
    ) -> float:
        if self.fn is not None:
            return float(self.fn(reference, packed, labels))
        return float(numbers[self.name])


# A plain --max-accuracy-drop above this is almost always a percent typed as a number ("1" for
# one percent turns the budget off); larger budgets must be written as a percent.
MAX_PLAIN_DROP = 0.5


def parse_accuracy_drop(value: float | str) -> float:
    """``--max-accuracy-drop``: a fraction of the metric (0.01 = one point) or a percent ("1%")."""
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text[:-1] if percent else text)
    except ValueError:
        raise UsageError(
            f"--max-accuracy-drop '{text}' is not a number; give a fraction (0.01) or a percent (1%)"
        ) from None
    drop = number / 100 if percent else number
    if not 0.0 <= drop <= 1.0:  # also refuses NaN
        raise UsageError(f"--max-accuracy-drop {text} must be between 0 and 1 (or 0% and 100%)")
    if not percent and drop > MAX_PLAIN_DROP:
        raise UsageError(
            f"--max-accuracy-drop {text} is a fraction of the metric: it would allow a drop of {drop * 100:g} points. "
            f"For {number:g} percent write {number / 100:g} or {number:g}%; to allow {drop * 100:g} points write "
            f"{drop * 100:g}%"
        )
    return drop


def _classes(reference: np.ndarray) -> int | None:
    """Width of a [batch, classes] output, else None (embeddings and dense maps have no classes)."""
    return int(reference.shape[1]) if reference.ndim == 2 and reference.shape[1] > 1 else None


def check_labels(labels: np.ndarray | None, reference: np.ndarray, data: str) -> None:
    """Labels must index the model's outputs; otherwise accuracy is measured against nothing."""
    classes = _classes(reference)
    if labels is None or classes is None or labels.size == 0:
        return
    if labels.min() < 0 or labels.max() >= classes:
        raise UsageError(
            f"validation data '{data}' has labels for {int(labels.max()) + 1} classes (0..{int(labels.max())}) but "
            f"the model has {classes} outputs: labels must index the model's outputs (check the class folders, "
            f"--labels or the model's number of classes)"
        )


def choose_metric(
    requested: str | None,
    labels: np.ndarray | None,
    reference: np.ndarray,
    *,
    known_classifier: bool = False,
    data: str = "",
) -> Metric:
    """The budget's metric. Default: ``accuracy`` with labels (unless the reference itself is at or
    below chance: then ``agreement``, loudly), ``agreement`` for a model known to classify (declared
    classification post-processing or class names), ``cosine`` for every other output."""
    classes = _classes(reference)
    has_labels = labels is not None
    if has_labels and classes is not None:
        check_labels(labels, reference, data)
    if requested is None or requested == "auto":
        if has_labels and classes is not None:
            return _accuracy_or_agreement(labels, reference)
        if known_classifier and classes is not None:
            return Metric("agreement", reason="classifier (declared post-processing or class names), no labels")
        return Metric(
            "cosine", reason="no labels and not a declared classifier: output similarity (mean; worst recorded)"
        )
    if requested == "accuracy" and not has_labels:
        raise UsageError("--metric accuracy needs labelled validation data (an 'y' array or (x, y) items)")
    if requested in ("accuracy", "agreement") and classes is None:
        raise UsageError(
            f"--metric {requested} needs a classifier output [batch, classes]; got shape {list(reference.shape)}: use cosine"
        )
    if requested == "accuracy":
        metric = _accuracy_or_agreement(labels, reference)
        if metric.name != "accuracy":
            raise UsageError(f"--metric accuracy is vacuous here: {metric.warning}")
        return metric
    if requested in METRICS:
        return Metric(requested, reason="--metric")
    if ":" in requested:
        return Metric(requested, import_callable(requested, what="metric"), reason="--metric")
    raise UsageError(f"--metric '{requested}' is unknown; use accuracy, agreement, cosine or package.module:callable")


def _accuracy_or_agreement(labels, reference: np.ndarray) -> Metric:
    """Accuracy, unless the reference model is no better than chance on these labels: then a drop
    of accuracy means nothing and top-1 agreement with the reference is what can be measured."""
    accuracy = float((reference.argmax(1) == labels).mean())
    present = len(np.unique(labels))
    classes = present if present > 1 else int(reference.shape[1])  # one class present: chance of the model's own
    chance = 1.0 / classes
    if accuracy > chance:
        return Metric("accuracy", reason=f"labelled data (reference accuracy {accuracy:.4f}, chance {chance:.4f})")
    warning = (
        f"the FP32 reference scores accuracy {accuracy:.4f} on these labels, at or below chance ({chance:.4f} for "
        f"{classes} classes): the model is untrained (random weights?) or the labels do not match its outputs "
        "(class order? another label set?)"
    )
    return Metric(
        "agreement",
        reason=f"reference accuracy {accuracy:.4f} at or below chance {chance:.4f}: judged by top-1 agreement with "
        "the FP32 reference instead",
        warning=warning,
    )


def evaluate(metric: Metric, reference: np.ndarray, packed: np.ndarray, labels: np.ndarray | None) -> dict:
    numbers = compare_outputs(reference, packed, labels)
    ref_value = metric.reference_value(reference, labels)
    value = metric.packed_value(numbers, reference, packed, labels) if numbers["finite"] else float("-inf")
    numbers.update({"metric": metric.name, "reference": ref_value, "packed": value, "drop": ref_value - value})
    return numbers
