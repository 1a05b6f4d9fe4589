"""The start-up timeline: every phase of ``edgerun serve`` is named with its duration at debug level."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
from server_process import start_server, stop_server

from edgerun.bundle import open_bundle
from edgerun.startup import PHASES, StartupLoad, Timeline


def test_timeline_adds_up_repeated_phases_and_keeps_their_order():
    timeline = Timeline()
    timeline.add("session", 0.010)
    timeline.add("verify", 0.002)
    timeline.add("session", 0.030)  # a second variant tried
    assert timeline.phases["session"] == 0.040
    summary = timeline.summary()
    assert summary.index("verify 2 ms") < summary.index("session 40 ms")
    assert "ready" in summary


def test_timeline_phase_records_even_when_the_phase_fails():
    timeline = Timeline()
    try:
        with timeline.phase("verify"):
            raise ValueError("refused")
    except ValueError:
        pass
    assert "verify" in timeline.phases


def test_serve_logs_each_phase_at_debug_level(bundles, cache_dir):
    proc, _ = start_server([str(bundles["classifier"])], cache_dir, log_level="debug")
    stop_server(proc)
    lines = [line for line in proc.stderr.read().splitlines() if "start-up:" in line]
    assert len(lines) == 1, lines
    for name in ("imports", "verify", "session", "golden", "layout", "app", "bind"):
        assert re.search(rf"\b{name} \d+ ms \(at \d+-\d+\)", lines[0]), (name, lines[0])
    assert re.search(r"ready \d+ ms after edgerun started", lines[0])
    assert set(PHASES) >= {"imports", "verify", "session", "golden", "layout", "app", "bind"}


def test_serve_at_info_level_prints_no_timeline(bundles, cache_dir):
    proc, _ = start_server([str(bundles["classifier"])], cache_dir, log_level="info")
    stop_server(proc)
    assert "start-up:" not in proc.stderr.read()


def test_verification_hands_out_the_bytes_it_checked_once(bundles):
    """The selected model is read and hashed by the verification, then handed to the session as is."""
    bundle = open_bundle(bundles["classifier"])
    path = bundle.manifest.model.path
    first = bundle.verified_file(path)
    (bundle.root / path).write_bytes(b"replaced after the check")  # never read in its place
    try:
        assert first.sha256 == bundle.manifest.files[path]
        assert first.data != b"replaced after the check"
        assert "does not match its checksum" in _refusal(bundle, path)  # a second read checks again
    finally:
        (bundle.root / path).write_bytes(first.data)


def _refusal(bundle, path: str) -> str:
    try:
        bundle.verified_file(path)
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return str(exc)
    return ""


def test_ready_waits_for_the_bundles_the_server_starts_with(bundles, load_options):
    """Served behind a bound socket while its bundles load: live at once, ready (and the models) only
    once every starting bundle is loaded, even when one of them already serves."""
    from fastapi.testclient import TestClient

    from edgerun.reload import ModelRepository
    from edgerun.server import create_app

    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    repo.initial_load.clear()  # as StartupLoad leaves it while the other bundles load
    with TestClient(create_app(repo)) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        missing = client.get("/v2/models/pair")
        assert missing.status_code == 404 and "still loading" in missing.json()["error"]
        repo.initial_load.set()
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert "available: ['clf']" in client.get("/v2/models/pair").json()["error"]


def test_startup_load_hands_over_the_repository_then_loads(bundles, load_options):
    from edgerun.reload import ModelRepository

    loaded = threading.Event()
    release = threading.Event()

    def load(repo):
        release.wait(10)
        repo.load(bundles["classifier"])
        loaded.set()

    loading = StartupLoad(lambda: ModelRepository(load_options), load)
    loading.start()
    repo = loading.wait_repository()  # handed over before its load has run
    assert not repo.initial_load.is_set() and not repo.models and not loaded.is_set()
    release.set()
    loading.join()
    assert loading.finished.is_set() and loading.error is None
    assert repo.initial_load.is_set() and set(repo.models) == {"clf"}
    repo.close()


def test_startup_load_failures_are_kept_for_the_main_thread(tmp_path, load_options):
    from edgerun.errors import BundleError
    from edgerun.reload import ModelRepository

    def unreadable_key():
        raise BundleError("--trusted-key 'k' cannot be read")

    early = StartupLoad(unreadable_key, lambda repo: None)
    early.start()
    with pytest.raises(BundleError, match="trusted-key"):
        early.wait_repository()
    assert early.finished.is_set()

    late = StartupLoad(lambda: ModelRepository(load_options), lambda repo: repo.load(tmp_path / "missing"))
    late.start()
    repo = late.wait_repository()
    late.join()
    assert isinstance(late.error, BundleError) and "does not exist" in str(late.error)
    assert not repo.initial_load.is_set()  # never ready on a failed start


def test_the_directory_watcher_starts_after_the_initial_load(tmp_path, monkeypatch, load_options):
    """The watcher compares against the files each load saw: it must not look before those loads ran."""
    import asyncio

    import edgerun.server
    from edgerun.reload import ModelRepository

    calls = []

    async def watch(repo, directory, interval_s):
        calls.append(directory)

    monkeypatch.setattr(edgerun.server, "watch_directory", watch)
    repo = ModelRepository(load_options)
    repo.initial_load.clear()

    async def scenario():
        task = asyncio.create_task(edgerun.server._watch_after_initial_load(repo, tmp_path, 1.0))
        await asyncio.sleep(0.1)
        assert calls == []
        repo.initial_load.set()
        await asyncio.wait_for(task, 5)
        assert calls == [tmp_path]

    asyncio.run(scenario())


def test_serve_stops_and_reports_a_bundle_that_fails_while_the_socket_is_bound(bundles, cache_dir, tmp_path):
    """One good bundle, one refused: the command ends with the refusal (exit 2, one line), no traceback,
    and nothing is left serving."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ nope")
    proc, _ = start_server([str(bundles["classifier"]), str(broken)], cache_dir, wait=False)
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert "not valid JSON" in stderr and "Traceback" not in stderr


