"""What a hostile client, bundle or archive tries against the server, and the rule that stops it.

Each test plays one attack end to end (a request, a bundle dropped into the repository
directory, an archive) and checks the answer a client on the network gets: a 4xx naming the
rule, the ErrorResponse body, and a server that still serves what it served before.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from runtime_fixtures import CLASSIFIER_IO, build_classifier_bundle, make_manifest, model_file

from edgebuild.bundle import write_bundle
from edgerun.manifest import SessionOptionsSpec
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


def test_encoded_and_full_width_dots_never_reach_outside_the_repository_directory(tmp_path, load_options):
    """'%2e%2e' and full-width dots ('．．', U+FF0E) are '..' to a server that decodes a name twice or
    NFKC-normalizes it. Valid bundles wait at every place such a decoding would lead to (the watch
    dir's parent and '../../etc' from it): a load that reached one would answer 200 and serve it.
    Guards: ModelControl.confine for the one decoding the URL router does ('%2e%2e' -> '..'), and
    no further decoding of a bundle name than the file system's own for the rest."""
    outside = build_classifier_bundle(tmp_path / "outside", golden=False)  # the watch dir's '..'
    build_classifier_bundle(tmp_path / "etc", golden=False)  # the watch dir's '../../etc'
    repo_dir = outside / "repo"
    build_classifier_bundle(repo_dir / "clf")
    with control_client(repo_dir, load_options) as client:
        before = client.post("/v2/repository/index").json()
        for url_name, status, said in [
            ("%2e%2e", 403, "'..' resolves to"),  # decoded once by the router, then refused by the confinement
            ("%2E%2E", 403, "'..' resolves to"),
            ("．．", 404, "has no bundle named '．．'"),
            ("．．%2F．．%2Fetc", 404, "no route"),
        ]:
            refused = client.post(f"/v2/repository/models/{url_name}/load", json={})
            assert refused.status_code == status, (url_name, refused.text)
            assert said in refused.json()["error"], (url_name, refused.text)
        for bundle in ("%2e%2e", "%2e%2e/%2e%2e/etc", "．．", "．．/．．/etc", "..／..／etc"):
            refused = client.post("/v2/repository/models/clf/load", json={"parameters": {"bundle": bundle}})
            assert refused.status_code == 400, (bundle, refused.text)
            assert f"bundle '{repo_dir / bundle}' does not exist" in refused.json()["error"], refused.text
        assert client.post("/v2/repository/index").json() == before


@pytest.mark.parametrize(
    "host, answered",
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("127.0.0.1.evil.com", False),  # a prefix match on '127.' or '127.0.0.1' would take it
        ("127.0.0.1.evil.com:8000", False),
        ("localhost.evil.com", False),
        ("127.1", False),  # inet_aton's short form of 127.0.0.1: a name a page's DNS can hold, not an address
        ("2130706433", False),  # 127.0.0.1 as one decimal number
        ("0x7f000001", False),
    ],
)
def test_host_names_that_only_look_like_loopback_are_refused(bundles, load_options, host, answered):
    """DNS rebinding on a loopback-only server: the page's own name is the Host header, and a name can
    look like a loopback address. Guards GuardMiddleware's loopback_hosts_only rule (is_loopback takes
    exact loopback names and addresses only)."""
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    with TestClient(create_app(repo, ServerConfig(loopback_hosts_only=True)), base_url="http://127.0.0.1") as client:
        answer = client.get("/v2/models/clf", headers={"Host": host})
        if answered:
            assert answer.status_code == 200, answer.text
        else:
            assert answer.status_code == 400, answer.text
            assert "not a loopback name" in answer.json()["error"]


# ---- a hostile bundle: an ONNX model whose weights live in files outside the bundle ----


