"""Churn without leftovers: kept versions and rollback, extracted copies, the directory watcher,
one TensorRT build per model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from runtime_fixtures import build_classifier_bundle
from server_process import start_server, stop_server

import edgerun.session as session_module
import edgerun.tensorrt as tensorrt_module
from edgerun.bundle import open_bundle
from edgerun.loader import LoadOptions, load_model
from edgerun.manifest import ProviderSpec
from edgerun.reload import ModelRepository, VersionStore, bundle_entries
from edgerun.server import ServerConfig, create_app

TRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
WAIT_S = 60  # upper bound only; every wait returns as soon as its condition holds


def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture()
def versions(tmp_path):
    """Two versions of model 'clf' as archives: A (with golden data) and B (without)."""
    a = build_classifier_bundle(tmp_path / "src" / "a", archive=True).with_suffix(".tar.gz")
    b = build_classifier_bundle(tmp_path / "src" / "b", golden=False, archive=True).with_suffix(".tar.gz")
    return {"A": a, "B": b}


def extractions(tmpdir: Path) -> list[Path]:
    return sorted(p for p in tmpdir.iterdir() if p.name.startswith("edgerun-"))


# ---- version store ----


def test_rollback_after_a_b_a_b_restores_a_and_keeps_every_copy_in_history(tmp_path, versions, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cache = tmp_path / "cache"
    store = VersionStore(cache)
    repo = ModelRepository(LoadOptions(cache_dir=cache, bench=False, threads=1), store=store)
    seen = [repo.load(versions[v]).version for v in "ABAB"]
    a, b = seen[0], seen[1]
    assert a != b and seen == [a, b, a, b]
    assert [h["version"] for h in store.history("clf")] == [a, b, a, b]
    assert extractions(tmp_path) and len(extractions(tmp_path)) == 1  # only the served copy
    restored = store.rollback("clf")
    assert restored["version"] == a and Path(restored["path"], "manifest.json").is_file()
    assert repo.load(restored["path"]).version == a  # a kept copy is a directory: loads as it is
    restored = store.rollback("clf")  # history was A,B,A -> previous distinct is B
    assert restored["version"] == b and repo.load(restored["path"]).version == b
    repo.close()
    assert extractions(tmp_path) == []


def test_old_copies_go_only_when_no_history_entry_names_them(tmp_path):
    cache = tmp_path / "cache"
    store = VersionStore(cache, keep=2)
    repo = ModelRepository(LoadOptions(cache_dir=cache, bench=False, threads=1), store=store)
    bundles = [build_classifier_bundle(tmp_path / f"v{i}", name="clf", golden=i % 2 == 0) for i in range(2)]
    third = build_classifier_bundle(tmp_path / "v2", name="clf", golden=True, serving={"x": 1})
    v0, v1 = (repo.load(b).version for b in bundles)
    v2 = repo.load(third).version
    kept = {p.name for p in (cache / "models" / "clf" / "any").iterdir() if p.is_dir()}
    assert kept == {v1, v2}  # v0 left the history (two distinct versions kept), so its copy went
    assert [h["version"] for h in store.history("clf")] == [v1, v2]
    assert v0 not in kept


def test_history_is_kept_per_target(tmp_path):
    cache = tmp_path / "cache"
    store = VersionStore(cache)
    repo = ModelRepository(LoadOptions(cache_dir=cache, bench=False, threads=1), store=store)
    x86 = [build_classifier_bundle(tmp_path / f"x{i}", golden=i == 0, target={"name": "x86"}) for i in range(2)]
    jetson = build_classifier_bundle(tmp_path / "j", target={"name": "jetson"})
    x86_versions = [repo.load(b).version for b in x86]
    repo.load(jetson)
    assert store.targets("clf") == ["jetson", "x86"]
    with pytest.raises(Exception, match="several targets"):
        store.rollback("clf")
    assert store.rollback("clf", "x86")["version"] == x86_versions[0]  # never the jetson bundle
    with pytest.raises(Exception, match="nothing to roll back"):
        store.rollback("clf", "jetson")


def test_serving_a_bundle_again_does_not_copy_it_again(tmp_path):
    cache = tmp_path / "cache"
    source = build_classifier_bundle(tmp_path / "b")
    for _ in range(3):  # three starts of `edgerun serve b`
        repo = ModelRepository(LoadOptions(cache_dir=cache, bench=False, threads=1), store=VersionStore(cache))
        version = repo.load(source).version
        repo.close()
    copies = [p for p in (cache / "models" / "clf" / "any").iterdir() if p.is_dir()]
    assert [p.name for p in copies] == [version]
    # Hard links: the kept copy takes no space of its own on the same file system.
    assert os.path.samefile(copies[0] / "model.onnx", source / "model.onnx")


# ---- extracted copies ----


def test_refused_archives_leave_nothing_and_unload_removes_the_copy(tmp_path, versions, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    repo = ModelRepository(LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1))
    repo.load(versions["A"])
    with pytest.raises(Exception, match="not 'other'"):
        repo.load(versions["B"], expected_name="other")
    assert len(extractions(tmp_path)) == 1
    repo.unload("clf")
    assert extractions(tmp_path) == []
    served = load_model(versions["A"], LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1))
    served.close()
    assert extractions(tmp_path) == []


def test_truncated_archive_is_one_bundle_error(tmp_path, versions):
    truncated = tmp_path / "cut.tar.gz"
    data = versions["A"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        open_bundle(truncated)
    assert type(info.value).__name__ == "BundleError" and "truncated" in str(info.value)
    from click.testing import CliRunner

    from edgerun.cli import main

    result = CliRunner().invoke(main, ["info", str(truncated)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_archives_with_too_many_members_are_refused(tmp_path):
    import io
    import tarfile

    from edgerun.bundle import extract_archive
    from edgerun.errors import BundleError

    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(20):
            info = tarfile.TarInfo(f"b/{i}")
            tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="more than 10 members"):
        extract_archive(archive, tmp_path / "out", max_members=10)
    assert not any((tmp_path / "out").iterdir())


# ---- the watcher ----


def test_watcher_retries_a_bundle_copied_manifest_first_and_loads_what_is_there_at_start(tmp_path, load_options):
    watched = tmp_path / "watched"
    source = build_classifier_bundle(tmp_path / "src")
    present = build_classifier_bundle(watched / "other", name="other")  # there before the server starts
    repo = ModelRepository(load_options)
    with TestClient(create_app(repo, ServerConfig(watch_dir=watched, watch_interval_s=0.05))):
        wait_until(lambda: "other" in repo.models, "the bundle present at start to load")
        assert Path(repo.get("other").source) == present
        # A copy that writes the manifest first and the model last, with a pause in between.
        partial = watched / "clf"
        partial.mkdir()
        shutil.copy(source / "manifest.json", partial)
        shutil.copy(source / "labels.txt", partial)
        shutil.copy(source / "golden.npz", partial)
        (partial / "model.onnx").write_bytes((source / "model.onnx").read_bytes()[:100])
        time.sleep(0.5)  # long enough for the watcher to try (and refuse) the half-copied bundle
        assert "clf" not in repo.models
        shutil.copy(source / "model.onnx", partial / "model.onnx")
        wait_until(lambda: "clf" in repo.models, "the completed bundle to load")


def test_fingerprint_covers_every_file(tmp_path):
    bundle = build_classifier_bundle(tmp_path / "w" / "clf")
    before = bundle_entries(tmp_path / "w")[bundle]
    time.sleep(0.01)
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    assert bundle_entries(tmp_path / "w")[bundle] != before


# ---- at most one TensorRT build per model ----


class _Reports:
    def __init__(self, real, providers):
        self._real, self._providers = real, providers

    def get_providers(self):
        return list(self._providers)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_newer_load_supersedes_the_pending_tensorrt_build(tmp_path, cache_dir, monkeypatch):
    release = threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()
    real = session_module._create_inference_session

    def factory(model, options, providers):
        if providers[0][0] != TRT:
            return _Reports(real(model, options, [(CPU, {})]), [n for n, _ in providers])
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            assert release.wait(WAIT_S)
            return _Reports(real(model, options, [(CPU, {})]), [n for n, _ in providers])
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(session_module, "_available_providers", lambda: [TRT, CPU])
    monkeypatch.setattr(session_module, "_create_inference_session", factory)
    monkeypatch.setattr(tensorrt_module, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(tensorrt_module, "compute_capability", lambda device_id=0: "8.7")
    providers = [ProviderSpec(name=TRT, options={"trt_fp16_enable": True}), ProviderSpec(name=CPU)]
    bundles = [
        build_classifier_bundle(tmp_path / f"v{i}", providers=providers, golden=True, serving={"v": i})
        for i in range(3)
    ]
    repo = ModelRepository(LoadOptions(cache_dir=cache_dir, bench=False, threads=1, trt_background=True))
    try:
        loaded = [repo.load(b) for b in bundles]
        threads = list(repo.builds.values())
    finally:
        release.set()
    repo.builds["clf"].join(WAIT_S)
    assert not repo.builds["clf"].is_alive() and len(threads) == 1
    assert most[0] == 1  # never two engine builds at once for one model
    served = repo.get("clf")
    assert served.version == loaded[-1].version and served.session.providers[0] == TRT
    assert served.status.tensorrt is not None and served.status.tensorrt.state == "ready"
    assert all(m.tensorrt_build is not None and m.tensorrt_build.cancelled.is_set() for m in loaded[:-1])
    x = np.zeros((1, 4), np.float32)
    assert served.session.run({"x": x})["probs"].shape == (1, 3)


# ---- a real server: churn through a watched directory, rollback, stop ----


def _drop(archive: Path, watched: Path) -> None:
    staging = watched / ".clf.tar.gz.tmp"
    shutil.copy(archive, staging)
    staging.replace(watched / "clf.tar.gz")


@pytest.mark.slow
def test_real_server_churn_rollback_and_no_extracted_copies_after_stop(tmp_path, versions):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    watched = tmp_path / "watched"
    watched.mkdir()
    cache = tmp_path / "cache"
    _drop(versions["A"], watched)
    env = {"TMPDIR": str(scratch), "EDGERUN_ADMIN_TOKEN": "admin-tok"}
    proc, url = start_server(["--watch", str(watched), "--model-control"], cache, env, wait=False)

    def current() -> str | None:
        try:
            response = httpx.get(f"{url}/v2/models/clf", timeout=2)
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return None
        return response.json()["versions"][0] if response.status_code == 200 else None

    try:
        wait_until(lambda: current() is not None, "the server to serve A")
        a = current()
        served = [a]
        for name in "BAB":
            previous = current()
            _drop(versions[name], watched)
            wait_until(lambda previous=previous: current() != previous, f"the server to serve {name}")
            served.append(current())
        b = served[1]
        assert served == [a, b, a, b] and a != b
        assert len(extractions(scratch)) == 1  # replaced copies are gone while serving
        rollback = subprocess.run(
            [sys.executable, "-m", "edgerun.cli", "rollback", "clf", "--cache-dir", str(cache), "--url", url],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=120,
        )
        assert rollback.returncode == 0, rollback.stderr
        assert f"restored version {a}" in rollback.stdout and f"now serves version {a}" in rollback.stdout
        assert current() == a
    finally:
        stop_server(proc)
    assert extractions(scratch) == []
