"""The start-up timeline: how long each phase of ``edgerun serve`` took (logged at debug level).

Devices restart (power cuts, watchdogs, rolling updates, scale to zero), so start-up is paid again and
again. The phases: ``imports`` (both threads' modules), ``verify`` (manifest and checksums),
``session`` (ONNX Runtime sessions), ``golden`` (the parity check), ``bench`` (the self-benchmark's
variant timing), ``layout`` (the execution layout, and a warm-up run when no golden check ran),
``app`` (assembling the FastAPI app) and ``bind`` (the batcher, the socket, the server's start).
Loading runs on its own thread (``StartupLoad``, below) next to the imports and the bind, so phases
overlap; ``ready`` is the wall-clock time from the command line's start (``edgerun.cli`` imports this
module first) to the later of the socket taking connections and the bundles being loaded; the
interpreter's own start before it is not included (``/proc``'s process start time was 0.19-0.22 s off
in a sandboxed VM, too coarse to use). Each phase is shown with its duration (summed over the times it
ran) and when it first began and last ended, in ms since then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgerun.reload import ModelRepository

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


@contextlib.contextmanager
def deferred_model_builds() -> Iterator[None]:
    """pydantic models *defined* inside are built on first use, as with ``defer_build=True``.

    For ``import fastapi`` in the ``serve`` process: FastAPI defines some 30 pydantic models of the
    OpenAPI document at import, which only ``/openapi.json`` (and the docs pages that fetch it) use;
    built there, they cost nothing at start-up (measured: ``import fastapi`` 181 -> 156 ms of CPU; the
    cold start against the plain app 1.15x -> 1.03x, paired, 15 rounds). The document is the same
    (a test compares the served one with one built in a process that imported FastAPI as usual).
    pydantic has no public switch for models it does not own, so this sets the default of
    ``defer_build`` in ``pydantic._internal._config`` for the duration, and does nothing where that
    default is not found as expected. Type adapters (FastAPI's request and response fields) do not
    read that default: the routes are built as before. Models another thread defines meanwhile are
    deferred too, which changes when they are built, not what they check.
    """
    try:
        from pydantic._internal import _config
    except ImportError:
        defaults = None
    else:
        defaults = getattr(_config, "config_defaults", None)
    if not isinstance(defaults, dict) or defaults.get("defer_build") is not False:
        yield
        return
    defaults["defer_build"] = True
    try:
        yield
    finally:
        defaults["defer_build"] = False


def log_ready() -> None:
    log.debug(TIMELINE.summary())


class StartupLoad:
    """The bundles ``edgerun serve`` starts with, loaded on a thread of their own.

    The thread imports the loading half of edgerun (numpy, pydantic, the manifest models), makes the
    repository, then loads every bundle (verify, sessions, golden check) while the main thread imports
    the web stack, builds the app and binds the socket: hashing, session creation and inference release
    the GIL, so the two overlap. ``edgerun serve`` has the main thread wait for the repository
    (``wait_repository``) before its own imports, so the two threads' imports do not take turns.
    ``make_repository`` and ``load`` run on the thread. The repository's ``initial_load`` event is set
    once every bundle passed, so ``/v2/health/ready`` stays 503 until then; ``finished`` is set either
    way, with ``error`` holding what stopped the load: the server stops, and the main thread re-raises
    it as a load on it would have raised it. A load cut short because the server was stopped first (a
    signal) is not an error of its own.
    """

    def __init__(
        self,
        make_repository: Callable[[], ModelRepository],
        load: Callable[[ModelRepository], Any],
        *,
        spare_a_core: bool = False,
    ) -> None:
        self._make_repository = make_repository
        self._load = load
        self._spare_a_core = spare_a_core
        self._spared: tuple[frozenset[int], frozenset[int]] | None = None
        # The main thread's imports are done (``main_thread_imported``): the load may time things now.
        self.main_imports_done = threading.Event()
        self._made = threading.Event()
        self.finished = threading.Event()
        self.repository: ModelRepository | None = None
        self.error: BaseException | None = None
        self.stopped_server = False  # set by the server when this load's failure made it stop
        self._lock = threading.Lock()
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="edgerun-load")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        if self._spare_a_core:
            from edgerun.threads import spare_a_core

            self._spared = spare_a_core()
        try:
            repository = self._make_repository()
            repository.initial_load.clear()  # before the main thread can see it
            self.repository = repository
            self._made.set()
            self._load(repository)
            self.share_every_core()  # before ready: the server runs on every core
            repository.initial_load.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            self.error = exc
        finally:
            self.share_every_core()  # also the threads this one created after the main thread's call
            self._made.set()
            with self._lock:
                self.finished.set()
                abandoned = self._abandoned
            if abandoned and self.repository is not None:
                self.repository.close()

    def main_thread_imported(self) -> None:
        """Called by the main thread once its imports are done (or failed): every core is shared again
        and ``main_imports_done`` is set, which the load's timed steps wait for."""
        self.share_every_core()
        self.main_imports_done.set()

    def share_every_core(self) -> None:
        """The loading thread and the ONNX Runtime threads it made, kept off one core while the main
        thread imports (``spare_a_core``), get every core back: on ``main_thread_imported``, and on the
        loading thread before ready."""
        if self._spared is not None:
            from edgerun.threads import widen

            widen(self._spared)

    def abandon(self) -> None:
        """No server will run (start-up failed on the main thread): the loads still to come are refused,
        and what was loaded is released once the running load ends, on the loading thread."""
        with self._lock:
            self._abandoned = True
            done = self.finished.is_set()
        if self.repository is not None:
            self.repository.refuse_loads()
            if done:
                self.repository.close()

    def wait_repository(self) -> ModelRepository:
        """The repository once made (the load goes on); raises what failed before it was."""
        self._made.wait()
        if self.repository is None:
            assert self.error is not None
            raise self.error
        return self.repository

    def join(self) -> None:
        self._thread.join()