def external_data_onnx(location: str, where: str = "initializer") -> bytes:
    """x [-1,4] -> probs [-1,3] = x @ 0 + b, with b's 12 bytes read from ``location`` (ONNX external data):
    whatever file that names comes back out of every inference as three floats."""
    from onnx import TensorProto, helper, numpy_helper

    bias = TensorProto(name="b", data_type=TensorProto.FLOAT, dims=[3], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        bias.external_data.add(key=key, value=value)
    zeros = numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"])]
    initializers = [zeros]
    if where != "initializer":  # hidden inside an If branch, not among the main graph's initializers
        if where == "branch constant":  # in a node attribute (Constant)
            branch_nodes, branch_initializers = [helper.make_node("Constant", [], ["b_in"], value=bias)], []
        else:  # "branch initializer": among the subgraph's own initializers
            bias.name = "b_branch"
            branch_nodes, branch_initializers = [helper.make_node("Identity", ["b_branch"], ["b_in"])], [bias]
        branch = helper.make_graph(
            branch_nodes,
            "then",
            [],
            [helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [3])],
            branch_initializers,
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        initializers.append(cond)
        nodes.append(helper.make_node("If", ["cond"], ["b"], then_branch=branch, else_branch=branch))
    else:
        initializers.append(bias)
    nodes.append(helper.make_node("Add", ["xw", "b"], ["probs"]))
    graph = helper.make_graph(
        nodes,
        "leak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# Guards external_data.check_self_contained, which walks subgraphs' initializers and node attributes too.
@pytest.mark.parametrize("where", ["initializer", "branch constant", "branch initializer"])
def test_a_model_reading_weights_from_files_outside_the_bundle_is_refused(tmp_path, load_options, monkeypatch, where):
    """ONNX external data resolves against the server's working directory when a session is made from
    bytes: a dropped bundle could read any file there and hand it out through inference."""
    secret = np.array([1.25, -2.5, 42.0], np.float32)
    workdir = tmp_path / "server-cwd"
    workdir.mkdir()
    (workdir / "secret.bin").write_bytes(secret.tobytes())
    monkeypatch.chdir(workdir)
    repo_dir = tmp_path / "repo"
    build_classifier_bundle(repo_dir / "clf")
    # Without graph optimizations ORT reads the file when the session is made, not while folding constants.
    unoptimized = model_file(session_options=SessionOptionsSpec(graph_optimization_level="disable_all"))
    manifest = make_manifest("clf", **CLASSIFIER_IO, model=unoptimized)
    write_bundle(repo_dir / "leak", manifest, {"model.onnx": external_data_onnx("secret.bin", where)}, force=True)
    with control_client(repo_dir, load_options) as client:
        before = client.get("/v2/models/clf").json()["versions"]
        refused = client.post("/v2/repository/models/clf/load", json={"parameters": {"bundle": "leak"}})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert "external data" in error and "secret.bin" in error and "previous version keeps serving" in error
        served = client.post(
            "/v2/models/clf/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]},
        )
        assert served.status_code == 200
        assert client.get("/v2/models/clf").json()["versions"] == before
        assert not np.allclose(served.json()["outputs"][0]["data"], secret)


# ---- a hostile manifest: tuning options that are file names ----


@pytest.mark.parametrize("prefix", ["../../../../tmp/planted", "/etc/cron.d/planted", "engines/x", "..", ".hidden"])
def test_an_engine_cache_prefix_that_is_not_a_plain_name_refuses_the_bundle(tmp_path, load_options, prefix):
    """TensorRT joins the prefix onto the (confined) cache path with std::filesystem::path::append: an
    absolute prefix replaces it and '..' leaves it, so engines would be written and loaded anywhere."""
    from edgerun.errors import BundleError
    from edgerun.loader import load_model
    from edgerun.manifest import ProviderSpec

    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": "cache", "trt_engine_cache_prefix": prefix}
    bundle = build_classifier_bundle(
        tmp_path / "b",
        providers=[ProviderSpec(name="TensorrtExecutionProvider", options=options), "CPUExecutionProvider"],
    )
    with pytest.raises(BundleError, match="'trt_engine_cache_prefix' of TensorrtExecutionProvider must be a plain"):
        load_model(bundle, load_options)


def test_a_plain_engine_cache_prefix_passes(tmp_path, load_options):
    from edgerun.loader import load_model
    from edgerun.manifest import ProviderSpec

    options = {"trt_engine_cache_enable": True, "trt_engine_cache_prefix": "clf_v2-fp16.a"}
    bundle = build_classifier_bundle(
        tmp_path / "b",
        providers=[ProviderSpec(name="TensorrtExecutionProvider", options=options), "CPUExecutionProvider"],
    )
    assert load_model(bundle, load_options).session.providers == ["CPUExecutionProvider"]


# ---- a hostile archive: header records tarfile reads whole into memory ----


def _header(name: str, kind: bytes, size: int, extended: bool = False) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    buf = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    if extended:  # old GNU sparse: more sparse map blocks follow the header
        buf[482] = 1
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _hostile_prefix(kind: str, size: int) -> bytes:
    """A header record of about ``size`` bytes that tarfile would read (or parse) whole, before any member."""
    import tarfile

    if kind == "pax":
        body = b" comment=" + b"a" * size + b"\n"
        record = b"%d%s" % (len(body) + len(str(len(body) + 8)), body)
        record = b"%d%s" % (len(body) + len(str(len(record))), body)
        return _header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + _padded(record)
    if kind == "gnu-longname":
        return _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size) + _padded(b"a" * size)
    if kind == "pax-sparse":  # GNU sparse 1.0: the member's data starts with a map of any length
        record = b"".join(
            b"%d %s\n" % (len(b" %s\n" % kv) + 2, kv) for kv in (b"GNU.sparse.major=1", b"GNU.sparse.minor=0")
        )
        sparse_map = b"%d\n" % (size // 2) + b"1\n" * (size // 2)
        return (
            _header("././@PaxHeader", tarfile.XHDTYPE, len(record))
            + _padded(record)
            + _header("sparse.bin", tarfile.REGTYPE, len(sparse_map))
            + _padded(sparse_map)
        )
    # old GNU sparse: a chain of extension blocks, each adding 21 map entries to a Python list
    block = b"00000000001\x0000000000001\x00" * 21 + b"\x01" + b"\0" * 7
    blocks = size // 512
    chain = block * (blocks - 1) + block[:504] + b"\0" * 8
    return _header("sparse.bin", tarfile.GNUTYPE_SPARSE, 0, extended=True) + chain


@pytest.mark.parametrize("kind", ["pax", "gnu-longname", "gnu-sparse", "pax-sparse"])
def test_archive_header_records_are_bounded_before_they_are_read(tmp_path, kind):
    """A few megabytes of gzip can declare a header record of gigabytes; tarfile reads such records
    into memory whole. The archive must be refused before that, whatever follows the record."""
    import gzip
    import tarfile
    import tracemalloc

    from edgerun.bundle import extract_archive
    from edgerun.errors import BundleError

    bundle = build_classifier_bundle(tmp_path / "bundle")
    members = b"".join(
        _header(f"bundle/{p.name}", tarfile.REGTYPE, p.stat().st_size) + _padded(p.read_bytes())
        for p in sorted(bundle.iterdir())
    )
    archive = tmp_path / "hostile.tar.gz"
    archive.write_bytes(gzip.compress(_hostile_prefix(kind, 16 << 20) + members + b"\0" * 1024, compresslevel=1))
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "out"
    dest.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="header record|sparse file"):
            extract_archive(archive, dest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB held while refusing a {archive.stat().st_size} byte archive"
    assert not any(dest.rglob("*"))


def _mutated(data: bytes, rng, headers: list[tuple[int, int]] | None = None) -> bytes:
    """``data`` with a few bytes flipped (mostly inside ``headers`` ranges when given), cut short, or with
    a chunk of itself copied in elsewhere."""
    out = bytearray(data)
    kind = rng.choice(["flip", "truncate", "duplicate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            start, end = rng.choice(headers) if headers and rng.random() < 0.7 else (0, len(out))
            out[rng.randrange(start, end)] ^= rng.randrange(1, 256)
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    else:
        start, at = rng.randrange(len(out)), rng.randrange(len(out) + 1)
        out[at:at] = out[start : start + rng.randint(1, 2048)]
    return bytes(out)


def test_damaged_archives_are_a_bundle_error_and_write_nowhere_else(tmp_path, load_options, monkeypatch):
    """Bytes flipped, cut or repeated in a bundle archive, in its gzip stream or in the tar inside it:
    each either still loads or is refused with a BundleError (a 400, previous version serving), never
    another exception (a 500, a crashed watcher), and nothing lands outside the extraction directory.
    Past the checksums only manifest.json can differ: load_model may then refuse with its SessionError.
    Guards extract_archive's error mapping (_ARCHIVE_ERRORS), its member checks and the 'data' filter."""
    import gzip
    import io
    import random
    import tarfile

    from edgerun.bundle import open_bundle
    from edgerun.errors import BundleError, SessionError
    from edgerun.loader import load_model

    archive = build_classifier_bundle(tmp_path / "packed", archive=True).with_suffix(".tar.gz")
    packed = archive.read_bytes()
    tar = gzip.decompress(packed)
    with tarfile.open(fileobj=io.BytesIO(tar)) as reader:  # pax and ustar header blocks of each member
        headers = [(m.offset, m.offset_data) for m in reader.getmembers()]
    cwd = tmp_path / "cwd"  # a relative path written outside the extraction directory would land here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(200):
        on_tar = case % 2 == 1
        data = gzip.compress(_mutated(tar, rng, headers), mtime=0) if on_tar else _mutated(packed, rng)
        sandbox = tmp_path / f"case{case}"
        (sandbox / "out").mkdir(parents=True)
        (sandbox / "b.tar.gz").write_bytes(data)
        try:
            bundle = open_bundle(sandbox / "b.tar.gz", workdir=sandbox / "out")
        except BundleError:
            outcomes["refused"] += 1
        else:
            try:  # checksums passed: what load_model refuses now is a manifest field the mutation changed
                load_model(bundle.root, load_options)
                outcomes["loaded"] += 1
            except (BundleError, SessionError):
                outcomes["refused"] += 1
        written = {p.relative_to(sandbox) for p in sandbox.rglob("*")} - {Path("b.tar.gz"), Path("out")}
        assert all(p.parts[0] == "out" for p in written), (case, sorted(written))
        assert not any(cwd.iterdir()), case
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 0, outcomes  # the mutations hit both ways


# ---- /v1/predict: an image format whose decoder is another program ----


def test_an_eps_image_is_never_handed_to_ghostscript(bundles, load_options, monkeypatch):
    """Pillow decodes EPS by running Ghostscript on the bytes: a PostScript program from the network."""
    from PIL import EpsImagePlugin

    ran = []

    def ghostscript(*args, **kwargs):
        ran.append(args)
        raise OSError("Ghostscript stand-in")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    repo = ModelRepository(load_options)
    repo.load(bundles["image"])
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n%%EndComments\n(/etc/passwd) (r) file\nshowpage\n"
    with TestClient(create_app(repo, ServerConfig()), base_url="http://127.0.0.1") as client:
        for headers in ({"Content-Type": "image/eps"}, {"Content-Type": "image/png"}, {}):
            refused = client.post("/v1/predict", content=eps, headers=headers)
            assert refused.status_code == 415, refused.text
            assert "EPS" in refused.json()["error"] and "PNG" in refused.json()["error"]
        files = {"file": ("a.png", eps, "image/png")}
        assert client.post("/v1/predict", files=files).status_code == 415
    assert ran == []


# ---- the HTTP layer of a real server: request heads without end ----


@pytest.mark.parametrize("shape", ["many headers", "one endless header", "endless URL"])
def test_a_request_head_without_end_is_refused_not_buffered(tmp_path, cache_dir, shape):
    """Without a limit the HTTP parser keeps every header byte in memory for as long as the client sends
    them (hundreds of MB per connection, before the token is even looked at)."""
    import json
    import socket

    from server_process import start_server, stop_server

    bundle = build_classifier_bundle(tmp_path / "clf")
    proc, url = start_server([str(bundle), "--token", "t0k"], cache_dir)
    try:
        port = int(url.rsplit(":", 1)[1])
        head, chunk = {
            "many headers": (b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Pad: " + b"a" * 1000 + b"\r\n"),
            "one endless header": (b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ", b"a" * 1024),
            "endless URL": (b"GET /v2?", b"a" * 1024),
        }[shape]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            try:
                for _ in range(16 * 1024):  # up to 16 MiB; the server answers and closes long before
                    sock.sendall(chunk)
            except OSError:  # closed by the server while sending: the refusal is waiting to be read
                pass
            answer = b""
            while data := sock.recv(65536):
                answer += data
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 431"), answer[:200]
        assert "header" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # still serving
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        stop_server(proc)


# ---- a hostile bundle: golden data that inflate ----


def test_golden_data_that_inflate_far_beyond_their_file_are_refused(tmp_path, load_options):
    """golden.npz is a zip: one deflated member of zeros unpacks a thousandfold (here 2 MiB -> 256 MiB;
    the same trick reaches any size), and every array was read into memory."""
    import io
    import zipfile

    from numpy.lib import format as npy
    from runtime_fixtures import classifier_golden, classifier_onnx

    from edgerun.errors import BundleError
    from edgerun.loader import load_model
    from edgerun.manifest import GoldenSpec

    buffer = io.BytesIO(classifier_golden())
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("padding.npy", "w", force_zip64=True) as member:
            npy.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (64 << 20,)})
            for _ in range(16):
                member.write(bytes(16 << 20))
    golden = buffer.getvalue()
    assert len(golden) < 2 << 20
    manifest = make_manifest("clf", **CLASSIFIER_IO, golden=GoldenSpec(path="golden.npz", atol=1e-4))
    bundle = write_bundle(tmp_path / "b", manifest, {"model.onnx": classifier_onnx(), "golden.npz": golden})
    with pytest.raises(BundleError, match="golden file 'golden.npz' unpacks to 268435"):
        load_model(bundle, load_options)


def _golden_over_16_mib(stored: int, deflated: int) -> bytes:
    """The classifier's golden data plus two arrays of zeros: ``stored`` bytes kept as they are (the file
    passes 16 MiB, where the limit turns from the 64 MiB floor to 4x the file) and ``deflated`` bytes
    that compress a thousandfold."""
    import io
    import zipfile

    from numpy.lib import format as npy
    from runtime_fixtures import classifier_golden

    buffer = io.BytesIO(classifier_golden())
    for name, size, method in (
        ("stored.npy", stored, zipfile.ZIP_STORED),
        ("deflated.npy", deflated, zipfile.ZIP_DEFLATED),
    ):
        with zipfile.ZipFile(buffer, "a", method) as archive, archive.open(name, "w", force_zip64=True) as member:
            npy.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
            for offset in range(0, size, 8 << 20):
                member.write(bytes(min(8 << 20, size - offset)))
    return buffer.getvalue()


def test_golden_data_over_16_mib_may_unpack_to_4x_their_file_and_no_more(tmp_path, load_options):
    """Past 16 MiB a golden file's limit is 4x its size, not the 64 MiB floor: a 16.5 MiB file (limit
    about 66 MiB) unpacking to 65.5 MiB loads, which the floor alone would refuse, and one unpacking to
    67.5 MiB does not. Guards golden._check_unpacked_size's MAX_GOLDEN_EXPANSION rule."""
    import io
    import zipfile

    from runtime_fixtures import classifier_onnx

    from edgerun.errors import BundleError
    from edgerun.golden import MIN_GOLDEN_UNPACKED_BYTES
    from edgerun.loader import load_model
    from edgerun.manifest import GoldenSpec

    manifest = make_manifest("clf", **CLASSIFIER_IO, golden=GoldenSpec(path="golden.npz", atol=1e-4))
    outcome: dict[str, object] = {}
    for name, deflated in (("fits", 49 << 20), ("over", 51 << 20)):
        golden = _golden_over_16_mib(stored=(16 << 20) + (512 << 10), deflated=deflated)
        with zipfile.ZipFile(io.BytesIO(golden)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
        limit = 4 * len(golden)  # the rule itself, not the constant: raising it must fail here
        assert 16 << 20 < len(golden) < 17 << 20 and unpacked > MIN_GOLDEN_UNPACKED_BYTES
        assert (unpacked <= limit) == (name == "fits"), (name, unpacked, limit)
        bundle = write_bundle(tmp_path / name, manifest, {"model.onnx": classifier_onnx(), "golden.npz": golden})
        try:
            outcome[name] = load_model(bundle, load_options).status.golden.passed
        except BundleError as exc:
            outcome[name] = str(exc)
    assert outcome["fits"] is True, outcome["fits"]
    assert f"unpacks to {unpacked} bytes from {len(golden)}, over the {limit} byte limit" in str(outcome["over"])


# ---- a hostile manifest: preprocessing that scales every image up to gigapixels ----


def _any_size_image_bundle(dest: Path, **preprocess) -> Path:
    """image [-1,1,H,W] (any H, W) -> mean brightness [-1,1], with ``preprocess`` written into its
    manifest as is (a hostile manifest, not one the builder would write)."""
    import json

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["mean"], axis=1),
        ],
        "mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = make_manifest(
        "big",
        inputs=[{"name": "image", "dtype": "float32", "shape": [-1, 1, -1, -1]}],
        outputs=[{"name": "mean", "dtype": "float32", "shape": [-1, 1]}],
        preprocess={"color": "L", "size": [4, 4]},
        postprocess={"type": "classification", "top_k": 1},
    )
    write_bundle(dest, manifest, {"model.onnx": model.SerializeToString()}, force=True)
    path = dest / "manifest.json"  # not covered by 'files': editable without breaking a checksum
    document = json.loads(path.read_text())
    document["preprocess"].update(preprocess)
    path.write_text(json.dumps(document))
    return dest


def test_a_model_input_size_over_the_pixel_limit_refuses_the_bundle(tmp_path, load_options):
    from edgerun.errors import BundleError
    from edgerun.loader import load_model

    with pytest.raises(BundleError, match="size .*over the 40000000 pixel limit"):
        load_model(_any_size_image_bundle(tmp_path / "b", size=[8000, 8000]), load_options)
    with pytest.raises(BundleError, match="resize_shorter .*over the 40000000 pixel limit"):
        load_model(_any_size_image_bundle(tmp_path / "c", resize="center-crop", resize_shorter=7000), load_options)


def test_a_center_crop_that_would_scale_an_image_past_the_pixel_limit_is_413(tmp_path, load_options):
    """A 1x320 model input lets a 1280x1 image through the aspect check; scaling its shorter side to
    320 first makes a 409600x320 (131 Mpx) intermediate, and the ratios reach terapixels."""
    import io

    from PIL import Image

    repo = ModelRepository(load_options)
    repo.load(_any_size_image_bundle(tmp_path / "b", size=[1, 320], resize="center-crop"))
    wide = io.BytesIO()
    Image.new("L", (1280, 1), 200).save(wide, "PNG")
    fits = io.BytesIO()
    Image.new("L", (640, 2), 200).save(fits, "PNG")
    with TestClient(create_app(repo, ServerConfig()), base_url="http://127.0.0.1") as client:
        refused = client.post("/v1/predict", content=wide.getvalue(), headers={"Content-Type": "image/png"})
        assert refused.status_code == 413, refused.text
        assert "409600x320" in refused.json()["error"]
        ok = client.post("/v1/predict", content=fits.getvalue(), headers={"Content-Type": "image/png"})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "manifest",
    ["[" * 100_000 + "]" * 100_000, '{"a": ' * 5000 + "1" + "}" * 5000, '{"format_version": 1' + "0" * 5000 + "}"],
    ids=["deep array", "deep object", "5000-digit number"],
)
def test_a_manifest_json_cannot_parse_is_a_400_not_a_500(repo_dir, load_options, manifest, caplog):
    hostile = repo_dir / "hostile"
    hostile.mkdir()
    (hostile / "manifest.json").write_text(manifest)
    with control_client(repo_dir, load_options) as client:
        with caplog.at_level(logging.ERROR, logger="edgerun"):
            refused = client.post("/v2/repository/models/clf/load", json={"parameters": {"bundle": "hostile"}})
        assert refused.status_code == 400, refused.text
        assert "manifest.json: not valid JSON" in refused.json()["error"]
        assert not [r for r in caplog.records if r.exc_info]


# ---- /v2 infer: JSON whose parsed form dwarfs the body ----


@pytest.mark.parametrize("value", [b"0.5", b"[]", b"{}"])
def test_json_tensors_are_bounded_in_values_before_they_are_parsed(bundles, load_options, value):
    """Every JSON value becomes a Python object of 30-70 bytes: a 63 MB body of '[],' held 2.5 GB once
    parsed, five times the memory limit the deployment sets, with one request."""
    from edgerun.protocol import MAX_JSON_VALUES

    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    count = MAX_JSON_VALUES + 8
    body = (
        b'{"inputs":[{"name":"x","shape":[%d,4],"datatype":"FP32","data":[' % (count // 4)
        + b",".join([value] * count)
        + b"]}]}"
    )
    with TestClient(create_app(repo, ServerConfig()), base_url="http://127.0.0.1") as client:
        refused = client.post("/v2/models/clf/infer", content=body, headers=JSON)
        assert refused.status_code == 413, refused.text[:300]
        error = refused.json()["error"]
        assert f"over the {MAX_JSON_VALUES}" in error and "binary" in error
        rows = MAX_JSON_VALUES // 8  # half the limit, as JSON numbers: still served
        fits = {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.5] * (rows * 4)}]}
        assert client.post("/v2/models/clf/infer", json=fits).status_code == 200


