"""The start-up timeline: how long each phase of ``edgerun serve`` took (logged at debug level).

Devices restart (power cuts, watchdogs, rolling updates, scale to zero), so start-up is paid again and
again. The phases: ``imports`` (the web stack's modules), ``verify`` (manifest and checksums),
``session`` (ONNX Runtime sessions), ``golden`` (the parity check), ``bench`` (the self-benchmark's variant timing), ``layout`` (the execution layout and
its warm-up run), ``app`` (assembling the FastAPI app) and ``bind`` (the batcher, the socket, the
server's start). Loading runs on its own thread next to the imports, so phases may overlap; ``ready``
is the wall-clock time from the command line's start (``edgerun.cli`` imports this module first) to the
socket taking connections; the interpreter's own start before it is not included (``/proc``'s process
start time was 0.19-0.22 s off in a sandboxed VM, too coarse to use). Each phase is shown with its
duration (summed over the times it ran) and when it first began and last ended, in ms since then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("edgerun")

PHASES = ("imports", "verify", "session", "golden", "bench", "layout", "app", "bind")


class Timeline:
    """Phase durations, added up when a phase runs more than once (one ``session`` per variant tried)."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self._lock = threading.Lock()
        self.phases: dict[str, float] = {}
        self.spans: dict[str, tuple[float, float]] = {}  # first start, last end (seconds since the origin)

    def add(self, name: str, seconds: float, ended: float | None = None) -> None:
        end = (time.perf_counter() if ended is None else ended) - self.origin
        with self._lock:
            self.phases[name] = self.phases.get(name, 0.0) + seconds
            first = self.spans.get(name, (end - seconds, end))[0]
            self.spans[name] = (min(first, end - seconds), end)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.add(name, ended - started, ended)

    def since_start_s(self) -> float:
        return time.perf_counter() - self.origin

    def summary(self) -> str:
        with self._lock:
            phases, spans = dict(self.phases), dict(self.spans)
        ordered = [name for name in PHASES if name in phases] + sorted(set(phases) - set(PHASES))
        parts = [
            f"{name} {phases[name] * 1000:.0f} ms (at {spans[name][0] * 1000:.0f}-{spans[name][1] * 1000:.0f})"
            for name in ordered
        ]
        return f"start-up: {', '.join(parts)}; ready {self.since_start_s() * 1000:.0f} ms after edgerun started"


# One per process: a server starts once. Library callers (``load_model`` from a script) add to it too,
# which costs a dictionary update per phase.
TIMELINE = Timeline()


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    return TIMELINE.phase(name)


def log_ready() -> None:
    log.debug(TIMELINE.summary())