def test_the_served_openapi_document_is_the_in_process_one(bundles, cache_dir, load_options):
    """``edgerun serve`` keeps FastAPI from importing pydantic.v1 (start-up time), defers the build of
    FastAPI's OpenAPI models to the first document and builds its app while the bundle loads: the
    document it publishes is the one the same app builds in-process."""
    import httpx

    from edgerun.reload import ModelRepository
    from edgerun.server import create_app

    proc, url = start_server([str(bundles["classifier"])], cache_dir)
    try:
        served = httpx.get(f"{url}/openapi.json", timeout=10).json()
    finally:
        stop_server(proc)
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    assert served == create_app(repo).openapi()
    repo.close()


def test_an_abandoned_startup_refuses_the_loads_to_come_and_releases_the_repository(bundles, load_options):
    """The main thread failed (an import error, Ctrl-C) while the bundles load: the next load is refused at
    once instead of running for nobody, and the repository is closed on the loading thread."""
    from edgerun.errors import BundleError
    from edgerun.reload import ModelRepository

    release = threading.Event()

    def load(repo):
        release.wait(10)
        repo.load(bundles["classifier"])

    loading = StartupLoad(lambda: ModelRepository(load_options), load)
    loading.start()
    repo = loading.wait_repository()
    loading.abandon()
    release.set()
    loading.join()
    assert isinstance(loading.error, BundleError) and "shutting down" in str(loading.error)
    assert not repo.models and not repo.initial_load.is_set()
    with pytest.raises(BundleError, match="shutting down"):
        repo.load(bundles["classifier"])


