"""How an ``.npz`` of a torch model whose inputs only have names is read: rows or whole calls.

A tokenizer returns ``input_ids`` as ``[N, T]``: N rows of the model's batch axis, so one call
takes ``[1, T]`` (or a batch of rows). Per-call data (``[calls, 1, T]``, a recurrent
``state [calls, 2, 1, 128]``, a scalar ``sr [calls]``) has each call's full tensor after the
first axis. The shapes alone suggest one reading; one call of the model on the first entries
confirms it, and when it fails the other reading is tried. When neither runs, the error shows
both feeds and what the model said, so the user sees a layout question, not a model crash.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgebuild.errors import UsageError, first_line
from edgebuild.sources import InputSpec

ROWS, CALLS = "rows", "calls"


def _model_dtype(array: np.ndarray) -> np.ndarray:
    # numpy's default float is float64; torch models (and their exports) take float32.
    return array.astype(np.float32) if array.dtype == np.float64 else array


def _preferred(entries: dict[str, np.ndarray]) -> str:
    """Calls when the entries already look like whole calls (a scalar, or every entry with a leading
    batch axis of 1, as ``[calls, 1, T]``); rows otherwise (a tokenizer's ``[N, T]``, images ``[N, C, H, W]``)."""
    if any(e.ndim == 0 for e in entries.values()) or all(e.shape[0] == 1 for e in entries.values()):
        return CALLS
    return ROWS


def _feed(arrays: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    # Rows: the first two rows as one batch (a batch axis that takes more than one row is a real one).
    return {n: _model_dtype(a[:2] if layout == ROWS else a[0]) for n, a in arrays.items()}


def _runs(module: Any, feed: dict[str, np.ndarray]) -> str | None:
    """None when the model runs on ``feed``, else its first error line."""
    import torch

    from edgebuild.export import call_module

    try:
        with torch.no_grad():
            call_module(module, {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in feed.items()})
    except Exception as exc:  # noqa: BLE001 - user model code raises anything
        return first_line(exc, 200)
    return None


def _shapes(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{n} {list(v.shape)}" for n, v in feed.items())


def npz_layout(
    inputs: list[InputSpec], arrays: dict[str, np.ndarray], source: str, module: Any
) -> tuple[list[InputSpec], str]:
    """Per-call input specs for ``arrays`` (one per input, first axis = samples) and one line saying
    what one call gets and how the data was read."""
    counts = {n: (len(a) if a.ndim else 0) for n, a in arrays.items()}
    if min(counts.values()) == 0 or len(set(counts.values())) > 1:
        raise UsageError(
            f"data '{source}': every array needs the same first axis (samples or calls); they have {counts}"
        )
    entries = {n: a[0] for n, a in arrays.items()}
    first = _preferred(entries)
    order = [first, CALLS if first == ROWS else ROWS]
    failures: dict[str, str] = {}
    layout = first
    if module is not None:
        for layout in order:
            error = _runs(module, _feed(arrays, layout))
            if error is None:
                break
            failures[layout] = error
        else:
            rows, calls = _feed(arrays, ROWS), _feed(arrays, CALLS)
            raise UsageError(
                f"data '{source}': the model runs on neither reading of its arrays "
                f"{ {n: list(a.shape) for n, a in arrays.items()} }: as rows of the batch axis "
                f"({_shapes(rows)}): {failures[ROWS]}; as one call per entry ({_shapes(calls)}): "
                f"{failures[CALLS]}. Give [N, ...] arrays whose first axis is the model's batch (a tokenizer's "
                f"[N, T]), or [calls, ...] arrays holding each call's full tensor"
            )
    specs = []
    for spec in inputs:
        entry = _model_dtype(entries[spec.name])
        shape = (1, *entry.shape) if layout == ROWS else entry.shape
        specs.append(InputSpec(spec.name, tuple(int(d) for d in shape), entry.dtype.name))
    count = next(iter(counts.values()))
    if layout == ROWS:
        how = f"the .npz's first axis read as the batch axis: {count} rows"
    else:
        how = f"the .npz's first axis counts calls: {count} calls"
    from edgebuild.data import describe_inputs

    return specs, f"{describe_inputs(specs)} per call ({how})"
