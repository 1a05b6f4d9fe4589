"""Model control: off by default, loads only by name from the repository directory or kept versions,
its own admin credential, JSON bodies only, Host rules. Over HTTP, against a real server process
where the point is what a client on the network can do."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from runtime_fixtures import build_classifier_bundle, serve_after_load
from server_process import start_server, stop_server

from edgerun.cli import main
from edgerun.reload import ModelRepository, VersionStore
from edgerun.server import ServerConfig, create_app

JSON = {"Content-Type": "application/json"}


def load(client, name: str, bundle: str | None = None, headers: dict | None = None, **kwargs):
    body = {"parameters": {"bundle": bundle}} if bundle is not None else {}
    return client.post(f"/v2/repository/models/{name}/load", json=body, headers=headers or {}, **kwargs)


@pytest.fixture()
def layout(tmp_path):
    """A repository directory with clf v1 (served) and v2, and a v3 bundle outside it."""
    repo_dir = tmp_path / "repo"
    build_classifier_bundle(repo_dir / "clf")
    build_classifier_bundle(repo_dir / "clf-v2", golden=False)
    outside = build_classifier_bundle(tmp_path / "outside" / "clf-v3", golden=False)
    return repo_dir, outside


def app_client(repo_dir: Path | None, load_options, served: Path, **config) -> TestClient:
    repo = ModelRepository(load_options, store=VersionStore(load_options.cache_dir))
    repo.load(served)
    config.setdefault("watch_interval_s", 3600)  # the watcher never loads on its own in these tests
    app = create_app(repo, ServerConfig(watch_dir=repo_dir, **config))
    return TestClient(app, base_url="http://127.0.0.1")


def version(client) -> str:
    return client.get("/v2/models/clf").json()["versions"][0]


def test_model_control_is_off_by_default(layout, load_options):
    repo_dir, outside = layout
    with app_client(repo_dir, load_options, repo_dir / "clf") as client:
        before = version(client)
        for bundle in (str(outside), "clf-v2", None):
            refused = load(client, "clf", bundle)
            assert refused.status_code == 403, refused.text
            assert "model control is off" in refused.json()["error"] and "--model-control" in refused.json()["error"]
        assert client.post("/v2/repository/models/clf/unload", headers=JSON).status_code == 403
        assert version(client) == before
        assert client.post("/v2/repository/index").status_code == 200  # read-only, always there


def test_loads_only_from_the_repository_directory(layout, load_options, tmp_path):
    repo_dir, outside = layout
    (repo_dir / "escape").symlink_to(outside, target_is_directory=True)
    with app_client(repo_dir, load_options, repo_dir / "clf", model_control=True) as client:
        before = version(client)
        for bundle in (
            str(outside),
            "escape",
            "../outside/clf-v3",
            str(repo_dir / ".." / "outside" / "clf-v3"),
            "/proc/self/cwd",
            "..",
            str(repo_dir),
        ):
            refused = load(client, "clf", bundle)
            assert refused.status_code == 403, (bundle, refused.text)
            assert "model control loads only bundles in the repository directory" in refused.json()["error"]
        assert version(client) == before
        loaded = load(client, "clf", "clf-v2")
        assert loaded.status_code == 200, loaded.text
        assert version(client) == loaded.json()["version"] != before
        by_path = load(client, "clf", str(repo_dir / "clf"))
        assert by_path.status_code == 200 and version(client) == before


def test_without_a_repository_directory_only_kept_versions_load(layout, load_options):
    repo_dir, outside = layout
    with app_client(None, load_options, repo_dir / "clf", model_control=True) as client:
        first = version(client)
        refused = load(client, "clf", str(outside))
        assert refused.status_code == 403
        assert "model control loads only kept versions under" in refused.json()["error"]
        by_name = load(client, "clf", "clf-v2")
        assert by_name.status_code == 403 and "--watch DIR" in by_name.json()["error"]
        kept = VersionStore(load_options.cache_dir).history("clf")[-1]["path"]
        assert Path(kept).is_relative_to(load_options.cache_dir)
        assert load(client, "clf", kept).status_code == 200 and version(client) == first


@pytest.mark.parametrize(
    "headers", [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}]
)
def test_load_refuses_bodies_that_are_not_json(layout, load_options, headers):
    repo_dir, _ = layout
    with app_client(repo_dir, load_options, repo_dir / "clf", model_control=True) as client:
        before = version(client)
        refused = client.post(
            "/v2/repository/models/clf/load", content=b'{"parameters": {"bundle": "clf-v2"}}', headers=headers
        )
        assert refused.status_code == 415, refused.text
        assert "application/json" in refused.json()["error"]
        assert version(client) == before


def test_admin_token_is_separate_from_the_inference_token(layout, load_options):
    repo_dir, _ = layout
    with app_client(
        repo_dir, load_options, repo_dir / "clf", model_control=True, token="infer-tok", admin_token="admin-tok"
    ) as client:
        inference = {"Authorization": "Bearer infer-tok"}
        refused = load(client, "clf", "clf-v2", headers=inference)
        assert refused.status_code == 401 and "admin token" in refused.json()["error"]
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert load(client, "clf", "clf-v2").status_code == 401
        ok = load(client, "clf", "clf-v2", headers={"Authorization": "bearer admin-tok"})  # scheme case-insensitive
        assert ok.status_code == 200, ok.text
        # ... and the admin token is not an inference token.
        assert client.get("/v2/models/clf", headers={"Authorization": "Bearer admin-tok"}).status_code == 401
        assert client.get("/v2/models/clf", headers={"Authorization": "BEARER infer-tok"}).status_code == 200


def test_without_an_admin_token_only_loopback_hosts_may_use_model_control(layout, load_options):
    repo_dir, _ = layout
    with app_client(repo_dir, load_options, repo_dir / "clf", model_control=True) as client:
        rebound = load(client, "clf", "clf-v2", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 403 and "loopback Host" in rebound.json()["error"]
        assert load(client, "clf", "clf-v2", headers={"Host": "localhost:8000"}).status_code == 200


def test_allowed_hosts_refuse_other_host_headers(bundles, load_options):
    allowed = ["device.local", "[::1]:8000"]
    with app_client(None, load_options, bundles["classifier"], allowed_hosts=allowed) as client:
        refused = client.get("/v2/models/clf", headers={"Host": "attacker.example"})
        assert refused.status_code == 400 and "--allowed-host" in refused.json()["error"]
        assert client.get("/v2/models/clf", headers={"Host": "device.local:8000"}).status_code == 200
        assert client.get("/v2/models/clf", headers={"Host": "[::1]"}).status_code == 200
        assert client.get("/v2/health/live", headers={"Host": "10.0.0.7:8000"}).status_code == 200  # probes


def test_a_loopback_server_answers_loopback_host_names_only(bundles, load_options):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as Host."""
    with app_client(None, load_options, bundles["classifier"], loopback_hosts_only=True) as client:
        refused = client.get("/v2/models/clf", headers={"Host": "rebound.example:8000"})
        assert refused.status_code == 400 and "loopback" in refused.json()["error"]
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "127.0.0.2"):
            assert client.get("/v2/models/clf", headers={"Host": host}).status_code == 200, host
        assert client.get("/v2/health/ready", headers={"Host": "rebound.example"}).status_code == 200
    named = {"loopback_hosts_only": True, "allowed_hosts": ["device.local"]}
    with app_client(None, load_options, bundles["classifier"], **named) as client:  # --allowed-host decides
        assert client.get("/v2/models/clf", headers={"Host": "device.local"}).status_code == 200


