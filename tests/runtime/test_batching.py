"""Dynamic batching: stacking, per-caller rows, bounded queue, timeouts — counted, not timed."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from edgerun.batching import Batcher
from edgerun.errors import InferenceTimeoutError, OverloadedError, RequestError


class CountingSession:
    """Doubles its input; records every run's batch size. ``gate`` lets a test hold a run."""

    batchable = True

    def __init__(self, gate: threading.Event | None = None):
        self.runs: list[int] = []
        self.gate = gate

    def run(self, feeds):
        if self.gate is not None:
            self.gate.wait(10)
        x = feeds["x"]
        if (x < 0).any():
            raise RequestError("negative input")
        self.runs.append(len(x))
        return {"y": x * 2}


def test_concurrent_requests_are_stacked_and_split_back():
    session = CountingSession()

    async def scenario():
        batcher = Batcher(max_batch=8, max_delay_ms=50, max_queue=16)
        inputs = [np.full((1 + i % 2, 3), i, dtype=np.float32) for i in range(6)]  # 9 rows in all
        results = await asyncio.gather(*(batcher.submit(session, {"x": x}) for x in inputs))
        await batcher.close()
        return inputs, results

    inputs, results = asyncio.run(scenario())
    assert sum(session.runs) == 9 and len(session.runs) < 6
    assert max(session.runs) <= 8
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result["y"], x * 2)


def test_incompatible_shapes_are_not_stacked():
    session = CountingSession()

    async def scenario():
        batcher = Batcher(max_batch=8, max_delay_ms=20)
        a, b = np.ones((1, 3), np.float32), np.ones((1, 5), np.float32)
        out = await asyncio.gather(batcher.submit(session, {"x": a}), batcher.submit(session, {"x": b}))
        await batcher.close()
        return out

    out = asyncio.run(scenario())
    assert session.runs == [1, 1]
    assert out[0]["y"].shape == (1, 3) and out[1]["y"].shape == (1, 5)


def test_one_bad_request_does_not_fail_its_batch_neighbours():
    session = CountingSession()

    async def scenario():
        batcher = Batcher(max_batch=4, max_delay_ms=20)
        good = batcher.submit(session, {"x": np.ones((1, 2), np.float32)})
        bad = batcher.submit(session, {"x": -np.ones((1, 2), np.float32)})
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await batcher.close()
        return results

    good, bad = asyncio.run(scenario())
    np.testing.assert_array_equal(good["y"], [[2, 2]])
    assert isinstance(bad, RequestError)


def test_full_queue_is_overloaded_and_timeout_is_reported():
    gate = threading.Event()
    session = CountingSession(gate)

    async def scenario():
        batcher = Batcher(max_batch=1, max_queue=2, timeout_s=5)
        x = {"x": np.ones((1, 2), np.float32)}
        running = asyncio.ensure_future(batcher.submit(session, x))
        while batcher.running == 0:  # wait until the first run holds the worker
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(session, x)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="queue is full"):
            await batcher.submit(session, x)
        queued[0].cancel()  # a caller that went away frees its slot
        await asyncio.sleep(0)
        with pytest.raises(InferenceTimeoutError, match="no inference result within 0.05 s"):
            await batcher.submit(session, x, timeout_s=0.05)
        gate.set()
        results = await asyncio.gather(running, queued[1])
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert all(r["y"].shape == (1, 2) for r in results)


def test_close_drains_queued_requests():
    session = CountingSession()

    async def scenario():
        batcher = Batcher(max_batch=1)
        futures = [asyncio.ensure_future(batcher.submit(session, {"x": np.ones((1, 1), np.float32)})) for _ in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(OverloadedError, match="shutting down"):
            await batcher.submit(session, {"x": np.ones((1, 1), np.float32)})
        return await asyncio.gather(*futures)

    assert len(asyncio.run(scenario())) == 5 and session.runs == [1] * 5


def test_requests_still_queued_after_the_drain_timeout_get_an_answer_at_once():
    gate = threading.Event()
    session = CountingSession(gate)

    async def scenario():
        batcher = Batcher(max_batch=1, timeout_s=30)
        feeds = {"x": np.ones((1, 1), np.float32)}
        running = asyncio.ensure_future(batcher.submit(session, feeds))
        while batcher.running == 0:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(batcher.submit(session, feeds))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close(drain_timeout_s=0.1))
        with pytest.raises(OverloadedError, match="shutting down"):
            await asyncio.wait_for(queued, 5)  # not left to its own 30 s timeout
        ticks = 0
        while not closing.done():  # the event loop keeps turning while the running job finishes
            ticks += 1
            if ticks == 3:
                gate.set()
            await asyncio.sleep(0.01)
        return await running, ticks

    result, ticks = asyncio.run(scenario())
    assert result["y"].tolist() == [[2.0]] and ticks >= 3


