"""Progress lines for long steps: what one candidate measured and how long it took.

Building, validating and timing five candidates can take minutes; one line per candidate with
its elapsed time says the build is alive and where the time goes, and the command's last
stderr line gives the total.
"""

from __future__ import annotations

import time
from typing import Any


class Stopwatch:
    """Seconds since it was started (monotonic clock)."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start

    def __str__(self) -> str:
        return format_seconds(self.seconds)


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12.3 s``, ``6 min 05 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def candidate_line(index: int, total: int, candidate: Any, elapsed: Stopwatch) -> str:
    """``[2/5] int8-qdq: accuracy 0.9750 (drop +0.0000), p50 1.23 ms (4.1 s)``."""
    head = f"[{index}/{total}] {candidate.name}"
    if candidate.error:
        return f"{head}: failed: {candidate.error[:120]} ({elapsed})"
    v = candidate.validation or {}
    parts = []
    if v:
        parts.append(f"{v.get('metric', 'metric')} {float(v['packed']):.4f} (drop {float(v['drop']):+.4f})")
    if candidate.latency:
        parts.append(f"p50 {float(candidate.latency['p50_ms']):.3f} ms")
    return f"{head}: {', '.join(parts) or 'measured'} ({elapsed})"