def test_serve_sets_the_loopback_host_rule_from_its_bind(bundles, cache_dir, monkeypatch):
    bundle = str(bundles["classifier"])
    result, started = _serve([bundle], monkeypatch, cache_dir)
    assert result.exit_code == 0, result.output
    assert started["app"].state.config.loopback_hosts_only is True
    result, started = _serve([bundle, "--host", "0.0.0.0", "--token", "t"], monkeypatch, cache_dir)
    assert result.exit_code == 0, result.output
    assert started["app"].state.config.loopback_hosts_only is False


def test_unload_stops_serving(layout, load_options):
    repo_dir, _ = layout
    with app_client(repo_dir, load_options, repo_dir / "clf", model_control=True) as client:
        assert client.post("/v2/repository/models/clf/unload", headers=JSON).status_code == 200
        assert client.get("/v2/models/clf").status_code == 404
        assert client.post("/v2/repository/models/clf/unload", headers=JSON).status_code == 404
        # Loading by name from the repository directory (no body) brings it back.
        assert client.post("/v2/repository/models/clf/load", headers=JSON).status_code == 200
        assert client.get("/v2/models/clf").status_code == 200


# ---- start-up rules ----


def _serve(args, monkeypatch, cache_dir):
    import edgerun.server

    started = {}
    monkeypatch.setattr(edgerun.server, "serve", serve_after_load(started))
    result = CliRunner().invoke(main, ["serve", *args, "--cache-dir", str(cache_dir), "--no-bench"])
    return result, started


def test_model_control_on_a_network_bind_needs_an_admin_token(bundles, cache_dir, monkeypatch):
    monkeypatch.delenv("EDGERUN_ADMIN_TOKEN", raising=False)
    bundle = str(bundles["classifier"])
    result, started = _serve([bundle, "--host", "0.0.0.0", "--model-control"], monkeypatch, cache_dir)
    assert result.exit_code == 2 and "needs an admin token" in result.output and not started
    result, started = _serve(
        [bundle, "--host", "0.0.0.0", "--model-control", "--admin-token", "a"], monkeypatch, cache_dir
    )
    assert result.exit_code == 0, result.output
    assert started["app"].state.config.model_control and started["app"].state.config.admin_token == "a"
    # The container's own configuration: a network bind without model control starts, with it off.
    result, started = _serve([bundle, "--host", "0.0.0.0"], monkeypatch, cache_dir)
    assert result.exit_code == 0, result.output
    assert started["host"] == "0.0.0.0" and not started["app"].state.config.model_control