def test_files_read_ahead_are_the_bytes_verified_and_loaded(bundles, tmp_path, load_options):
    """``edgerun serve`` reads and hashes a bundle directory's files while it imports: the verification
    checks those bytes against the manifest and hands them on, and the watcher's fingerprint is the one
    from before the read, so a file replaced afterwards shows as a change."""
    import shutil

    from edgerun.bundle import open_bundle
    from edgerun.prefetch import BundlePrefetch, fingerprint
    from edgerun.reload import ModelRepository

    bundle = tmp_path / "b"
    shutil.copytree(bundles["classifier"], bundle)
    model = open_bundle(bundle).manifest.model.path
    original = (bundle / model).read_bytes()
    ahead = BundlePrefetch(bundle).start()
    before = ahead.take_fingerprint()
    (bundle / model).write_bytes(b"replaced after the read ahead")  # never read in its place
    repo = ModelRepository(load_options)
    served = repo.load(bundle, prefetched=ahead)
    assert served.session is not None and repo.tried(bundle) == before != fingerprint(bundle)
    repo.close()
    (bundle / model).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # damaged before the read
    with pytest.raises(Exception, match="does not match its checksum"):
        open_bundle(bundle, prefetched=BundlePrefetch(bundle).start())


def test_read_ahead_skips_what_it_must_not_read(bundles, tmp_path):
    """A FIFO never blocks it and files over its size bound are left to the verification."""
    import os
    import shutil

    from edgerun.bundle import open_bundle
    from edgerun.prefetch import BundlePrefetch

    bundle = tmp_path / "b"
    shutil.copytree(bundles["classifier"], bundle)
    os.mkfifo(bundle / "pipe")
    small = BundlePrefetch(bundle, max_bytes=64).start()
    assert small.take("pipe") is None and small.take("manifest.json") is None  # the manifest is over 64 bytes
    assert open_bundle(bundle, prefetched=small).manifest.name == "clf"  # read by the verification instead


@pytest.mark.parametrize("self_benchmark", [False, True])
def test_the_loading_thread_imports_alone_first_and_times_nothing_before_the_web_stack_is_imported(
    self_benchmark, bundles, cache_dir, monkeypatch
):
    """The main thread starts importing the web stack only once the loading thread has made the
    repository (its imports done): the two would otherwise take turns for the GIL. The self-benchmark
    waits until those imports are done, so its timings have the cores to themselves."""
    from click.testing import CliRunner
    from runtime_fixtures import serve_after_load

    import edgerun.loader
    import edgerun.server
    import edgerun.startup
    from edgerun.cli import main

    events: list[str] = []
    main_thread = threading.get_ident()
    timeline_phase = edgerun.startup.phase

    @contextlib.contextmanager
    def phase(name):
        where = "main" if threading.get_ident() == main_thread else "load"
        events.append(f"{where} {name}")
        with timeline_phase(name):
            yield
            if where == "main" and name == "imports":
                time.sleep(1.0)  # the modules are imported already here: a cold import takes this long
        events.append(f"{where} {name} done")

    handed_over = StartupLoad.wait_repository

    def wait_repository(self):
        repo = handed_over(self)
        events.append("repository made")
        return repo

    monkeypatch.setattr(edgerun.startup, "phase", phase)
    monkeypatch.setattr(edgerun.loader, "phase", phase)
    monkeypatch.setattr(StartupLoad, "wait_repository", wait_repository)
    monkeypatch.setattr(edgerun.server, "serve", serve_after_load())
    args = ["serve", str(bundles["classifier"]), "--cache-dir", str(cache_dir)]
    result = CliRunner().invoke(main, args if self_benchmark else [*args, "--no-bench"])
    assert result.exit_code == 0, result.output
    assert events.index("repository made") < events.index("main imports"), events
    if self_benchmark:
        assert events.index("main imports done") < events.index("load bench"), events
    else:
        assert "load bench" not in events


