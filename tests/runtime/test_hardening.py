"""Hardening: token, body limit, signatures, hostile archives, overload, and a bounded fuzz run."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_fixtures import build_classifier_bundle, post_concurrently

from edgerun.bundle import extract_archive, open_bundle
from edgerun.errors import BundleError
from edgerun.loader import LoadOptions, load_model
from edgerun.reload import ModelRepository
from edgerun.server import ServerConfig, create_app


def client_for(bundle, load_options, **config) -> TestClient:
    repo = ModelRepository(load_options)
    repo.load(bundle)
    return TestClient(create_app(repo, ServerConfig(**config)), base_url="http://127.0.0.1")


def x_json(rows: int = 1) -> dict:
    return {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.5] * (4 * rows)}]}


def test_token_required_everywhere_but_health(bundles, load_options):
    with client_for(bundles["classifier"], load_options, token="s3cret") as client:
        assert client.get("/v2/health/ready").status_code == 200
        for method, path in [
            ("get", "/v2"),
            ("get", "/v2/models/clf"),
            ("get", "/metrics"),
            ("get", "/docs"),
            ("post", "/v2/models/clf/infer"),
            ("post", "/v1/predict"),
        ]:
            response = getattr(client, method)(path)
            assert response.status_code == 401, path
            assert "bearer token" in response.json()["error"]
        wrong = client.post("/v2/models/clf/infer", json=x_json(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/v2/models/clf/infer", json=x_json(), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_body_limit_is_413(bundles, load_options):
    with client_for(bundles["classifier"], load_options, max_body_mb=0.001) as client:
        response = client.post("/v2/models/clf/infer", content=orjson.dumps(x_json(100)))
        assert response.status_code == 413 and "limit" in response.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b" " * 200

        assert client.post("/v2/models/clf/infer", content=chunks()).status_code == 413
        assert client.post("/v2/models/clf/infer", json=x_json()).status_code == 200


def test_full_queue_is_503_with_retry_after(bundles, load_options):
    gate = threading.Event()
    with client_for(bundles["classifier"], load_options, max_queue=1, timeout_s=10) as client:
        served = client.app.state.repo.get("clf")
        real_run = served.session.run

        def held_run(feeds):
            gate.wait(10)
            return real_run(feeds)

        served.session.run = held_run
        batcher = client.app.state.edgerun.batcher
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v2/models/clf/infer", json=x_json())
            while batcher.running == 0:
                gate.wait(0.01)
            second = pool.submit(client.post, "/v2/models/clf/infer", json=x_json())
            while len(batcher._pending) == 0:
                gate.wait(0.01)
            rejected = client.post("/v2/models/clf/infer", json=x_json())
            gate.set()
            assert rejected.status_code == 503 and rejected.headers["Retry-After"] == "1"
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_request_timeout_is_504(bundles, load_options):
    gate = threading.Event()
    with client_for(bundles["classifier"], load_options, timeout_s=0.05) as client:
        served = client.app.state.repo.get("clf")
        real_run = served.session.run
        served.session.run = lambda feeds: (gate.wait(10), real_run(feeds))[1]
        response = client.post("/v2/models/clf/infer", json=x_json())
        gate.set()
        assert response.status_code == 504 and "no inference result" in response.json()["error"]
        assert client.get("/v2/health/live").status_code == 200


def test_server_batches_concurrent_requests_and_returns_own_rows(bundles, load_options):
    with client_for(bundles["classifier"], load_options, max_batch=8, max_delay_ms=200) as client:
        session = client.app.state.repo.get("clf").session
        before = session.run_count
        rows = [np.full((1, 4), i / 10, dtype=np.float32) for i in range(6)]
        responses = post_concurrently(client, rows)
        direct = [session.session.run(None, {"x": x})[0] for x in rows]
        assert session.run_count - before < len(rows)
        for response, want in zip(responses, direct):
            np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]).reshape(1, 3), want, rtol=1e-6)


def test_nonfinite_allowed_when_manifest_says_so(tmp_path, load_options):
    bundle = build_classifier_bundle(tmp_path / "b", golden=False)
    # Flip the flag in the manifest and re-write so checksums stay right.
    from edgebuild.bundle import write_bundle

    manifest = open_bundle(bundle).manifest
    manifest.inputs[0].allow_nonfinite = True
    files = {p: (bundle / p).read_bytes() for p in manifest.files}
    write_bundle(tmp_path / "c", manifest, files)
    x = np.array([[np.inf, 0, 0, 0]], dtype=np.float32)
    head = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}
    )
    with client_for(tmp_path / "c", load_options) as client:
        response = client.post(
            "/v2/models/clf/infer",
            content=head + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert response.status_code == 200


def _keys():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def test_trusted_key_refuses_unsigned_and_wrong_signed(tmp_path, cache_dir):
    private, public = _keys()
    _, other_public = _keys()
    signed = build_classifier_bundle(tmp_path / "signed", sign_key=private)
    unsigned = build_classifier_bundle(tmp_path / "unsigned")
    assert load_model(signed, LoadOptions(cache_dir=cache_dir, bench=False, trusted_key=public)).name == "clf"
    with pytest.raises(BundleError, match="not signed"):
        load_model(unsigned, LoadOptions(cache_dir=cache_dir, bench=False, trusted_key=public))
    with pytest.raises(BundleError, match="does not verify"):
        load_model(signed, LoadOptions(cache_dir=cache_dir, bench=False, trusted_key=other_public))


def test_tar_gz_bundle_loads(tmp_path, load_options):
    build_classifier_bundle(tmp_path / "packed", archive=True)
    served = load_model(tmp_path / "packed.tar.gz", load_options)
    assert served.name == "clf"


def _tar_with(tmp_path, add):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


def _file(tar, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "name, add",
    [
        ("absolute", lambda tar: _file(tar, "/tmp/edgerun-evil")),
        ("dotdot", lambda tar: _file(tar, "bundle/../../evil")),
        ("symlink", lambda tar: tar.addfile(_symlink("bundle/manifest.json", "/etc/passwd"))),
    ],
)
def test_hostile_archives_are_refused(tmp_path, name, add):
    archive = _tar_with(tmp_path, add)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BundleError, match="escapes|link"):
        extract_archive(archive, dest)
    assert not any(dest.rglob("*"))
    with pytest.raises(BundleError):
        open_bundle(archive, workdir=tmp_path / "work")


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
tensor_like = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]),
        "shape": st.lists(st.integers(-2, 5), max_size=3),
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "fp32"]),
        "data": json_values,
    },
    optional={"parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-4, 40) | st.text(max_size=3)})},
)


@st.composite
def malformed_requests(draw):
    kind = draw(st.sampled_from(["bytes", "json", "tensors"]))
    headers = {}
    if draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = str(draw(st.integers(-5, 200)))
    if kind == "bytes":
        return draw(st.binary(max_size=64)), headers
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), headers
    body = json.dumps({"inputs": draw(st.lists(tensor_like, max_size=3))}).encode() + draw(st.binary(max_size=40))
    return body, headers


@pytest.fixture(scope="module")
def fuzz_client(bundles, tmp_path_factory):
    options = LoadOptions(cache_dir=tmp_path_factory.mktemp("cache"), bench=False, threads=1)
    with client_for(bundles["classifier"], options) as client:
        yield client


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=malformed_requests())
def test_fuzzed_requests_get_4xx_and_server_keeps_answering(fuzz_client, request):
    body, headers = request
    response = fuzz_client.post("/v2/models/clf/infer", content=body, headers=headers)
    if response.status_code == 200:  # hypothesis may build a valid request; it must then really be one
        assert response.json()["outputs"][0]["name"] == "probs"
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert response.json()["error"]
    assert fuzz_client.get("/v2/health/live").status_code == 200


def test_unknown_model_names_do_not_grow_the_metrics(bundles, load_options):
    with client_for(bundles["classifier"], load_options) as client:
        for i in range(20):
            assert client.post(f"/v2/models/nope{i}/infer", json=x_json()).status_code == 404
            assert client.post(f"/v1/predict?model=nope{i}", content=b"x").status_code == 404
        text = client.get("/metrics").text
        assert "nope" not in text
        assert 'edgerun_requests_total{code="404",endpoint="infer",model="unknown"} 20.0' in text


@pytest.mark.parametrize("bundle", [123, ["/tmp"], {"path": "/tmp"}])
def test_load_with_a_non_string_bundle_is_400(bundles, load_options, bundle):
    with client_for(bundles["classifier"], load_options, model_control=True) as client:
        response = client.post("/v2/repository/models/clf/load", json={"parameters": {"bundle": bundle}})
        assert response.status_code == 400 and "parameters.bundle" in response.json()["error"]


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "a\\b"])
def test_a_manifest_name_that_is_not_one_path_component_is_refused(tmp_path, name):
    bundle = build_classifier_bundle(tmp_path / "b", name=name)
    with pytest.raises(BundleError, match="name"):
        open_bundle(bundle)


@pytest.mark.parametrize("field", ["golden.npz", "labels.txt"])
def test_golden_and_labels_must_be_covered_by_a_checksum(tmp_path, field):
    bundle = build_classifier_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"][field]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        open_bundle(bundle)


def test_a_refused_archive_leaves_no_extraction_behind(tmp_path, monkeypatch):
    import tempfile

    archive = build_classifier_bundle(tmp_path / "clf", archive=True).with_suffix(".tar.gz")
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("labels.txt"):
                data = b"tampered\n"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(BundleError, match="checksum"):
        open_bundle(tampered)
    assert list(scratch.iterdir()) == []


def test_an_archive_unpacking_past_the_size_limit_is_refused_before_extraction(tmp_path):
    archive = _tar_with(tmp_path, lambda tar: _file(tar, "bundle/big.bin", b"x" * 4096))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BundleError, match="over the 1024 byte limit"):
        extract_archive(archive, dest, max_bytes=1024)
    assert not any(dest.rglob("*"))
