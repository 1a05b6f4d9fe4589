"""Accuracy validation: the packed model against the FP32 reference on real data.

The reference is the original model (torch eager for torch sources, ONNX Runtime FP32 for
ONNX sources). Every output is compared: ``cosine`` and ``max_abs`` are the worst output's (a
detector whose box head survives quantization while its score head does not is caught), each
output's own figures are recorded under ``outputs``. ``accuracy`` and ``agreement`` (top-1 vs the
reference) are computed on the classifier output (the first output); ``accuracy`` needs labels.
``drop`` is always "higher is better" reference minus packed.

A custom ``--metric package.module:callable`` is called as ``fn(reference, packed, labels)`` with
``reference`` and ``packed`` the lists of every output (model order, each batch first) and
``labels`` the validation labels or ``None``. A metric written for a single array (the earlier
signature) still works on single-output models: when it fails on lists it is called again with
output 0 and the validation records that it saw the first output only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def output_names(session) -> list[str]:
    """An ORT session's output names, in the model's order."""
    return [o.name for o in session.get_outputs()]


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


Outputs = list[np.ndarray]


def as_outputs(value: np.ndarray | Sequence[np.ndarray]) -> Outputs:
    """One array (a single-output model, earlier callers) or a sequence of them -> a list of outputs."""
    return [value] if isinstance(value, np.ndarray) else list(value)


def _cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = norm_a * norm_b
    # Two all-zero outputs agree (1.0); a packed output collapsed to zeros against a non-zero
    # reference (a broken quantization) must not count as a perfect match.
    both_zero = (norm_a == 0) & (norm_b == 0)
    return np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), np.where(both_zero, 1.0, 0.0))


def _compare_one(reference: np.ndarray, packed: np.ndarray) -> dict:
    finite = bool(np.isfinite(packed).all())
    if reference.shape != packed.shape:
        return {"finite": finite, "max_abs": float("inf"), "cosine": 0.0, "cosine_min": 0.0, "shape": "differs"}
    max_abs = float(np.abs(reference.astype(np.float64) - packed.astype(np.float64)).max()) if finite else float("inf")
    cos = _cosine_per_sample(reference, packed) if finite else np.zeros(len(reference))
    return {"finite": finite, "max_abs": max_abs, "cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def compare_outputs(
    reference: np.ndarray | Sequence[np.ndarray],
    packed: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | None,
    names: Sequence[str] | None = None,
) -> dict:
    """Every number we know how to compute for the packed outputs vs their references: the worst
    output's cosine and max |diff| at the top level, each output's under ``outputs``."""
    reference, packed = as_outputs(reference), as_outputs(packed)
    if len(reference) != len(packed):
        raise ValueError(f"the packed model has {len(packed)} outputs, the reference {len(reference)}")
    names = list(names) if names is not None else [f"output {i}" for i in range(len(reference))]
    per = [{"name": n, **_compare_one(r, p)} for n, r, p in zip(names, reference, packed)]
    worst = min(per, key=lambda o: (o["cosine"], -o["max_abs"]))
    out: dict = {
        "samples": int(len(reference[0])),
        "finite": all(o["finite"] for o in per),
        "max_abs": max(o["max_abs"] for o in per),
        "cosine": worst["cosine"],
        "cosine_min": min(o["cosine_min"] for o in per),
    }
    if len(per) > 1:
        out["outputs"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in o.items()} for o in per]
        out["worst_output"] = worst["name"]
    first_ref, first_packed = reference[0], packed[0]
    if first_ref.ndim == 2 and first_ref.shape[1] > 1 and first_ref.shape == first_packed.shape:
        ref_top1, packed_top1 = first_ref.argmax(1), first_packed.argmax(1)
        out["agreement"] = float((ref_top1 == packed_top1).mean())
        if labels is not None:
            out["accuracy"] = float((packed_top1 == labels).mean())
            out["reference_accuracy"] = float((ref_top1 == labels).mean())
    return out


@dataclass
class Metric:
    """The number the accuracy budget applies to, and why it was chosen."""

    name: str
    # fn(reference outputs, packed outputs, labels) -> value (higher is better); see the module docstring.
    fn: Callable[[Outputs, Outputs, np.ndarray | None], float] | None = None
    # Why this metric (recorded in the manifest's validation), and a warning worth printing loudly.
    reason: str = ""
    warning: str | None = None
    # Set when a custom metric only takes arrays: it was called with output 0 (recorded, single-output models only).
    first_output_only: bool = False

    @property
    def is_classification(self) -> bool:
        return self.name in ("accuracy", "agreement")

    def _call(self, reference: Outputs, packed: Outputs, labels: np.ndarray | None) -> float:
        assert self.fn is not None
        try:
            return float(self.fn(reference, packed, labels))
        except (AttributeError, TypeError, IndexError):
            # A metric written for one array (the earlier signature): on a single-output model that is all there is.
            if len(reference) != 1:
                raise
            legacy: Callable[..., float] = self.fn
            value = float(legacy(reference[0], packed[0], labels))
            self.first_output_only = True
            return value

    def reference_value(self, reference: Outputs, labels: np.ndarray | None) -> float:
        if self.fn is not None:
            return self._call(reference, reference, labels)
        if self.name == "accuracy":
            return float((reference[0].argmax(1) == labels).mean())
        return 1.0  # agreement and cosine of the reference with itself

    def packed_value(self, numbers: dict, reference: Outputs, packed: Outputs, labels: np.ndarray | None) -> float:
        if self.fn is not None:
            return self._call(reference, packed, labels)
        return float(numbers[self.name])

    def measure(self, numbers: dict, reference: Outputs, packed: Outputs, labels: np.ndarray | None, names) -> dict:
        """The budget's numbers (``metric``, ``reference``, ``packed``, ``drop``; a task's metric adds its
        own figures, and ``refused`` with the reason when a guard rejects the variant whatever the drop)."""
        ref_value = self.reference_value(reference, labels)
        value = self.packed_value(numbers, reference, packed, labels) if numbers["finite"] else float("-inf")
        return {"metric": self.name, "reference": ref_value, "packed": value, "drop": ref_value - value}


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


def evaluate(
    metric: Metric,
    reference: np.ndarray | Sequence[np.ndarray],
    packed: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | None,
    names: Sequence[str] | None = None,
) -> dict:
    """The budget's metric and every output comparison of ``packed`` against ``reference`` (all outputs)."""
    reference, packed = as_outputs(reference), as_outputs(packed)
    numbers = compare_outputs(reference, packed, labels, names)
    numbers.update(metric.measure(numbers, reference, packed, labels, names))
    if metric.first_output_only:
        numbers["metric_outputs"] = "first only (the metric takes one array)"
    return numbers


def within_budget(validation: dict | None, max_drop: float) -> bool:
    """A validated variant is within the budget: finite outputs, not refused by a guard, drop <= max_drop."""
    return bool(
        validation is not None
        and validation.get("finite", True)
        and not validation.get("refused")
        and validation["drop"] <= max_drop + 1e-12
    )
