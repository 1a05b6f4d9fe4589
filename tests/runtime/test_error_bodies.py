"""Every error answer follows the published ErrorResponse schema; slow and vanished clients; the
README's endpoint table is the server's."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture()
def app(bundles, load_options):
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    repo.load(bundles["image"])
    return create_app(repo, ServerConfig(body_timeout_s=0.2))


@pytest.mark.parametrize(
    "method, path, kwargs, status",
    [
        ("get", "/nope", {}, 404),
        ("delete", "/v2/models/clf", {}, 405),
        ("get", "/v2/models/clf/infer", {}, 405),
        (
            "post",
            "/v1/predict?model=img",
            {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
            400,
        ),
        (
            "post",
            "/v1/predict?model=img",
            {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
            400,
        ),
        ("post", "/v1/predict", {"content": b"\x89PNG"}, 400),  # two models and no ?model
        ("post", "/v2/models/clf/infer", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
        (
            "post",
            "/v2/models/clf/infer",
            {"content": b"\x1f\x8b garbage", "headers": {"Content-Encoding": "gzip"}},
            400,
        ),
        ("get", "/v2/models/clf?version=7", {}, 404),
    ],
)
def test_errors_follow_the_error_schema(app, method, path, kwargs, status):
    with TestClient(app) as client:
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
        assert " object at 0x" not in body["error"]


def test_predict_names_the_models_when_several_are_served(app):
    with TestClient(app) as client:
        response = client.post("/v1/predict", content=b"\x89PNG")
        assert response.status_code == 400
        assert "several models are served (clf, img)" in response.json()["error"]


async def _raw(app, messages: list[dict], path: str = "/v2/models/clf/infer") -> list[dict]:
    """Drive the ASGI app with the given receive messages; then the client goes quiet."""
    sent: list[dict] = []
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return sent


def test_a_client_disconnecting_mid_body_is_not_a_server_error(app, caplog):
    messages = [{"type": "http.request", "body": b'{"inputs": [', "more_body": True}, {"type": "http.disconnect"}]
    with caplog.at_level(logging.ERROR, logger="edgerun"):
        sent = asyncio.run(_raw(app, messages))
    assert sent[0]["status"] == 499
    metrics = app.state.metrics.render().decode()
    assert 'edgerun_requests_total{code="499",endpoint="infer",model="clf"} 1.0' in metrics
    assert 'code="500"' not in metrics and "internal error" not in caplog.text


def test_a_body_that_never_finishes_is_408(app):
    sent = asyncio.run(_raw(app, [{"type": "http.request", "body": b'{"inputs": [', "more_body": True}]))
    assert sent[0]["status"] == 408
    assert b"request body not received within 0.2 s" in sent[1]["body"]


def _readme_routes() -> set[tuple[str, str]]:
    text = README.read_text()
    table = text[text.index("| endpoint | what |") :].split("\n\n", 1)[0]
    routes = set()
    for row in table.splitlines()[2:]:
        cell = row.split("|")[1]
        method, path = None, ""
        for token in re.findall(r"`([^`]+)`", cell):
            if token.split()[0] in ("GET", "POST"):
                method, path = token.split()
            elif token.startswith("..."):
                path = path.rsplit("/", 1)[0] + token[3:]
            else:
                path = token
            routes.add((method, path))
    return routes


def test_readme_endpoint_table_matches_the_routes(app):
    documented = {
        (method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations
    }
    assert _readme_routes() == documented


def test_infer_answers_a_bug_with_the_500_body_and_counts_it(app, caplog, monkeypatch):
    """The infer route's errors and metrics are the app's, whichever path answers it."""

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(app.state.edgerun.batcher, "submit", broken)
        version = client.get("/v2/models/clf").json()["versions"][0]
        tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.0, 0.0, 0.0]}
        with caplog.at_level(logging.ERROR, logger="edgerun"):
            failed = client.post(f"/v2/models/clf/versions/{version}/infer", json={"inputs": [tensor]})
        refused = client.post("/v2/models/clf/infer", content=b"{}", headers={"Content-Type": "text/plain"})
        metrics = client.get("/metrics").text
    assert failed.status_code == 500 and failed.json() == {"error": "internal error (RuntimeError); see the server log"}
    assert f"internal error on POST /v2/models/clf/versions/{version}/infer" in caplog.text
    assert 'edgerun_requests_total{code="500",endpoint="infer",model="clf"} 1.0' in metrics
    # A refused Content-Type is answered before the request is timed, as by a route dependency.
    assert refused.status_code == 415 and 'code="415"' not in metrics