def test_a_json_body_over_the_value_limit_never_reaches_the_json_parser(bundles, load_options, monkeypatch):
    """The value bound is only worth something if it is checked on the raw bytes: once orjson has parsed
    the body, the memory is spent. Guards the count in protocol.decode_infer_request before orjson.loads."""
    import orjson

    from edgerun import protocol
    from edgerun.protocol import MAX_JSON_VALUES

    parsed: list[int] = []
    loads = orjson.loads

    def recording_loads(data):
        parsed.append(len(data))
        return loads(data)

    monkeypatch.setattr(protocol.orjson, "loads", recording_loads)
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    small = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[0.5,0.5,0.5,0.5]}]}'
    # Commas inside a string count too: 4 MiB of body, well under --max-body-mb, past the value limit.
    over = small[:-1] + b',"padding":"' + b"," * MAX_JSON_VALUES + b'"}'
    with TestClient(create_app(repo, ServerConfig()), base_url="http://127.0.0.1") as client:
        refused = client.post("/v2/models/clf/infer", content=over, headers=JSON)
        assert refused.status_code == 413, refused.text[:300]
        assert f"over the {MAX_JSON_VALUES}" in refused.json()["error"]
        assert parsed == []
        assert client.post("/v2/models/clf/infer", content=small, headers=JSON).status_code == 200
        assert parsed == [len(small)]


