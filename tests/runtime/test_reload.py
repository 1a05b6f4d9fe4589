"""Hot reload: atomic swap under load, refusal of broken bundles, kept versions, rollback, watch."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from runtime_fixtures import W, build_classifier_bundle, classifier_onnx

from edgerun.cli import main
from edgerun.errors import EdgerunError
from edgerun.reload import ModelRepository, VersionStore
from edgerun.server import ServerConfig, create_app

JSON = {"Content-Type": "application/json"}
X = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}


def test_reload_under_load_loses_no_request_and_refuses_broken(tmp_path, load_options):
    v1 = build_classifier_bundle(tmp_path / "v1")
    build_classifier_bundle(tmp_path / "v2", golden=False)  # same model, different bundle
    broken = build_classifier_bundle(tmp_path / "broken", model=classifier_onnx(weight=W * 3))
    repo = ModelRepository(load_options, store=VersionStore(load_options.cache_dir))
    repo.load(v1)
    first_version = repo.get("clf").version
    # The bundles lie in the repository directory; the watcher never gets to them in this test.
    config = ServerConfig(max_batch=4, max_delay_ms=1, model_control=True, watch_dir=tmp_path, watch_interval_s=3600)
    with TestClient(create_app(repo, config), base_url="http://127.0.0.1") as client:

        def hammer(_):
            return [client.post("/v2/models/clf/infer", json=X).status_code for _ in range(30)]

        with ThreadPoolExecutor(4) as pool:
            load = [pool.submit(hammer, i) for i in range(3)]
            swapped = client.post("/v2/repository/models/clf/load", json={"parameters": {"bundle": "v2"}})
            refused = client.post("/v2/repository/models/clf/load", json={"parameters": {"bundle": str(broken)}})
            codes = [code for future in load for code in future.result()]
        assert swapped.status_code == 200, swapped.text
        assert refused.status_code == 400 and "previous version keeps serving" in refused.json()["error"]
        assert codes == [200] * 90
        new_version = client.get("/v2/models/clf").json()["versions"][0]
        assert new_version == swapped.json()["version"] != first_version
        assert 'edgerun_reloads_total{model="clf",outcome="refused"} 1.0' in client.get("/metrics").text
        # Reload without a body re-reads the model from where it came from.
        assert client.post("/v2/repository/models/clf/load", headers=JSON).status_code == 200
        assert client.post("/v2/repository/models/other/load", headers=JSON).status_code == 404
        wrong_name = client.post("/v2/repository/models/other/load", json={"parameters": {"bundle": str(v1)}})
        assert wrong_name.status_code == 400 and "is model 'clf', not 'other'" in wrong_name.json()["error"]
        index = client.post("/v2/repository/index").json()
        assert index == [{"name": "clf", "version": new_version, "state": "READY"}]


def test_versions_are_kept_and_rollback_restores_previous(tmp_path, load_options):
    store = VersionStore(load_options.cache_dir)
    repo = ModelRepository(load_options, store=store)
    v1 = repo.load(build_classifier_bundle(tmp_path / "v1")).version
    source = build_classifier_bundle(tmp_path / "v2", golden=False)
    v2 = repo.load(source).version
    shutil.rmtree(source)  # the kept copy must not depend on the source still existing
    assert [h["version"] for h in store.history("clf")] == [v1, v2]
    result = CliRunner().invoke(main, ["rollback", "clf", "--cache-dir", str(load_options.cache_dir)])
    assert result.exit_code == 0, result.output
    assert f"restored version {v1}" in result.output
    assert [h["version"] for h in store.history("clf")] == [v1]
    assert repo.load(store.history("clf")[-1]["path"]).version == v1
    result = CliRunner().invoke(main, ["rollback", "clf", "--cache-dir", str(load_options.cache_dir)])
    assert result.exit_code == 2 and "nothing to roll back" in result.output


def test_watch_directory_loads_new_bundles_and_ignores_broken(tmp_path, load_options):
    watched = tmp_path / "models"
    build_classifier_bundle(watched / "clf")
    repo = ModelRepository(load_options)
    repo.load(watched / "clf")
    before = repo.get("clf").version
    config = ServerConfig(watch_dir=watched, watch_interval_s=0.05)
    with TestClient(create_app(repo, config)) as client:
        build_classifier_bundle(watched / "broken", name="clf", model=classifier_onnx(weight=W * 3))
        build_classifier_bundle(watched / "clf", golden=False)  # replaced in place, atomically
        deadline = time.monotonic() + 20
        while repo.get("clf").version == before and time.monotonic() < deadline:
            time.sleep(0.05)
        after = repo.get("clf").version
        assert after != before
        time.sleep(0.3)  # give the watcher time to try (and refuse) the broken one too
        assert repo.get("clf").version == after
        assert client.post("/v2/models/clf/infer", json=X).status_code == 200


def test_watch_loads_a_bundle_replaced_before_the_watcher_first_looked(tmp_path, load_options):
    # The served bundle is replaced after its load but before the watcher's first scan (as when a
    # device owner drops a new version in while the server is still starting): the watcher must
    # judge it against the files that were loaded, not take its own first look as "already served".
    watched = tmp_path / "models"
    build_classifier_bundle(watched / "clf")
    repo = ModelRepository(load_options)
    before = repo.load(watched / "clf").version
    build_classifier_bundle(watched / "clf", golden=False)
    config = ServerConfig(watch_dir=watched, watch_interval_s=0.05)
    with TestClient(create_app(repo, config)):
        deadline = time.monotonic() + 20
        while repo.get("clf").version == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert repo.get("clf").version != before


def test_watch_does_not_reload_what_was_loaded_or_refused_before_it_started(tmp_path, load_options):
    watched = tmp_path / "models"
    build_classifier_bundle(watched / "clf")
    build_classifier_bundle(watched / "broken", name="clf", model=classifier_onnx(weight=W * 3))
    repo = ModelRepository(load_options)
    served = repo.load(watched / "clf")
    with pytest.raises(EdgerunError, match="golden check failed"):
        repo.load(watched / "broken")
    loads = []
    original = repo.load
    repo.load = lambda location, expected_name=None: loads.append(location) or original(location, expected_name)
    with TestClient(create_app(repo, ServerConfig(watch_dir=watched, watch_interval_s=0.01))):
        time.sleep(0.3)  # many scans
    assert loads == [] and repo.get("clf") is served


def test_adding_a_model_does_not_break_a_reader_iterating_the_models(tmp_path, load_options):
    repo = ModelRepository(load_options)
    repo.load(build_classifier_bundle(tmp_path / "a", name="a"))
    readers = iter(repo.models.values())
    next(readers)
    repo.load(build_classifier_bundle(tmp_path / "b", name="b"))
    assert list(readers) == []  # the reader finishes on the snapshot it started with
    assert sorted(repo.models) == ["a", "b"]
