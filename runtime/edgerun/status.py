"""What a served model reports about itself: a typed status, turned into JSON only at the edges
(model metadata over HTTP, ``/metrics``, the CLI's ``verify``/``bench`` output)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from edgerun.golden import GoldenResult
from edgerun.layout import LayoutDecision

TensorrtPhase = Literal["building", "ready", "failed"]


@dataclass(frozen=True)
class TensorrtState:
    """Where the TensorRT engine of a model stands (GPU targets only)."""

    state: TensorrtPhase
    variant: str | None = None
    reason: str | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        for key in ("variant", "reason", "seconds"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class ModelStatus:
    """The decision the loader took for a model and what it measured."""

    variant: str
    precision: str
    providers: list[str]
    threads: int
    threads_source: str
    golden: GoldenResult
    load_seconds: float
    # Self-benchmark numbers as measured (batch_N -> percentiles, variants -> p50 per variant).
    benchmark: dict[str, Any] | None = None
    dropped: list[str] = field(default_factory=list)
    tensorrt: TensorrtState | None = None
    serving: dict[str, Any] | None = None
    # The execution layout chosen on the device (instances x threads, spinning, batching).
    layout: LayoutDecision | None = None

    def with_changes(self, **changes: Any) -> ModelStatus:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variant": self.variant,
            "precision": self.precision,
            "providers": list(self.providers),
            "threads": self.threads,
            "threads_source": self.threads_source,
            "golden": self.golden.as_dict(),
            "load_seconds": self.load_seconds,
        }
        if self.benchmark:
            out["benchmark"] = self.benchmark
        if self.dropped:
            out["dropped"] = list(self.dropped)
        if self.tensorrt is not None:
            out["tensorrt"] = self.tensorrt.to_json()
        if self.serving:
            out["serving"] = self.serving
        if self.layout is not None:
            out["layout"] = self.layout.as_dict()
        return out