@pytest.mark.parametrize("enabled", [True, "1", "True"])
def test_an_enabled_engine_cache_without_a_path_stays_under_the_cache_dir(tmp_path, enabled):
    """TensorRT writes (and later loads) engines and timing caches in the working directory when a cache
    is enabled without a path: a bundle would put files outside --cache-dir, and read them back."""
    from edgerun.bundle import VerifiedFile
    from edgerun.manifest import ProviderSpec
    from edgerun.session import provider_chain

    trt = "TensorrtExecutionProvider"
    spec = ProviderSpec(name=trt, options={"trt_engine_cache_enable": enabled, "trt_timing_cache_enable": enabled})
    model = VerifiedFile("model.onnx", b"onnx", "ab" * 32)
    cache = tmp_path / "cache"
    options = dict(provider_chain([spec], model_file(), model, cache))[trt]
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        assert Path(options[key]).is_relative_to(cache), (key, options)
    without_cache_dir = dict(provider_chain([spec], model_file(), model, None))[trt]
    assert not {k: v for k, v in without_cache_dir.items() if "cache" in k}, without_cache_dir


def test_an_output_requested_twice_is_refused_not_encoded_twice(bundles, load_options):
    """Each entry of 'outputs' was encoded into the response: naming the output a thousand times turned
    a 1.6 MB request into a 1.2 GB response held in memory (and a 64 MB one into terabytes)."""
    import orjson

    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    rows = 100_000
    x = np.zeros((rows, 4), np.float32).tobytes()
    inputs = [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "parameters": {"binary_data_size": len(x)}}]
    with TestClient(create_app(repo, ServerConfig()), base_url="http://127.0.0.1") as client:
        for outputs in (
            [{"name": "probs"}, {"name": "probs"}],
            [{"name": "probs", "parameters": {"binary_data": True}}] * 1000,
        ):
            header = orjson.dumps({"inputs": inputs, "outputs": outputs})
            refused = client.post(
                "/v2/models/clf/infer",
                content=header + x,
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
            assert refused.status_code == 400, (len(refused.content), refused.text[:200])
            assert "output 'probs' is requested twice" in refused.json()["error"]


@pytest.mark.parametrize("sent", [b"", b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["nothing", "half a head"])
def test_a_connection_that_never_finishes_its_request_head_is_closed(tmp_path, cache_dir, sent):
    """Connections that send nothing, or half a request head, were kept open for ever: a few hundred of
    them use up the process's file descriptors and nobody else gets in (slowloris)."""
    import json
    import socket

    from server_process import start_server, stop_server

    bundle = build_classifier_bundle(tmp_path / "clf")
    proc, url = start_server([str(bundle), "--body-timeout", "1"], cache_dir)
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(sent)
            answer = b""
            while data := sock.recv(65536):
                answer += data
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), answer[:200]
        assert "request head" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    finally:
        stop_server(proc)


# ---- attacks the server already stood up to (kept as regression tests) ----


def _infer_body(shape, data=None, binary: bytes | None = None):
    import json

    item: dict = {"name": "x", "shape": shape, "datatype": "FP32"}
    if binary is None:
        item["data"] = data
        return json.dumps({"inputs": [item]}).encode(), {}
    item["parameters"] = {"binary_data_size": len(binary)}
    header = json.dumps({"inputs": [item]}).encode()
    return header + binary, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    "body, headers, status",
    [
        (b"[" * 100_000, JSON, 400),  # nesting: orjson's depth limit
        (*_infer_body([2**62, 2**62], [0.5] * 4), 400),  # shape product overflowing int64
        (*_infer_body([2**70, 4], [0.5] * 4), 400),  # a dimension past int64
        (*_infer_body([-1, 4], [0.5] * 4), 400),  # negative dimension
        (*_infer_body([2**61, 4], binary=bytes(16)), 400),  # binary size disagrees with the shape
        (*_infer_body([1, 4], binary=bytes(15)), 400),
        (*_infer_body([1, 4], [1e39] * 4), 400),  # overflows float32 to Inf
    ],
    ids=["deep", "shape-overflow", "huge-dim", "negative-dim", "binary-size", "binary-short", "fp32-inf"],
)
def test_hostile_tensors_are_4xx(bundles, load_options, body, headers, status):
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    with TestClient(create_app(repo, ServerConfig()), base_url="http://127.0.0.1") as client:
        answer = client.post("/v2/models/clf/infer", content=body, headers=headers)
        assert answer.status_code == status, answer.text[:300]
        assert answer.json()["error"]


