"""Execution layouts: the choice from recorded numbers, instances serving in parallel, the cache
and the override flags — counted and compared, never timed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from runtime_fixtures import build_classifier_bundle, classifier_reference, post_concurrently, serve_after_load

import edgerun.layout as layout_module
import edgerun.loader as loader_module
from edgerun.batching import Batcher
from edgerun.bundle import Bundle
from edgerun.errors import EdgerunError, OverloadedError
from edgerun.layout import (
    BALANCED_MARGIN,
    SPIN_GAIN,
    InstancePool,
    Layout,
    LayoutMeasurement,
    LayoutRequest,
    candidate_layouts,
    default_layout,
    run_slots,
    select_layout,
)
from edgerun.loader import LoadOptions, load_model
from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app
from edgerun.threads import ThreadChoice

# ---- the choice, from recorded measurements ----

SPIN = Layout(1, 2, True)
PLAIN = Layout(1, 2, False)
HYBRID = Layout(1, 2, False, 1, 2)  # one 2-thread session taking two runs at once
SHARED = Layout(1, 1, False, 1, 2)  # one 1-thread session taking two runs at once
PAIR = Layout(2, 1, False)  # two 1-thread sessions (only when --instances asks for them)


def m(layout: Layout, p50: float, tput: float) -> LayoutMeasurement:
    return LayoutMeasurement(layout, p50, tput)


RECORDED = [m(SPIN, 4.0, 337.0), m(PLAIN, 5.2, 250.0), m(HYBRID, 5.3, 400.0), m(SHARED, 7.9, 442.0)]


def test_latency_picks_the_lowest_single_client_p50():
    assert select_layout(RECORDED, "latency").layout == SPIN


def test_throughput_picks_the_most_requests_per_second():
    assert select_layout(RECORDED, "throughput").layout == SHARED


def test_balanced_keeps_to_the_margin_of_the_best_latency():
    # The 2-thread session taking two runs keeps one client's p50 and gains most of the throughput;
    # 1x1 runs 2 is 52% slower for one client, outside the margin.
    assert select_layout(RECORDED, "balanced").layout == HYBRID
    within = [m(PLAIN, 4.0, 337.0), m(SHARED, 4.0 * (1 + BALANCED_MARGIN) - 0.01, 442.0)]
    assert select_layout(within, "balanced").layout == SHARED
    outside = [m(PLAIN, 4.0, 337.0), m(SHARED, 4.0 * (1 + BALANCED_MARGIN) + 0.01, 442.0)]
    assert select_layout(outside, "balanced").layout == PLAIN
    assert select_layout(outside, "balanced", margin=1.0).layout == SHARED


def test_batching_only_when_it_is_cheaper_per_request():
    batched = Layout(1, 1, False, 8, 2)
    marginal = [m(SHARED, 7.9, 442.0), m(batched, 9.9, 450.0)]  # +2 %: noise, not a gain
    assert select_layout(marginal, "throughput").layout == SHARED
    real_gain = [m(SHARED, 7.9, 442.0), m(batched, 9.9, 900.0)]
    assert select_layout(real_gain, "throughput").layout == batched


def test_spinning_must_clearly_beat_every_layout_without_it_for_throughput():
    # Under HTTP the spinning threads compete with the event loop, so a small in-process edge is not enough.
    marginal = [m(SPIN, 4.0, 260.0), m(PLAIN, 4.6, 250.0)]  # +4 %
    assert select_layout(marginal, "balanced").layout == PLAIN
    assert select_layout(marginal, "throughput").layout == PLAIN
    assert select_layout(marginal, "latency").layout == SPIN  # one client: nothing else wants the cores
    clear = [m(SPIN, 4.0, 250.0 * SPIN_GAIN + 1), m(PLAIN, 4.6, 250.0)]
    assert select_layout(clear, "balanced").layout == SPIN
    # Clearly ahead of its plain twin, but not of the same session taking two runs at once.
    behind = [*clear, m(HYBRID, 4.7, 250.0)]
    assert select_layout(behind, "balanced").layout == SPIN
    behind = [*clear, m(HYBRID, 4.7, 260.0)]
    assert select_layout(behind, "balanced").layout == HYBRID
    assert select_layout([m(SPIN, 4.0, 100.0)], "throughput").layout == SPIN  # nothing to compare with


def test_ties_go_to_the_frugal_layout_and_bad_input_is_refused():
    tie = [m(Layout(4, 1), 5.0, 100.0), m(Layout(1, 4), 5.0, 100.0), m(Layout(1, 4, True), 5.0, 100.0)]
    assert select_layout(tie, "throughput").layout == Layout(1, 4)
    runs_tie = [m(Layout(1, 4, False, 1, 4), 5.0, 100.0), m(Layout(1, 4), 5.0, 100.0)]
    assert select_layout(runs_tie, "throughput").layout == Layout(1, 4)
    with pytest.raises(ValueError, match="no layout measurements"):
        select_layout([], "balanced")
    with pytest.raises(ValueError, match="optimize must be one of"):
        select_layout(RECORDED, "fastest")
    with pytest.raises(EdgerunError, match="--optimize must be one of"):
        LayoutRequest(optimize="fastest")
    with pytest.raises(EdgerunError, match="--instances must be at least 1"):
        LayoutRequest(instances=0)


def test_candidates_fit_the_thread_budget():
    # One-thread runs share one session; spinning last, after the plain sessions it would slow down.
    assert candidate_layouts(2, LayoutRequest()) == [PLAIN, HYBRID, SHARED, SPIN]
    assert candidate_layouts(1, LayoutRequest()) == [Layout(1, 1)]
    eight = candidate_layouts(8, LayoutRequest())
    assert all(max(c.instances * c.threads, c.concurrency) == 8 for c in eight)
    assert len({(c.instances, c.threads) for c in eight}) == 4 and len(eight) == 6
    twelve = candidate_layouts(12, LayoutRequest())  # extremes kept, middle thinned
    assert Layout(1, 1, False, 1, 12) in twelve and Layout(1, 12, False, 1, 12) in twelve
    # What the operator fixes is taken literally; the rest fills the budget.
    assert candidate_layouts(4, LayoutRequest(instances=2)) == [Layout(2, 2)]
    assert candidate_layouts(4, LayoutRequest(threads=1)) == [Layout(1, 1, False, 1, n) for n in (1, 2, 4)]
    assert candidate_layouts(4, LayoutRequest(instances=3, threads=3)) == [Layout(3, 3)]
    assert candidate_layouts(2, LayoutRequest(runs=1)) == [PLAIN, PAIR, SPIN]
    assert candidate_layouts(2, LayoutRequest(instances=1, runs=2)) == [HYBRID]
    # A bundle that pins spinning is not second-guessed; an accelerator keeps one instance.
    assert candidate_layouts(2, LayoutRequest(spinning=False)) == [PLAIN, HYBRID, SHARED]
    assert candidate_layouts(2, LayoutRequest(), accelerator=True) == [PLAIN]
    assert candidate_layouts(2, LayoutRequest(max_batch=4), accelerator=True) == [Layout(1, 2, False, 4)]
    assert default_layout(2, LayoutRequest()) == PLAIN
    assert default_layout(2, LayoutRequest(threads=1)) == Layout(1, 1)


# ---- instances serving concurrently ----


class GatedInstance:
    """Doubles its input; ``meet`` makes runs wait for each other, proving they overlap."""

    batchable = True
    max_batch = None

    def __init__(self, meet: threading.Barrier | None = None):
        self.meet = meet
        self.seen: list[float] = []

    def run(self, feeds):
        if self.meet is not None:
            self.meet.wait(10)  # breaks (and fails the request) unless the other instance runs too
        self.seen.append(float(feeds["x"][0, 0]))
        return {"y": feeds["x"] * 2}


def fake_pool(instances, runs: int = 1) -> InstancePool:
    pool = InstancePool.__new__(InstancePool)  # no ORT session needed to test dispatch
    pool.instances = list(instances)
    pool.layout = Layout(len(instances), 1, False, 1, runs)
    pool._slots = run_slots(pool.instances, runs)
    pool.max_batch = None
    pool.run_count = 0
    pool.inputs, pool.outputs = [], []
    import queue

    pool._free = queue.SimpleQueue()
    for slot in pool._slots:
        pool._free.put(slot)
    pool._count_lock = threading.Lock()
    return pool


def serve_all(pool: InstancePool, values: list[float]) -> list[dict]:
    """Submit one request per value at once through a batcher; the results in request order."""

    async def scenario():
        batcher = Batcher(max_batch=1)
        results = await asyncio.gather(
            *(batcher.submit(pool, {"x": np.full((1, 2), v, np.float32)}, timeout_s=20) for v in values)
        )
        await batcher.close()
        return results

    return asyncio.run(scenario())


def test_instances_run_in_parallel_and_each_request_is_answered_once():
    meet = threading.Barrier(2)
    pool = fake_pool([GatedInstance(meet), GatedInstance(meet)])
    values = [float(i) for i in range(12)]
    results = serve_all(pool, values)
    for value, result in zip(values, results):
        np.testing.assert_array_equal(result["y"], np.full((1, 2), 2 * value, np.float32))
    seen = pool.instances[0].seen + pool.instances[1].seen
    assert sorted(seen) == values  # every request ran exactly once, on one instance
    assert pool.instances[0].seen and pool.instances[1].seen
    assert pool.run_count == len(values)


def test_one_instance_taking_two_runs_serves_two_requests_at_once():
    shared = GatedInstance(threading.Barrier(2))  # each run waits for a second one on the same session
    pool = fake_pool([shared], runs=2)
    assert pool.concurrency == 2
    values = [float(i) for i in range(8)]
    results = serve_all(pool, values)
    assert [float(r["y"][0, 0]) for r in results] == [2 * v for v in values]
    assert sorted(shared.seen) == values


def test_a_session_does_not_serialise_its_runs(tmp_path, cache_dir):
    """ONNX Runtime sessions take concurrent runs; only the layout decides how many."""
    served = load_model(build_classifier_bundle(tmp_path / "b"), LoadOptions(cache_dir=cache_dir, bench=False))
    session = served.session.instances[0]
    meet = threading.Barrier(2)
    real_run = session.session.run
    session.session.run = lambda names, feeds: (meet.wait(10), real_run(names, feeds))[1]
    x = np.full((1, 4), 0.5, np.float32)
    before = session.run_count
    with ThreadPoolExecutor(2) as workers:  # a BrokenBarrierError here means the runs took turns
        results = list(workers.map(lambda _: session.run({"x": x}), range(2)))
    for result in results:
        np.testing.assert_allclose(result[session.output_names[0]], classifier_reference(x), rtol=1e-5)
    assert session.run_count == before + 2


def test_a_single_instance_runs_one_request_at_a_time():
    active, peak = [0], [0]
    lock = threading.Lock()

    class Probe:
        batchable = False

        def run(self, feeds):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            threading.Event().wait(0.005)
            with lock:
                active[0] -= 1
            return {"y": feeds["x"]}

    async def scenario():
        batcher = Batcher()
        probe = Probe()
        results = await asyncio.gather(*(batcher.submit(probe, {"x": np.ones((1, 1))}) for _ in range(6)))
        await batcher.close()
        return results

    assert len(asyncio.run(scenario())) == 6
    assert peak[0] == 1


def test_queue_bound_in_bytes_is_503():
    gate = threading.Event()

    class Held:
        batchable = False

        def run(self, feeds):
            gate.wait(10)
            return {"y": feeds["x"]}

    session = Held()

    async def scenario():
        batcher = Batcher(max_queue=100, max_queue_bytes=1000)
        big = {"x": np.zeros((1, 100), np.float32)}  # 400 bytes
        running = asyncio.ensure_future(batcher.submit(session, big))
        while batcher.running == 0:
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(session, big)) for _ in range(2)]  # 800 bytes waiting
        await asyncio.sleep(0)
        assert batcher.queued_bytes == 800
        with pytest.raises(OverloadedError, match="over the 1000 byte limit") as refused:
            await batcher.submit(session, big)
        assert refused.value.retry_after_s == 1
        small = asyncio.ensure_future(batcher.submit(session, {"x": np.zeros((1, 10), np.float32)}))  # fits
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(running, *queued, small)
        await batcher.close()
        return results

    assert len(asyncio.run(scenario())) == 4


def test_server_answers_503_with_retry_after_when_the_queue_bytes_are_full(bundles, load_options):
    gate = threading.Event()
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}]}
    with TestClient(create_app(repo, ServerConfig(max_queue_bytes=20, timeout_s=10))) as client:
        served = repo.get("clf")
        real_run = served.session.run
        served.session.run = lambda feeds: (gate.wait(10), real_run(feeds))[1]
        batcher = client.app.state.edgerun.batcher
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v2/models/clf/infer", json=body)
            while batcher.running == 0:
                gate.wait(0.01)
            second = pool.submit(client.post, "/v2/models/clf/infer", json=body)  # 16 bytes queued
            while len(batcher._pending) == 0:
                gate.wait(0.01)
            rejected = client.post("/v2/models/clf/infer", json=body)
            gate.set()
            assert rejected.status_code == 503 and rejected.headers["Retry-After"] == "1"
            assert "--max-queue-bytes" in rejected.json()["error"]
            assert first.result().status_code == 200 and second.result().status_code == 200


# ---- loading: instances from one copy of the model, overrides, cache ----


def test_instances_share_one_verified_model_and_serve_correct_rows(tmp_path, cache_dir, monkeypatch):
    bundle = build_classifier_bundle(tmp_path / "b")
    reads = []
    real_read = Bundle.verified_file
    monkeypatch.setattr(Bundle, "verified_file", lambda self, rel: (reads.append(rel), real_read(self, rel))[1])
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, instances=3, threads=1))
    pool = served.session
    assert isinstance(pool, InstancePool) and len(pool.instances) == 3
    # Read once for the golden-checked session and once for all the new instances.
    assert reads.count("model.onnx") == 2
    assert {i.session.get_session_options().intra_op_num_threads for i in pool.instances} == {1}
    layout = served.parameters["layout"]
    assert (layout["instances"], layout["threads"], layout["source"]) == (3, 1, "--instances/--threads")

    repo = ModelRepository(LoadOptions(cache_dir=cache_dir, bench=False))
    repo.add(served)
    rows = [np.full((1, 4), i / 10, np.float32) for i in range(12)]
    with TestClient(create_app(repo)) as client:
        responses = post_concurrently(client, rows)
        for x, response in zip(rows, responses):
            assert response.status_code == 200, response.text
            got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(1, 3)
            np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5)
        assert pool.run_count == len(rows)  # each request ran once, through the pool
        meta = client.get("/v2/models/clf").json()["parameters"]["layout"]
        assert meta["label"] == "3x1"
        assert 'layout="3x1"' in client.get("/metrics").text


def fake_measure(calls):
    """Recorded numbers in which 1x1 runs 2 has the best throughput, the spinning session the best
    latency and 1x2 runs 2 the best throughput within the balanced margin."""
    numbers = {
        (1, 2, True, 1): (4.0, 300.0),
        (1, 2, False, 1): (5.0, 250.0),
        (1, 2, False, 2): (5.1, 380.0),
        (1, 1, False, 2): (7.0, 400.0),
    }

    def measure(instances, layout, single, batch_feeds=None, **kwargs):
        calls.append(layout)
        key = (layout.instances, layout.threads, layout.spinning, layout.runs)
        p50, tput = numbers.get(key, (4.5, 100.0 * layout.concurrency))
        return LayoutMeasurement(layout, p50, tput)

    return measure


def budget_of(n: int):
    return lambda override=None, **kwargs: ThreadChoice(override or n, "--threads" if override else "test", n, None)


@pytest.fixture()
def no_timing(monkeypatch):
    calls: list[Layout] = []
    monkeypatch.setattr(layout_module, "measure_layout", fake_measure(calls))
    monkeypatch.setattr(
        loader_module,
        "self_benchmark",
        lambda session, max_batch, golden, budget_s=1.0, timer=None: {
            "batch_1": {"batch": 1, "p50_ms": 1.0, "throughput_per_s": 1.0}
        },
    )
    return calls


def test_decision_is_cached_per_thread_budget_and_reselected_per_optimize(tmp_path, cache_dir, monkeypatch, no_timing):
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, optimize="throughput"))
    assert no_timing == [PLAIN, HYBRID, SHARED, SPIN] * 2  # two rounds: three sessions fit the bound
    layout = served.parameters["layout"]
    assert layout["label"] == "1x1 runs 2" and layout["source"] == "self-benchmark"
    assert set(layout["measurements"]) == {"1x2 spinning", "1x2", "1x2 runs 2", "1x1 runs 2"}
    assert len(served.session.instances) == 1 and served.session.concurrency == 2  # one copy of the model

    no_timing.clear()
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, optimize="latency"))
    assert no_timing == []  # same bundle, providers, CPU and budget: nothing measured again
    assert served.parameters["layout"]["label"] == "1x2 spinning"
    assert served.parameters["layout"]["source"] == "cached self-benchmark"
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, optimize="throughput"))
    assert no_timing == [] and served.parameters["layout"]["label"] == "1x1 runs 2"  # --no-bench reuses it
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, optimize="balanced"))
    assert no_timing == [] and served.parameters["layout"]["label"] == "1x2 runs 2"

    monkeypatch.setattr(loader_module, "choose_threads", budget_of(4))
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir))
    assert no_timing and all(max(c.instances * c.threads, c.concurrency) == 4 for c in no_timing)  # measured anew
    assert served.parameters["layout"]["thread_budget"] == 4


def test_layouts_are_measured_in_rounds_and_keep_their_best(tmp_path, cache_dir, monkeypatch, no_timing):
    """A burst of load elsewhere during one round must not decide the choice alone."""
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    seen: dict[Layout, int] = {}

    def measure(instances, layout, single, batch_feeds=None, **kwargs):
        seen[layout] = seen.get(layout, 0) + 1
        assert len({id(i) for i in instances}) == layout.instances  # runs share their instance
        dip = layout == HYBRID and seen[layout] == 1  # the machine was busy during its first window
        return LayoutMeasurement(layout, 5.0 if layout.threads == 2 else 7.0, 100.0 if dip else 300.0)

    monkeypatch.setattr(layout_module, "measure_layout", measure)
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir))
    assert seen == {PLAIN: 2, HYBRID: 2, SHARED: 2, SPIN: 2}
    recorded = served.parameters["layout"]["measurements"]
    assert recorded["1x2 runs 2"]["throughput_per_s"] == 300.0
    assert served.parameters["layout"]["label"] == "1x2"  # ties at 300/s go to the frugal layout


def test_served_sessions_are_created_after_the_self_benchmark(tmp_path, cache_dir, monkeypatch, no_timing):
    """The measured sessions' memory arenas keep the size of the benchmark's batches: serving uses new ones."""
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    seeds, made = [], []
    real_seed, real_make = loader_module.create_model_session, layout_module.create_instance
    monkeypatch.setattr(
        loader_module, "create_model_session", lambda *a, **k: seeds.append(real_seed(*a, **k)) or seeds[-1]
    )
    monkeypatch.setattr(layout_module, "create_instance", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir))
    assert served.parameters["layout"]["label"] == "1x2 runs 2"  # the 2-thread setting the seed has
    assert served.session.instances == [made[-1]] and made[-1] is not seeds[0]
    made.clear()
    served = load_model(bundle, LoadOptions(cache_dir=tmp_path / "other", bench=False, threads=2))
    assert made == [] and served.session.instances == [seeds[-1]]  # nothing measured: the checked session serves


def test_overrides_fix_the_layout_without_measuring(tmp_path, cache_dir, monkeypatch, no_timing):
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, instances=2, threads=1))
    assert no_timing == []
    assert served.parameters["layout"]["label"] == "2x1"
    assert served.parameters["layout"]["source"] == "--instances/--threads"
    # Fixing one dimension leaves the other to the benchmark, within the budget.
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, threads=1))
    assert no_timing == [Layout(1, 1), SHARED] * 2 and served.parameters["layout"]["threads"] == 1
    assert served.parameters["layout"]["source"] == "self-benchmark within --instances/--threads"
    # Without a benchmark, the default is one instance using the budget.
    served = load_model(bundle, LoadOptions(cache_dir=tmp_path / "fresh", bench=False))
    assert served.parameters["layout"]["label"] == "1x2" and len(served.session.instances) == 1
    assert served.parameters["layout"]["source"] == "default (no self-benchmark)"


def test_serve_flags_reach_the_layout(tmp_path, cache_dir, monkeypatch):
    import edgerun.server as server_module
    from edgerun.cli import main

    bundle = build_classifier_bundle(tmp_path / "b")
    started = {}
    monkeypatch.setattr(server_module, "serve", serve_after_load(started))
    result = CliRunner().invoke(
        main,
        [
            "serve",
            str(bundle),
            "--no-bench",
            "--cache-dir",
            str(cache_dir),
            "--instances",
            "2",
            "--threads",
            "1",
            "--runs",
            "2",
            "--optimize",
            "throughput",
            "--max-queue-bytes",
            "4096",
        ],
    )
    assert result.exit_code == 0, result.output
    app = started["app"]
    layout = app.state.repo.get("clf").parameters["layout"]
    assert (layout["instances"], layout["threads"], layout["runs"], layout["optimize"]) == (2, 1, 2, "throughput")
    assert app.state.repo.get("clf").session.concurrency == 4
    assert app.state.config.max_queue_bytes == 4096
    bad = CliRunner().invoke(main, ["serve", str(bundle), "--optimize", "fastest"])
    assert bad.exit_code == 2 and "fastest" in bad.output


def test_a_layout_failing_its_golden_check_falls_back_to_the_checked_session(tmp_path, cache_dir, monkeypatch):
    from edgerun.golden import GoldenResult

    bundle = build_classifier_bundle(tmp_path / "b")
    real_check = loader_module.check_golden
    checked = []

    def check(session, root):
        checked.append(session.threads)
        if session.threads == 1 and len(checked) > 1:  # the new 1-thread instances drift
            return GoldenResult(False, "drift")
        return real_check(session, root)

    monkeypatch.setattr(loader_module, "check_golden", check)
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    # Two 1-thread instances next to the 2-thread session that passed: a new setting, checked again.
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, instances=2))
    assert checked == [2, 1]
    assert len(served.session.instances) == 1 and served.session.instances[0].threads == 2
    assert served.parameters["layout"]["source"].startswith("fallback")


def test_an_accelerator_keeps_one_instance_per_device(tmp_path, cache_dir, no_timing):
    bundle = build_classifier_bundle(tmp_path / "b")
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, threads=4))
    session = served.session.instances[0]

    def plan(providers):
        session.providers = providers
        return layout_module.plan_layout(
            session,
            bundle=served.bundle,
            providers=[],
            budget=4,
            request=LayoutRequest(),
            bench=True,
            cache_dir=tmp_path / f"cache-{providers[0]}",
            bundle_id=served.bundle.sha256,
        )

    pool, decision = plan(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert no_timing == [] and pool.instances == [session] and decision.layout == Layout(1, 4)
    pool, decision = plan(["CPUExecutionProvider"])  # the same session on a CPU: layouts are measured
    assert len(no_timing) == 5 and {(c.instances, c.threads) for c in no_timing} == {(1, 4), (2, 2), (1, 1)}


def test_the_variant_decision_is_also_keyed_by_threads():
    from edgerun.bench import decision_key

    assert decision_key("b" * 64, [CPU_NAME], "cpu", threads=2) == decision_key("b" * 64, [CPU_NAME], "cpu", threads=2)
    assert decision_key("b" * 64, [CPU_NAME], "cpu", threads=2) != decision_key("b" * 64, [CPU_NAME], "cpu", threads=1)


CPU_NAME = "CPUExecutionProvider"


def test_nothing_is_timed_before_the_caller_says_so_and_nothing_waits_on_a_cached_decision(
    tmp_path, cache_dir, monkeypatch, no_timing
):
    """``LoadOptions.before_timing`` runs before the self-benchmark and before the first layout
    measurement (``edgerun serve`` waits there for its web stack's imports); a restart that finds both
    cached measures nothing and does not wait."""
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    timed_before_the_gate: list[int] = []
    gate: list[str] = []
    fake = layout_module.measure_layout

    def measure(*args, **kwargs):
        if gate != ["open", "open"]:  # the self-benchmark's call, then the layout step's own
            timed_before_the_gate.append(len(gate))
        return fake(*args, **kwargs)

    monkeypatch.setattr(layout_module, "measure_layout", measure)
    options = LoadOptions(cache_dir=cache_dir, bench=True, before_timing=lambda: gate.append("open"))
    load_model(bundle, options)
    assert gate and not timed_before_the_gate and no_timing  # measured, and only after the gate
    gate.clear()
    measured = len(no_timing)
    served = load_model(bundle, dataclasses.replace(options, before_timing=lambda: gate.append("waited")))
    assert gate == [] and len(no_timing) == measured  # both cached: nothing timed, nothing waited for
    assert served.parameters["benchmark"]["cached"] is True
    assert served.parameters["layout"]["source"] == "cached self-benchmark"


def test_a_restart_makes_its_first_session_in_the_cached_layout_and_serves_it(
    tmp_path, cache_dir, monkeypatch, no_timing
):
    """With the layout measurements cached (and the self-benchmark's numbers, or no self-benchmark),
    the first session is made with the chosen layout's threads: it is golden-checked once and served as
    is, with no second session for the layout step. A session the self-benchmark will measure is made
    with the thread budget its numbers are keyed by."""
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    made: list[int] = []
    checked: list[int] = []
    make, check = loader_module.create_model_session, loader_module.check_golden

    def counted_make(model, manifest, variant, providers, threads, cache_dir):
        made.append(threads)
        return make(model, manifest, variant, providers, threads, cache_dir)

    def counted_check(session, golden):
        checked.append(session.threads)
        return check(session, golden)

    monkeypatch.setattr(loader_module, "create_model_session", counted_make)
    monkeypatch.setattr(loader_module, "check_golden", counted_check)
    options = LoadOptions(cache_dir=cache_dir, optimize="throughput")
    load_model(bundle, options)  # measures: 1x1 runs 2 wins on throughput
    assert made[0] == 2 and checked[0] == 2  # the self-benchmark measured the 2-thread session
    for restart in (options, dataclasses.replace(options, bench=False)):
        made.clear()
        checked.clear()
        served = load_model(bundle, restart)
        assert served.parameters["layout"]["label"] == "1x1 runs 2"
        assert made == [1] and checked == [1]  # one session, one golden check
        assert [instance.threads for instance in served.session.instances] == [1]
    made.clear()
    served = load_model(bundle, dataclasses.replace(options, remeasure=True))  # edgerun bench: measured again
    assert made[0] == 2 and "cached" not in served.parameters["benchmark"]


def test_a_load_that_measured_nothing_runs_no_full_collection(tmp_path, cache_dir, monkeypatch, no_timing):
    """The full garbage collection after a load is for the sessions a self-benchmark made and dropped;
    a restart that found every number cached made none, and its main thread is importing meanwhile."""
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    collections: list[int] = []
    monkeypatch.setattr(loader_module.gc, "collect", lambda *args: collections.append(1) or 0)
    options = LoadOptions(cache_dir=cache_dir)
    load_model(bundle, options)
    assert collections == [1]  # measured: the benchmark's sessions are garbage
    load_model(bundle, options)
    load_model(bundle, dataclasses.replace(options, bench=False))
    assert collections == [1]


def test_damaged_cached_layout_measurements_are_measured_again(tmp_path, cache_dir, monkeypatch, no_timing):
    bundle = build_classifier_bundle(tmp_path / "b")
    monkeypatch.setattr(loader_module, "choose_threads", budget_of(2))
    load_model(bundle, LoadOptions(cache_dir=cache_dir))
    (record,) = (cache_dir / "decisions").glob("layout-*.json")
    record.write_text(json.dumps({"measurements": [{"layout": {"instances": "many"}}]}))
    measured = len(no_timing)
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir))
    assert len(no_timing) > measured and served.parameters["layout"]["source"] == "self-benchmark"
    assert json.loads(record.read_text())["measurements"][0]["layout"]["instances"] >= 1  # rewritten