def test_tokens_from_files_and_empty_tokens_refused(bundles, cache_dir, monkeypatch, tmp_path):
    bundle = str(bundles["classifier"])
    monkeypatch.setenv("EDGERUN_TOKEN", "")
    result, started = _serve([bundle], monkeypatch, cache_dir)
    assert result.exit_code == 2 and "EDGERUN_TOKEN) is empty" in result.output and not started
    monkeypatch.delenv("EDGERUN_TOKEN")
    result, _ = _serve([bundle, "--token", "  "], monkeypatch, cache_dir)
    assert result.exit_code == 2 and "is empty" in result.output
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result, _ = _serve([bundle, "--admin-token-file", str(empty), "--model-control"], monkeypatch, cache_dir)
    assert result.exit_code == 2 and "is empty" in result.output
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    result, started = _serve([bundle, "--token-file", str(token_file)], monkeypatch, cache_dir)
    assert result.exit_code == 0, result.output
    assert started["app"].state.config.token == "from-file"
    result, _ = _serve([bundle, "--token", "same", "--admin-token", "same"], monkeypatch, cache_dir)
    assert result.exit_code == 2 and "must differ" in result.output
    result, _ = _serve([bundle, "--token", "pässwort"], monkeypatch, cache_dir)
    assert result.exit_code == 2 and "printable ASCII" in result.output


# ---- a real server process, as a client on the network sees it ----


@pytest.mark.slow
@pytest.mark.parametrize("watch", [False, True])
def test_black_box_outside_paths_text_plain_symlinks_and_tokens(tmp_path, cache_dir, watch):
    repo_dir = tmp_path / "repo"
    build_classifier_bundle(repo_dir / "clf")
    outside = build_classifier_bundle(tmp_path / "outside" / "clf-v3", golden=False)
    (repo_dir / "escape").symlink_to(outside, target_is_directory=True)  # not followed by the watcher either
    args = [str(repo_dir / "clf"), "--token", "infer-tok"]
    if watch:
        args += ["--watch", str(repo_dir)]
    # Default flags: no model control at all, whatever the credential.
    proc, url = start_server(args, cache_dir, env={"EDGERUN_ADMIN_TOKEN": "admin-tok"})
    try:
        admin = {"Authorization": "Bearer admin-tok"}
        refused = httpx.post(
            f"{url}/v2/repository/models/clf/load", json={"parameters": {"bundle": str(outside)}}, headers=admin
        )
        assert refused.status_code == 403 and "model control is off" in refused.json()["error"]
    finally:
        stop_server(proc)
    proc, url = start_server([*args, "--model-control"], cache_dir, env={"EDGERUN_ADMIN_TOKEN": "admin-tok"})
    try:
        admin = {"Authorization": "Bearer admin-tok"}
        inference = {"Authorization": "Bearer infer-tok"}
        before = httpx.get(f"{url}/v2/models/clf", headers=inference).json()["versions"]
        for bundle in (str(outside), "escape", "/proc/self/root/" + str(outside).lstrip("/")):
            refused = httpx.post(
                f"{url}/v2/repository/models/clf/load", json={"parameters": {"bundle": bundle}}, headers=admin
            )
            assert refused.status_code == 403, refused.text
            assert "model control loads only" in refused.json()["error"]
        text_plain = httpx.post(
            f"{url}/v2/repository/models/clf/load",
            content=b'{"parameters": {"bundle": "clf-v2"}}',
            headers={**admin, "Content-Type": "text/plain"},
        )
        assert text_plain.status_code == 415
        with_inference_token = httpx.post(
            f"{url}/v2/repository/models/clf/load", json={"parameters": {"bundle": "clf-v2"}}, headers=inference
        )
        assert with_inference_token.status_code == 401
        assert httpx.get(f"{url}/v2/models/clf", headers=inference).json()["versions"] == before
        if watch:  # by name from the repository directory, with the admin token
            ok = httpx.post(
                f"{url}/v2/repository/models/clf/load",
                json={"parameters": {"bundle": "clf"}},
                headers=admin,
                timeout=60,
            )
            assert ok.status_code == 200, ok.text
        assert httpx.get(f"{url}/v2/models/clf", headers=inference).json()["versions"] == before
    finally:
        stop_server(proc)


def test_a_truncated_archive_in_the_repository_is_one_400(layout, load_options):
    repo_dir, _ = layout
    archive = build_classifier_bundle(repo_dir.parent / "packed", archive=True).with_suffix(".tar.gz")
    data = archive.read_bytes()
    (repo_dir / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with app_client(repo_dir, load_options, repo_dir / "clf", model_control=True) as client:
        before = version(client)
        refused = load(client, "clf", "cut.tar.gz")
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert "damaged or truncated archive" in error and "previous version keeps serving" in error
        assert "\n" not in error and version(client) == before
