"""Dynamic batching and dispatch to a model's session instances.

Inference runs on worker threads, off the event loop, with at most one run in flight per
session instance (a model served with an N-instance layout runs up to N requests at once; a
plain session runs one at a time: concurrent runs of one session only fight for cores).
Requests that arrive within ``max_delay_ms`` of each other and agree on every non-batch
dimension are stacked into one run (only when the model's batch dimension is dynamic) and the
rows are split back, so each caller gets exactly its own rows. The queue is bounded in
requests and in bytes: when it is full the caller is told to come back later (503) instead of
waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgerun.errors import EdgerunError, InferenceTimeoutError, OverloadedError

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
        except Exception as exc:  # handed back to the caller's future
            return [exc]
    rows = [_rows(f) for f in feeds_list]
    try:
        stacked = {name: np.concatenate([f[name] for f in feeds_list]) for name in feeds_list[0]}
        outputs = session.run(stacked)
        # Splitting is only safe when every output really has one row per stacked row.
        if any(np.ndim(value) == 0 or len(value) != sum(rows) for value in outputs.values()):
            raise ValueError("outputs do not keep the stacked rows")
    except Exception:
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
    """Queue + collector task + worker threads. Create and use inside a running event loop."""

    def __init__(
        self,
        *,
        max_batch: int = 1,
        max_delay_ms: float = 0.0,
        max_queue: int = 64,
        max_queue_bytes: int | None = None,
        timeout_s: float | None = 30.0,
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
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="edgerun-infer")
        self._closing = False
        self._in_flight: dict[int, int] = {}  # id(session) -> runs in flight
        self.running = 0

    @property
    def depth(self) -> int:
        """Requests waiting for, or in, an inference run."""
        return len(self._pending) + self.running

    @property
    def queued_bytes(self) -> int:
        """Bytes of input tensors waiting for a run."""
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
        if len(self._pending) >= self.max_queue:
            # Timed-out or cancelled callers leave their jobs behind; they must not hold queue slots.
            self._pending = deque(job for job in self._pending if not job.future.done())
        if len(self._pending) >= self.max_queue:
            raise OverloadedError(
                f"inference queue is full ({self.max_queue} requests waiting); retry shortly or raise --max-queue",
                retry_after_s=1,
            )
        nbytes = sum(int(value.nbytes) for value in feeds.values())
        if self.max_queue_bytes is not None and self._pending:
            queued = self.queued_bytes
            if queued + nbytes > self.max_queue_bytes:
                raise OverloadedError(
                    f"inference queue holds {queued} bytes of inputs and this request adds {nbytes}, over the "
                    f"{self.max_queue_bytes} byte limit; retry shortly or raise --max-queue-bytes",
                    retry_after_s=1,
                )
        rows = _rows(feeds)
        future = asyncio.get_running_loop().create_future()
        job = _Job(session, feeds, rows, _batch_key(session, feeds), future, nbytes)
        if (
            not self._pending
            and self._has_free_instance(session)
            and (job.key is None or self._batch_limit(session) == 1)
        ):
            self._dispatch(session, [job])  # nothing queued ahead and nothing to stack: run it now
        else:
            self._pending.append(job)
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

    def _take(self, key: tuple, room: int) -> list[_Job]:
        taken: list[_Job] = []
        kept: deque[_Job] = deque()
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

    def _batch_limit(self, session) -> int:
        # The layout may stack more than the server-wide setting; a session built for a bounded
        # profile (TensorRT) must never see a larger stack.
        wanted = max(self.max_batch, int(getattr(session, "batch_size", 1) or 1))
        return min(wanted, getattr(session, "max_batch", None) or wanted)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending or not self._has_free_instance(self._pending[0].session):
                # Woken by a new request or by a run that finished (and freed an instance).
                if not self._pending and self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._pending.popleft()
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
            self._dispatch(first.session, batch)

    def _dispatch(self, session, batch: list[_Job]) -> None:
        """Start one run of ``batch`` on a worker thread; ``_complete`` hands the results back."""
        loop = asyncio.get_running_loop()
        self._in_flight[id(session)] = self._in_flight.get(id(session), 0) + 1
        self.running += len(batch)
        work = self._executor.submit(run_stacked, session, [job.feeds for job in batch])
        # Straight from the worker to the loop: no task or wrapper future per run.
        work.add_done_callback(lambda done: loop.call_soon_threadsafe(self._complete, session, batch, done))

    def _complete(self, session, batch: list[_Job], done: Future) -> None:
        self.running -= len(batch)
        left = self._in_flight.get(id(session), 1) - 1
        if left:
            self._in_flight[id(session)] = left
        else:
            self._in_flight.pop(id(session), None)
        self._wake()
        try:
            results = done.result()
            if self.on_batch is not None:
                self.on_batch(sum(job.rows for job in batch))
        except Exception as exc:  # a bug here must fail this batch, not every later request
            log.exception("batcher: unexpected error running a batch of %d", len(batch))
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
        self._executor.shutdown(wait=True)

    async def _drain(self) -> None:
        assert self._task is not None
        await self._task
        while self.running:  # runs started before closing hand their results back first
            await asyncio.sleep(0.005)