def test_a_gzip_bomb_stops_at_the_body_limit(bundles, load_options):
    import gzip

    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    bomb = gzip.compress(b" " * (256 << 20), compresslevel=9)  # 256 MiB of spaces in ~250 KB
    with TestClient(create_app(repo, ServerConfig(max_body_mb=1)), base_url="http://127.0.0.1") as client:
        answer = client.post("/v2/models/clf/infer", content=bomb, headers={**JSON, "Content-Encoding": "gzip"})
        assert answer.status_code == 413 and "decompressed body" in answer.json()["error"]


def test_cross_site_pages_get_no_cors_grant_and_tokens_only_count_in_the_header(bundles, load_options):
    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    config = ServerConfig(token="s3cret-token")
    with TestClient(create_app(repo, config), base_url="http://127.0.0.1") as client:
        origin = {"Origin": "http://evil.example"}
        preflight = client.options("/v2/models/clf/infer", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code in (401, 405) and preflight.json()["error"]
        for answer in (preflight, client.get("/v2/health/live", headers=origin)):
            assert not [h for h in answer.headers if h.lower().startswith("access-control-")]
        for params in ({"token": "s3cret-token"}, {"access_token": "s3cret-token"}):
            assert client.get("/v2/models/clf", params=params).status_code == 401
        for wrong in ("Bearer s3cret-toke", "Bearer s3cret-token2", "Basic s3cret-token", "s3cret-token"):
            assert client.get("/v2/models/clf", headers={"Authorization": wrong}).status_code == 401
        assert client.get("/v2/models/clf", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_inference_and_admin_tokens_are_compared_in_constant_time(repo_dir, load_options, monkeypatch):
    """A comparison that stops at the first wrong byte lets a client on the network find a token byte by
    byte from response times. Guards guard.bearer_matches's hmac.compare_digest, which both the inference
    token (GuardMiddleware) and the admin token (routes.deps.model_control) go through."""
    import hmac
    import types

    from edgerun import guard

    compared: list[tuple[bytes, bytes]] = []

    def recording_compare(a, b):
        compared.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(guard, "hmac", types.SimpleNamespace(compare_digest=recording_compare))
    with control_client(repo_dir, load_options, token="infer-tok", admin_token="admin-tok") as client:
        for sent, status in (("infer-tok", 200), ("infer-tik", 401)):
            answer = client.get("/v2/models/clf", headers={"Authorization": f"Bearer {sent}"})
            assert answer.status_code == status, answer.text
        for sent, status in (("admin-tok", 200), ("admin-tik", 401)):
            answer = client.post("/v2/repository/models/clf/load", json={}, headers={"Authorization": f"Bearer {sent}"})
            assert answer.status_code == status, answer.text
    assert compared == [
        (b"infer-tok", b"infer-tok"),
        (b"infer-tik", b"infer-tok"),
        (b"admin-tok", b"admin-tok"),
        (b"admin-tik", b"admin-tok"),
    ]


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /v2 HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", b"GET /v 2 HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00"],
    ids=["header without colon", "space in target", "TLS hello"],
)
def test_requests_the_http_parser_refuses_get_the_error_body_too(tmp_path, cache_dir, request_bytes):
    import json
    import socket

    from server_process import start_server, stop_server

    bundle = build_classifier_bundle(tmp_path / "clf")
    proc, url = start_server([str(bundle)], cache_dir)
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(request_bytes)
            answer = b""
            while data := sock.recv(65536):
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
        assert "not valid HTTP" in json.loads(body)["error"]
    finally:
        stop_server(proc)


def test_a_model_with_an_ep_context_node_naming_an_engine_file_is_refused(tmp_path, load_options):
    """An EPContext node (embed_mode 0) makes TensorRT or QNN deserialize a precompiled engine from the
    path it names, relative to the working directory for a model made from bytes: code-like data that
    no checksum covers."""
    from onnx import TensorProto, helper

    from edgerun.errors import BundleError
    from edgerun.loader import load_model

    node = helper.make_node(
        "EPContext", ["x"], ["probs"], domain="com.microsoft", embed_mode=0, ep_cache_context="engine.bin"
    )
    graph = helper.make_graph(
        [node],
        "ctx",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    manifest = make_manifest("clf", **CLASSIFIER_IO)
    bundle = write_bundle(tmp_path / "b", manifest, {"model.onnx": model.SerializeToString()}, force=True)
    with pytest.raises(BundleError, match="EPContext"):
        load_model(bundle, load_options)