class RowLosingSession:
    """Claims a dynamic batch dim but, when stacked, answers with the wrong number of rows."""

    batchable = True

    def __init__(self, stacked_output):
        self.stacked_output = stacked_output

    def run(self, feeds):
        x = feeds["x"]
        if len(x) > 1:
            return {"y": self.stacked_output(x)}
        return {"y": x * 2}


@pytest.mark.parametrize(
    "stacked_output", [lambda x: x[:1] * 2, lambda x: np.float32(x.sum())], ids=["too-few-rows", "scalar"]
)
def test_stacked_outputs_without_the_stacked_rows_are_rerun_per_request(stacked_output):
    session = RowLosingSession(stacked_output)

    async def scenario():
        batcher = Batcher(max_batch=4, max_delay_ms=1000)
        feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(1, 4)]
        results = await asyncio.gather(*(batcher.submit(session, f, timeout_s=5) for f in feeds))
        after = await batcher.submit(session, {"x": np.ones((1, 2), np.float32)}, timeout_s=5)
        await batcher.close()
        return results, after

    results, after = asyncio.run(scenario())
    for i, result in enumerate(results, start=1):
        np.testing.assert_array_equal(result["y"], np.full((1, 2), 2 * i, np.float32))
    np.testing.assert_array_equal(after["y"], np.full((1, 2), 2, np.float32))


def test_an_unexpected_collector_error_fails_its_batch_not_the_server():
    calls = []

    def on_batch(rows):
        calls.append(rows)
        if len(calls) == 1:
            raise RuntimeError("metrics broke")

    async def scenario():
        batcher = Batcher(max_batch=1, on_batch=on_batch)
        x = {"x": np.ones((1, 2), np.float32)}
        with pytest.raises(RuntimeError, match="metrics broke"):
            await batcher.submit(CountingSession(), x, timeout_s=5)
        after = await batcher.submit(CountingSession(), x, timeout_s=5)
        await batcher.close()
        return after

    assert asyncio.run(scenario())["y"].shape == (1, 2)


def test_a_worker_takes_the_next_queued_request_itself():
    """Queued requests for a busy instance run on the worker that frees it, without a round trip
    through the event loop: one worker start for the whole queue."""
    gate = threading.Event()
    session = CountingSession(gate)
    session.batchable = False

    async def scenario():
        batcher = Batcher(max_batch=1)
        starts = []
        real_submit = batcher._executor.submit

        def counting_submit(fn, *args):
            starts.append(fn)
            return real_submit(fn, *args)

        batcher._executor.submit = counting_submit
        futures = [
            asyncio.ensure_future(batcher.submit(session, {"x": np.full((1, 1), i, np.float32)})) for i in range(5)
        ]
        while len(batcher._pending) < 4:
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*futures)
        await batcher.close()
        return starts, results

    starts, results = asyncio.run(scenario())
    assert len(starts) == 1 and session.runs == [1] * 5
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(5)]


def test_a_layout_that_batches_stacks_beyond_the_server_wide_setting():
    """A model whose measured layout batches (``batch_size``) is stacked even with --max-batch left
    at 1; a TensorRT-style ``max_batch`` still caps it."""
    session = CountingSession()
    session.batch_size = 4
    capped = CountingSession()
    capped.batch_size, capped.max_batch = 4, 2

    async def scenario(target):
        batcher = Batcher(max_batch=1, max_delay_ms=200)
        xs = [np.full((1, 2), i, np.float32) for i in range(4)]
        results = await asyncio.gather(*(batcher.submit(target, {"x": x}, timeout_s=5) for x in xs))
        await batcher.close()
        return xs, results

    for target, most in [(session, 4), (capped, 2)]:
        xs, results = asyncio.run(scenario(target))
        assert max(target.runs) == most and sum(target.runs) == 4
        for x, result in zip(xs, results):
            np.testing.assert_array_equal(result["y"], x * 2)


def test_a_model_with_a_free_instance_does_not_wait_behind_another_models_backlog():
    gate = threading.Event()
    busy, idle = CountingSession(gate), CountingSession()
    busy.batchable = idle.batchable = False

    async def scenario():
        batcher = Batcher(max_batch=1)
        x = {"x": np.ones((1, 2), np.float32)}
        held = [asyncio.ensure_future(batcher.submit(busy, x, timeout_s=10)) for _ in range(3)]
        while len(batcher._pending) < 2:
            await asyncio.sleep(0.01)
        other = await batcher.submit(idle, x, timeout_s=5)  # answered while busy's queue waits
        waiting = len(batcher._pending)
        gate.set()
        await asyncio.gather(*held)
        await batcher.close()
        return other, waiting

    other, waiting = asyncio.run(scenario())
    assert other["y"].shape == (1, 2) and waiting == 2 and busy.runs == [1, 1, 1]
