"""What a hostile client, bundle or archive tries against the server, and the rule that stops it.

Each test plays one attack end to end (a request, a bundle dropped into the repository
directory, an archive) and checks the answer a client on the network gets: a 4xx naming the
rule, the ErrorResponse body, and a server that still serves what it served before.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from runtime_fixtures import build_classifier_bundle

from edgerun.reload import ModelRepository, VersionStore
from edgerun.server import ServerConfig, create_app

JSON = {"Content-Type": "application/json"}


@pytest.fixture()
def repo_dir(tmp_path) -> Path:
    directory = tmp_path / "repo"
    build_classifier_bundle(directory / "clf")
    return directory


def control_client(repo_dir: Path, load_options, **config) -> TestClient:
    repo = ModelRepository(load_options, store=VersionStore(load_options.cache_dir))
    repo.load(repo_dir / "clf")
    config.setdefault("watch_interval_s", 3600)  # the watcher never loads on its own here
    app = create_app(repo, ServerConfig(watch_dir=repo_dir, model_control=True, **config))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


# ---- model control: names and paths the file system cannot take ----


@pytest.mark.parametrize(
    "url_name, bundle",
    [
        ("clf", "clf\x00/../../etc"),  # NUL: os calls raise ValueError, not OSError
        ("clf", "/tmp/clf\x00"),
        ("clf", "x" * 5000),  # one component longer than NAME_MAX: ENAMETOOLONG
        ("y" * 5000, None),  # the same through the URL, no body
    ],
)
def test_model_control_names_the_file_system_refuses_are_a_4xx_not_a_500(
    repo_dir, load_options, url_name, bundle, caplog
):
    with control_client(repo_dir, load_options) as client:
        before = client.get("/v2/models/clf").json()["versions"]
        body = {"parameters": {"bundle": bundle}} if bundle is not None else {}
        with caplog.at_level(logging.ERROR, logger="edgerun"):
            refused = client.post(f"/v2/repository/models/{url_name}/load", json=body)
        assert refused.status_code in (403, 404), refused.text
        error = refused.json()["error"]
        assert "not a bundle name" in error and "internal error" not in error
        assert not [r for r in caplog.records if r.exc_info], "a refused name must not be logged as a server bug"
        assert client.get("/v2/models/clf").json()["versions"] == before
