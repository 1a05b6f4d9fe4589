"""Candidate variants of one exported model, measured side by side, and the choice among them.

``--quantize auto`` builds every candidate that makes sense for the target and the model,
validates each on real data, times each on this host, and keeps the fastest one within the
accuracy budget. FP32 is always a candidate, so ``auto`` never fails the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    name: str  # file stem and table row, e.g. "int8-qdq-u8s8"
    precision: str  # manifest precision: fp32 | fp16 | int8 | int8-dynamic | mixed
    path: Path | None = None
    metrics: dict = field(default_factory=dict)  # what the pass recorded (settings, coverage)
    validation: dict | None = None
    latency: dict | None = None
    error: str | None = None
    within_budget: bool = False
    size_bytes: int = 0  # recorded once built: the file lives in a temporary work dir

    def __post_init__(self) -> None:
        self.refresh_size()

    def refresh_size(self) -> None:
        if self.path is not None and self.path.exists():
            self.size_bytes = self.path.stat().st_size

    @property
    def recipe(self) -> str:
        return self.metrics.get("recipe", self.name)

    @property
    def usable(self) -> bool:
        return self.error is None and self.path is not None

    def row(self) -> dict:
        """One line of the candidate table (manifest and report)."""
        row = {"name": self.name, "precision": self.precision, "recipe": self.recipe, "size_bytes": self.size_bytes,
               "within_budget": self.within_budget}
        if self.latency:
            row["p50_ms"] = self.latency["p50_ms"]
        if self.validation:
            for key in ("metric", "packed", "drop", "agreement", "cosine_min", "max_abs"):
                if key in self.validation:
                    row[key] = self.validation[key]
        if "coverage" in self.metrics:
            row["quantized_fraction"] = self.metrics["coverage"]["fraction"]
        if self.error:
            row["error"] = self.error
        return row


@dataclass
class CandidatePlan:
    """How to build one candidate: a name, a precision and a build function (src, dst) -> metrics."""

    name: str
    precision: str
    build: Callable[[Path, Path], dict]


def apply_budget(candidates: list[Candidate], max_drop: float) -> None:
    for candidate in candidates:
        v = candidate.validation
        candidate.within_budget = bool(candidate.usable and v is not None and v.get("finite", True) and v["drop"] <= max_drop + 1e-12)


def select(candidates: list[Candidate], optimize_for: str = "latency", prefer: list[str] | None = None) -> Candidate | None:
    """The fastest (or smallest) usable candidate within budget.

    ``prefer`` (GPU targets) ranks by precision order instead of host latency: the host's CPU
    timings do not predict TensorRT's.
    """
    eligible = [c for c in candidates if c.within_budget and c.latency is not None]
    if not eligible:
        return None
    if prefer:
        rank = {p: i for i, p in enumerate(prefer)}
        return min(eligible, key=lambda c: (rank.get(c.precision, len(rank)), c.latency["p50_ms"]))
    if optimize_for == "size":
        return min(eligible, key=lambda c: (c.size_bytes, c.latency["p50_ms"]))
    return min(eligible, key=lambda c: (c.latency["p50_ms"], c.size_bytes))
