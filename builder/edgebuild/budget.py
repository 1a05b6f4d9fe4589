"""What a validation set can resolve: a budget finer than one sample is no budget.

On 40 labelled samples accuracy moves in steps of 1/40 = 0.025: a budget of 0.01 then allows
no changed prediction at all, and every INT8 variant that changes one is refused. Pack says so
up front, with what would help: more samples, or a budget of at least one step.
"""

from __future__ import annotations

import math

# Metrics that count samples (each sample is right or wrong, agrees or not).
COUNTING_METRICS = ("accuracy", "agreement")


def resolution_note(metric: str, samples: int, budget: float) -> str | None:
    """One warning when ``budget`` is finer than one sample of ``metric`` on ``samples``, else None."""
    if metric not in COUNTING_METRICS or samples <= 0 or budget <= 0:
        return None
    step = 1.0 / samples
    if budget >= step:
        return None
    needed = math.ceil(1.0 / budget)
    return (
        f"--max-accuracy-drop {budget:g} is finer than the validation data can measure: on {samples} samples "
        f"{metric} moves in steps of {step:.4f} (one sample = {100 * step:.3g} points), so any changed prediction "
        f"breaks the budget; give at least {needed} validation samples (--val-data, --val-samples) or a budget "
        f"of at least {step:.4f} ({100 * step:.3g}%)"
    )


def drop_in_samples(metric: str, drop: float, samples: int) -> str:
    """``"3 of 40 samples"`` for a counting metric's drop, else ``""``."""
    if metric not in COUNTING_METRICS or samples <= 0:
        return ""
    return f" = {round(drop * samples)} of {samples} samples"
