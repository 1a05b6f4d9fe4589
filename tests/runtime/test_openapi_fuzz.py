"""Requests generated from the server's own OpenAPI document, for every route: whatever arrives,
no 5xx, every status is one the document lists for that route, every error body is an
ErrorResponse and every JSON success body has the documented schema's required fields."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from runtime_fixtures import build_classifier_bundle, build_detector_bundle

from edgerun.loader import LoadOptions
from edgerun.reload import ModelRepository, VersionStore
from edgerun.server import ServerConfig, create_app

NAMES = ["clf", "img", "pair", "det", "0.5", "1001", "nope", "..", "a b", "clf/../img"]
TOKENS = [None, "Bearer infer", "bearer infer", "Bearer admin", "Basic eA==", "Bearer"]
PRINTABLE = st.characters(min_codepoint=33, max_codepoint=126)  # what a client can put in a URL at all
EXTRA_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    return buffer.getvalue()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=32) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
infer_like = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["x", "image", "input_ids", "y"]),
                    "shape": st.lists(st.integers(-1, 4), max_size=4),
                    "datatype": st.sampled_from(["FP32", "INT64", "BYTES"]),
                    "data": st.lists(st.floats(-2, 2, width=32), max_size=16),
                }
            ),
            max_size=2,
        )
    }
)
load_like = st.fixed_dictionaries(
    {
        "parameters": st.fixed_dictionaries(
            {"bundle": st.sampled_from(["extra", "/etc", "..", "nope"]) | st.text(max_size=8)}
        )
    }
)


def body_for(content_type: str | None) -> st.SearchStrategy[bytes]:
    if content_type and "json" in content_type:
        return st.one_of(json_values, infer_like, load_like).map(lambda v: json.dumps(v).encode())
    if content_type and content_type.startswith("image/"):
        return st.sampled_from([_png(), b"", b"\x89PNG\r\n\x1a\n"]) | st.binary(max_size=64)
    if content_type and content_type.startswith("multipart/"):
        part = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + _png() + b"\r\n--b--\r\n"
        )
        return st.sampled_from([part, b"--b\r\n", b""]) | st.binary(max_size=64)
    return st.binary(max_size=64)


@pytest.fixture(scope="module")
def served_app(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    repository = root / "repository"
    build_classifier_bundle(repository / "extra", name="extra")
    options = LoadOptions(cache_dir=root / "cache", bench=False, threads=1)
    repo = ModelRepository(options, store=VersionStore(options.cache_dir))
    for name in ("classifier", "image", "pair"):
        repo.load(bundles[name])
    repo.load(build_detector_bundle(root / "det"))
    config = ServerConfig(
        token="infer", admin_token="admin", model_control=True, watch_dir=repository, watch_interval_s=3600
    )
    app = create_app(repo, config)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, Document(app.openapi())


class Document(dict):
    """The OpenAPI document, with a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<OpenAPI document, {len(self['paths'])} paths>"


def _operations(document: dict) -> list[tuple[str, str, dict]]:
    return [(method, path, op) for path, ops in document["paths"].items() for method, op in ops.items()]


@st.composite
def requests(draw, document: dict):
    method, template, operation = draw(st.sampled_from(_operations(document)))
    path = template
    query = {}
    plain = True  # every path value stays one URL segment (no '/', '..', '?', '#', '%' for the client to rewrite)
    for parameter in operation.get("parameters", []):
        value = draw(st.sampled_from(NAMES) | st.text(PRINTABLE, min_size=1, max_size=6))
        if parameter["in"] == "path":
            path = path.replace("{" + parameter["name"] + "}", value)
            plain = plain and value not in (".", "..") and not any(c in value for c in "/\\?#%")
        elif draw(st.booleans()):
            query[parameter["name"]] = value
    declared = list(operation.get("requestBody", {}).get("content", {}))
    content_type = draw(st.sampled_from(declared + EXTRA_TYPES)) if method == "post" else None
    if content_type and content_type.startswith("multipart/"):
        content_type = "multipart/form-data; boundary=b"
    if content_type == "image/*":
        content_type = "image/png"
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    token = draw(st.sampled_from(TOKENS))
    if token:
        headers["Authorization"] = token
    body = draw(body_for(content_type)) if method == "post" else None
    return method, plain, path, query, headers, body, operation


def _schemas(document: dict, response: dict) -> list[dict]:
    """The documented body schemas of a response: one, or each of an ``anyOf`` (/v1/predict: one per task)."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    refs = [item.get("$ref") for item in schema.get("anyOf", [schema])]
    return [document["components"]["schemas"][ref.rsplit("/", 1)[1]] for ref in refs if ref]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_requests_never_get_5xx_and_answer_the_documented_schema(served_app, data):
    client, document = served_app
    method, plain, path, query, headers, body, operation = data.draw(requests(document))
    response = client.request(method.upper(), path, params=query, headers=headers, content=body)
    status = response.status_code
    where = f"{method.upper()} {path} {headers} -> {status} {response.text[:200]}"
    assert status < 500, where
    documented = operation["responses"]
    if plain:  # otherwise the client may have sent the request to another route altogether
        assert str(status) in documented, where
    if status >= 400:
        assert response.headers["content-type"] == "application/json", where
        body_json = response.json()
        assert set(body_json) == {"error"} and isinstance(body_json["error"], str), where
    elif plain and response.headers.get("content-type", "").startswith("application/json"):
        schemas = _schemas(document, documented[str(status)])
        if schemas:
            assert any(set(schema.get("required", [])) <= set(response.json()) for schema in schemas), where


def test_every_reference_in_the_document_resolves(served_app):
    _, document = served_app

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(dict(document)))
    assert "#/components/schemas/LoadRequest" in found and "#/components/schemas/ErrorResponse" in found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref
