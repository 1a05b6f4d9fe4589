"""Dynamic batching and dispatch to a model's session instances.

Inference runs on worker threads, off the event loop, with at most one run in flight per
session instance (a model served with an N-instance layout runs up to N requests at once; a
plain session runs one at a time: concurrent runs of one session only fight for cores). Each
model's requests run in arrival order; a model with a free instance never waits behind another
model's backlog.
Requests that arrive within ``max_delay_ms`` of each other and agree on every non-batch
dimension are stacked into one run (only when the model's batch dimension is dynamic) and the
rows are split back, so each caller gets exactly its own rows. The queue is bounded in
requests and in bytes: when it is full the caller is told to come back later (503) instead of
waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgerun.errors import EdgerunError, InferenceTimeoutError, OverloadedError
from edgerun.serve_options import DEFAULTS

log = logging.getLogger("edgerun")


@dataclass
class _Job:
    session: Any  # ModelSession (anything with .run(feeds) and .batchable)
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple | None  # None = never stacked with others
    future: asyncio.Future = field(repr=False)
    nbytes: int = 0


def _batch_key(session, feeds: dict[str, np.ndarray]) -> tuple | None:
    if not session.batchable:
        return None
    return (id(session),) + tuple((name, arr.shape[1:], arr.dtype.str) for name, arr in sorted(feeds.items()))


def run_stacked(session, feeds_list: list[dict[str, np.ndarray]]) -> list[Any]:
    """Run several requests as one batch; returns per-request outputs or the exception each raised."""
    if len(feeds_list) == 1:
        try:
            return [session.run(feeds_list[0])]
        except Exception as exc:  # noqa: BLE001 - handed back to the caller's future
            return [exc]
    rows = [_rows(f) for f in feeds_list]
    try:
        stacked = {name: np.concatenate([f[name] for f in feeds_list]) for name in feeds_list[0]}
        outputs = session.run(stacked)
        # Splitting is only safe when every output really has one row per stacked row.
        if any(np.ndim(value) == 0 or len(value) != sum(rows) for value in outputs.values()):
            raise ValueError("outputs do not keep the stacked rows")
    except Exception:  # noqa: BLE001
        # One bad request (or a model whose batch dim is not really per row) must not fail or
        # mix up its neighbours: run each on its own.
        return [run_stacked(session, [f])[0] for f in feeds_list]
    bounds = np.cumsum(rows)[:-1]
    split = {name: np.split(value, bounds) for name, value in outputs.items()}
    return [{name: parts[i] for name, parts in split.items()} for i in range(len(feeds_list))]


def _rows(feeds: dict[str, np.ndarray]) -> int:
    """Rows of a request: its batch dim (scalar inputs have none)."""
    return max((len(value) for value in feeds.values() if np.ndim(value)), default=1)


def _concurrency(session) -> int:
    """Runs of ``session`` that may be in flight at once (an instance pool's size, else 1)."""
    return max(1, int(getattr(session, "concurrency", 1)))


# Threads that run inference; only as many are started as runs are in flight at once.
_MAX_WORKERS = 64


class Batcher:
    """Queue + collector task + worker threads. Create and use inside a running event loop.

    A worker that finishes a run takes the next queued request for the same instance itself
    (when there is nothing to stack), so a busy event loop never leaves an instance idle; the
    collector task handles the rest (stacking, other models, a freed instance).
    """

    def __init__(
        self,
        *,
        max_batch: int = 1,
        max_delay_ms: float = DEFAULTS.max_delay_ms,
        max_queue: int = DEFAULTS.max_queue,
        max_queue_bytes: int | None = DEFAULTS.max_queue_bytes,
        timeout_s: float | None = DEFAULTS.timeout_s,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 1:
            raise EdgerunError(f"--max-batch and --max-queue must be at least 1, got {max_batch} and {max_queue}")
        if max_queue_bytes is not None and max_queue_bytes < 1:
            raise EdgerunError(f"--max-queue-bytes must be at least 1, got {max_queue_bytes}")
        self.max_batch = max_batch
        self.max_delay_s = max(0.0, max_delay_ms) / 1000.0
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.timeout_s = timeout_s
        self.on_batch = on_batch
        # The queue and the counters are shared with the worker threads: always under _lock.
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._in_flight: dict[int, int] = {}  # id(session) -> runs in flight
        self.running = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="edgerun-infer")
        self._closing = False

    @property
    def depth(self) -> int:
        """Requests waiting for, or in, an inference run."""
        return len(self._pending) + self.running

    @property
    def queued_bytes(self) -> int:
        """Bytes of input tensors waiting for a run."""
        with self._lock:
            return sum(job.nbytes for job in self._pending if not job.future.done())

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="edgerun-batcher")

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def submit(self, session, feeds: dict[str, np.ndarray], timeout_s: float | None = None) -> dict:
        if self._task is None:
            self.start()
        if self._closing:
            raise OverloadedError("server is shutting down; retry on another instance", retry_after_s=5)
        nbytes = sum(int(value.nbytes) for value in feeds.values())
        future = asyncio.get_running_loop().create_future()
        job = _Job(session, feeds, _rows(feeds), _batch_key(session, feeds), future, nbytes)
        with self._lock:
            if len(self._pending) >= self.max_queue:
                # Timed-out or cancelled callers leave their jobs behind; they must not hold queue slots.
                self._pending = deque(job for job in self._pending if not job.future.done())
            if len(self._pending) >= self.max_queue:
                raise OverloadedError(
                    f"inference queue is full ({self.max_queue} requests waiting); retry shortly or raise --max-queue",
                    retry_after_s=1,
                )
            if self.max_queue_bytes is not None and self._pending:
                queued = sum(job.nbytes for job in self._pending if not job.future.done())
                if queued + nbytes > self.max_queue_bytes:
                    raise OverloadedError(
                        f"inference queue holds {queued} bytes of inputs and this request adds {nbytes}, over the "
                        f"{self.max_queue_bytes} byte limit; retry shortly or raise --max-queue-bytes",
                        retry_after_s=1,
                    )
            # Nothing queued ahead and nothing to stack: straight to a free instance.
            now = not self._pending and self._has_free_instance(session) and self._alone(job)
            if now:
                self._claim(session, 1)
            else:
                self._pending.append(job)
        if now:
            self._executor.submit(self._work, asyncio.get_running_loop(), session, [job])
        else:
            self._wake()
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        try:
            result = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            # wait_for cancelled the future, so the collector skips the job if it has not run yet.
            raise InferenceTimeoutError(
                f"no inference result within {timeout:g} s (queue depth {self.depth}); retry, or raise --timeout"
            ) from None
        return result

    def _pop_first(self, wanted: Callable[[_Job], bool], only: Callable[[_Job], bool] | None = None) -> _Job | None:
        """Under _lock: remove and return the oldest live job that is ``wanted`` (and passes ``only``).

        Requests of one session keep their order; a model with a free instance does not wait
        behind another model's backlog.
        """
        if any(job.future.done() for job in self._pending):  # timed-out or cancelled callers
            self._pending = deque(job for job in self._pending if not job.future.done())
        for index, job in enumerate(self._pending):
            if not wanted(job):
                continue
            if only is not None and not only(job):
                return None
            del self._pending[index]
            return job
        return None

    def _alone(self, job: _Job) -> bool:
        """Whether ``job`` runs by itself (never waits for others to stack with)."""
        return job.key is None or self._batch_limit(job.session) == 1

    def _take(self, key: tuple, room: int) -> list[_Job]:
        taken: list[_Job] = []
        kept: deque[_Job] = deque()
        with self._lock:
            while self._pending:
                job = self._pending.popleft()
                if job.future.done():
                    continue
                if job.key == key and job.rows <= room:
                    taken.append(job)
                    room -= job.rows
                else:
                    kept.append(job)
            self._pending = kept
        return taken

    def _has_free_instance(self, session) -> bool:
        return self._in_flight.get(id(session), 0) < _concurrency(session)

    def _claim(self, session, jobs: int) -> None:
        """Under _lock: one more run of ``session`` in flight, holding ``jobs`` requests."""
        self._in_flight[id(session)] = self._in_flight.get(id(session), 0) + 1
        self.running += jobs

    def _batch_limit(self, session) -> int:
        # The layout may stack more than the server-wide setting; a session built for a bounded
        # profile (TensorRT) must never see a larger stack.
        wanted = max(self.max_batch, int(getattr(session, "batch_size", 1) or 1))
        return min(wanted, getattr(session, "max_batch", None) or wanted)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            with self._lock:
                first = self._pop_first(lambda job: self._has_free_instance(job.session))
                finished = not self._pending and self._closing
            if first is None:
                if finished:
                    return
                # Woken by a new request or by a run that finished (and freed an instance).
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [first]
            rows = first.rows
            limit = self._batch_limit(first.session)
            if first.key is not None and limit > 1:
                deadline = loop.time() + self.max_delay_s
                while rows < limit:
                    more = self._take(first.key, limit - rows)
                    batch += more
                    rows += sum(job.rows for job in more)
                    remaining = deadline - loop.time()
                    if rows >= limit or remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            with self._lock:
                self._claim(first.session, len(batch))
            self._executor.submit(self._work, loop, first.session, batch)

    def _work(self, loop: asyncio.AbstractEventLoop, session, batch: list[_Job]) -> None:
        """Worker thread: run ``batch``, then keep taking this session's oldest queued request while
        it runs alone; each result goes back to the loop as soon as it is ready."""
        while True:
            try:
                results: list[Any] | BaseException = run_stacked(session, [job.feeds for job in batch])
            except Exception as exc:  # a bug here must fail this batch, not every later request
                log.exception("batcher: unexpected error running a batch of %d", len(batch))
                results = exc
            with self._lock:
                # This session's oldest request, unless it waits to be stacked (the collector's job).
                follow = self._pop_first(lambda job: job.session is session, only=self._alone)
                if follow is not None:
                    self.running += 1
                else:
                    left = self._in_flight.get(id(session), 1) - 1
                    if left:
                        self._in_flight[id(session)] = left
                    else:
                        self._in_flight.pop(id(session), None)
            loop.call_soon_threadsafe(self._complete, batch, results)
            if follow is None:
                return
            batch = [follow]

    def _complete(self, batch: list[_Job], results: list[Any] | BaseException) -> None:
        """On the loop: hand each caller its result."""
        with self._lock:
            self.running -= len(batch)
            waiting = bool(self._pending)
        if waiting or self._closing:  # an instance may be free for the queue (or the drain)
            self._wake()
        if isinstance(results, BaseException):
            results = [results] * len(batch)
        elif self.on_batch is not None:
            try:
                self.on_batch(sum(job.rows for job in batch))
            except Exception as exc:  # a bug here must fail this batch, not every later request
                log.exception("batcher: unexpected error after a batch of %d", len(batch))
                results = [exc] * len(batch)
        for job, result in zip(batch, results):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, finish the queued ones, then stop the workers."""
        self._closing = True
        if self._task is not None:
            self._wake()
            try:
                await asyncio.wait_for(self._drain(), drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning(
                    "shutdown: %d requests still queued after %.0f s; dropping them", self.depth, drain_timeout_s
                )
                self._task.cancel()
                for job in self._pending:  # answered now (503) rather than left to their own timeout
                    if not job.future.done():
                        job.future.set_exception(OverloadedError("server is shutting down; retry on another"))
                self._pending.clear()
        # Runs in progress finish on their worker threads; waiting for them must not block the event loop.
        await asyncio.to_thread(self._executor.shutdown, True)

    async def _drain(self) -> None:
        assert self._task is not None
        await self._task
        while self.running:  # runs started before closing hand their results back first
            await asyncio.sleep(0.005)