def test_serve_gives_numpy_blas_one_thread(bundles, cache_dir, monkeypatch):
    from click.testing import CliRunner
    from runtime_fixtures import serve_after_load

    import edgerun.server
    from edgerun.cli import main

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(edgerun.server, "serve", serve_after_load())
    args = ["serve", str(bundles["classifier"]), "--no-bench", "--cache-dir", str(cache_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_models_defined_while_builds_are_deferred_are_built_on_first_use():
    from pydantic import BaseModel

    from edgerun.startup import deferred_model_builds

    with deferred_model_builds():

        class Deferred(BaseModel):
            size: int

    class Eager(BaseModel):
        size: int

    assert not Deferred.__pydantic_complete__ and Eager.__pydantic_complete__
    assert Deferred.model_validate({"size": "3"}).size == 3  # built now, validating as usual
    assert Deferred.__pydantic_complete__
    with pytest.raises(RuntimeError), deferred_model_builds():
        raise RuntimeError("an import failed")

    class After(BaseModel):
        size: int

    assert After.__pydantic_complete__  # the default is back, also after a failure


def test_fastapis_own_models_wait_for_the_openapi_document(tmp_path):
    """``edgerun serve`` imports FastAPI this way: its OpenAPI models are not built until the document is
    asked for, and the document is the one FastAPI builds when imported as usual."""
    code = textwrap.dedent(
        """
        import json, sys
        from edgerun.startup import deferred_model_builds
        with deferred_model_builds():
            import fastapi
        import fastapi.openapi.models as models
        from fastapi import FastAPI
        deferred = not models.Info.__pydantic_complete__ and not models.OpenAPI.__pydantic_complete__
        app = FastAPI(title="t")

        @app.get("/items/{name}")
        async def item(name: str, limit: int = 3) -> dict:
            return {}

        print(json.dumps({"deferred": deferred, "document": app.openapi()}))
        """
    )
    plain = code.replace("with deferred_model_builds():\n    import fastapi", "import fastapi")
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True).stdout)
        for c in (code, plain)
    ]
    assert runs[0]["deferred"] is True and runs[1]["deferred"] is False
    assert runs[0]["document"] == runs[1]["document"]


def test_without_the_pydantic_default_nothing_is_deferred(monkeypatch):
    from pydantic import BaseModel
    from pydantic._internal import _config

    from edgerun.startup import deferred_model_builds

    # Another shape than the dict it is in the pydantic releases this knows (still readable by pydantic).
    monkeypatch.setattr(_config, "config_defaults", types.MappingProxyType(dict(_config.config_defaults)))
    with deferred_model_builds():

        class Built(BaseModel):
            size: int

    assert Built.__pydantic_complete__


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="per-thread CPU affinity on 2+ CPUs (Linux): with one there is no core to spare",
)
def test_the_load_leaves_the_main_thread_a_core_while_it_imports(bundles, cache_dir, monkeypatch):
    """The golden runs (the loading thread and ONNX Runtime's pool) keep off one core while the main
    thread imports; once those imports are done, and before ready, every thread has every core again."""
    from click.testing import CliRunner
    from runtime_fixtures import serve_after_load

    import edgerun.loader
    import edgerun.server
    import edgerun.startup
    from edgerun.cli import main

    allowed = frozenset(os.sched_getaffinity(0))
    during_load: list[frozenset[int]] = []
    check = edgerun.loader.check_golden
    release = threading.Event()

    def checked(session, golden):
        during_load.append(frozenset(os.sched_getaffinity(0)))
        return check(session, golden)

    timeline_phase = edgerun.startup.phase

    @contextlib.contextmanager
    def phase(name):
        with timeline_phase(name):
            yield
            if name == "imports" and threading.current_thread() is threading.main_thread():
                release.wait(5)  # the main thread imports until the golden check has run

    def golden_then_release(session, golden):
        result = checked(session, golden)
        release.set()
        return result

    monkeypatch.setattr(edgerun.loader, "check_golden", golden_then_release)
    monkeypatch.setattr(edgerun.startup, "phase", phase)
    monkeypatch.setattr(edgerun.server, "serve", serve_after_load())
    args = ["serve", str(bundles["classifier"]), "--no-bench", "--cache-dir", str(cache_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert during_load and len(during_load[0]) == len(allowed) - 1
    assert {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")} == {allowed}
