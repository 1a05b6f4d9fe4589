"""System shared memory: one test per refusal class (Triton's CVE history is the threat model), and a
round trip with ``tritonclient.utils.shared_memory`` over gRPC."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgerun.errors import ForbiddenError, RequestError
from edgerun.shm import SharedMemory

KEY = "edgerun_test"


def _segment(folder, key: str = KEY, size: int = 64, mode: int = 0o600):
    path = folder / key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    os.ftruncate(fd, size)
    os.close(fd)
    os.chmod(path, mode)  # the umask must not decide the mode under test
    return path


@pytest.fixture()
def shm(tmp_path):
    memory = SharedMemory("edgerun", shm_dir=tmp_path)
    yield memory
    memory.close()


def _refusal(call) -> Exception:
    with pytest.raises((RequestError, ForbiddenError)) as refused:
        call()
    assert KEY not in str(refused.value)  # keys are never echoed
    return refused.value


def test_register_read_write_unregister(shm, tmp_path):
    path = _segment(tmp_path)
    shm.register("in", "/" + KEY, 8, 32)
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(np.arange(8, dtype=np.float32).tobytes())
    data = shm.read("in", 0, 32)
    assert np.frombuffer(data, np.float32).tolist() == list(range(8))
    shm.write("in", 16, 16, b"\x01" * 16)
    assert path.read_bytes()[24:40] == b"\x01" * 16
    assert [r.name for r in shm.status()] == ["in"]
    shm.unregister("in")
    assert "no shared-memory region named 'in'" in str(_refusal(lambda: shm.read("in", 0, 4)))


def test_unknown_key(shm):
    assert "no shared-memory segment" in str(_refusal(lambda: shm.register("r", KEY, 0, 8)))


@pytest.mark.parametrize("key", ["other_key", "../" + KEY, "edgerun/../x", "..", "/", "edgerun\x00x", ""])
def test_keys_outside_the_prefix_or_not_one_component(shm, key):
    assert isinstance(_refusal(lambda: shm.register("r", key, 0, 8)), ForbiddenError)


def test_symlinks_are_not_followed(shm, tmp_path):
    target = _segment(tmp_path, "edgerun_target")
    (tmp_path / KEY).symlink_to(target)
    _refusal(lambda: shm.register("r", KEY, 0, 8))


def test_a_fifo_under_the_key_neither_blocks_nor_maps(shm, tmp_path):
    os.mkfifo(tmp_path / KEY, 0o600)
    assert "not a regular" in str(_refusal(lambda: shm.register("r", KEY, 0, 8)))


def test_mode_other_than_0600(shm, tmp_path):
    _segment(tmp_path, mode=0o644)
    assert "mode 0600" in str(_refusal(lambda: shm.register("r", KEY, 0, 8)))


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_another_users_segment(shm, tmp_path):
    path = _segment(tmp_path)
    os.chown(path, 65534, 65534)
    assert "another user" in str(_refusal(lambda: shm.register("r", KEY, 0, 8)))


def test_region_too_small(shm, tmp_path):
    _segment(tmp_path, size=16)
    assert "needs 24" in str(_refusal(lambda: shm.register("r", KEY, 8, 16)))


@pytest.mark.parametrize(("offset", "size"), [(2**62, 2**62), (-1, 8), (0, 0), (0, -8), (True, 8), (0.5, 8)])
def test_register_offsets_and_sizes_are_checked(shm, tmp_path, offset, size):
    _segment(tmp_path)
    _refusal(lambda: shm.register("r", KEY, offset, size))


@pytest.mark.parametrize(("offset", "size"), [(2**63, 2**63), (60, 8), (-4, 4), (0, 65)])
def test_every_access_is_bounds_checked(shm, tmp_path, offset, size):
    _segment(tmp_path)
    shm.register("r", KEY, 0, 64)
    _refusal(lambda: shm.read("r", offset, size))
    _refusal(lambda: shm.write("r", offset, size, b""))


def test_a_write_larger_than_its_window(shm, tmp_path):
    _segment(tmp_path)
    shm.register("r", KEY, 0, 64)
    _refusal(lambda: shm.write("r", 0, 4, b"12345678"))


def test_names_are_registered_once(shm, tmp_path):
    _segment(tmp_path)
    shm.register("r", KEY, 0, 8)
    assert "already registered" in str(_refusal(lambda: shm.register("r", KEY, 0, 8)))


def test_close_unmaps_every_region(shm, tmp_path):
    _segment(tmp_path)
    shm.register("r", KEY, 0, 8)
    region = shm.status("r")[0]
    shm.close()
    assert region.buffer.closed and shm.status() == []


# ---- over gRPC, with tritonclient's own shared-memory helpers ----


def test_grpc_inputs_and_outputs_by_region_equal_the_plain_request(bundles, tmp_path):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    shm_utils = pytest.importorskip("tritonclient.utils.shared_memory")
    from runtime_fixtures import free_port
    from server_process import start_server, stop_server
    from tritonclient.utils import InferenceServerException

    grpc_port = free_port()
    proc, _ = start_server(
        [str(bundles["classifier"]), "--grpc-port", str(grpc_port), "--allow-shm"], tmp_path / "cache"
    )
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    inp = shm_utils.create_shared_memory_region("in", f"/{KEY}_in", x.nbytes)
    out = shm_utils.create_shared_memory_region("out", f"/{KEY}_out", 2 * 3 * 4)
    try:
        shm_utils.set_shared_memory_region(inp, [x])
        client.register_system_shared_memory("in", f"/{KEY}_in", x.nbytes)
        client.register_system_shared_memory("out", f"/{KEY}_out", 24)
        status = client.get_system_shared_memory_status(as_json=True)
        assert set(status["regions"]) == {"in", "out"}
        tensor = grpcclient.InferInput("x", [2, 4], "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        wanted = grpcclient.InferRequestedOutput("probs")
        wanted.set_shared_memory("out", 24)
        result = client.infer("clf", [tensor], outputs=[wanted])
        output = result.get_output("probs")
        assert output.parameters["shared_memory_region"].string_param == "out"
        by_region = shm_utils.get_contents_as_numpy(out, np.float32, [2, 3])
        plain = grpcclient.InferInput("x", [2, 4], "FP32")
        plain.set_data_from_numpy(x)
        assert client.infer("clf", [plain]).as_numpy("probs").tobytes() == by_region.tobytes()
        client.unregister_system_shared_memory("in")
        with pytest.raises(InferenceServerException) as gone:
            client.infer("clf", [tensor])
        assert gone.value.status() == "StatusCode.INVALID_ARGUMENT" and "'in'" in gone.value.message()
        with pytest.raises(InferenceServerException) as small:
            client.register_system_shared_memory("big", f"/{KEY}_in", x.nbytes * 2)
        assert "needs" in small.value.message() and KEY not in small.value.message()
    finally:
        client.close()
        stop_server(proc)
        shm_utils.destroy_shared_memory_region(inp)
        shm_utils.destroy_shared_memory_region(out)


def test_grpc_shared_memory_is_off_unless_asked(bundles, tmp_path):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from runtime_fixtures import free_port
    from server_process import start_server, stop_server
    from tritonclient.utils import InferenceServerException

    grpc_port = free_port()
    proc, _ = start_server([str(bundles["classifier"]), "--grpc-port", str(grpc_port)], tmp_path / "cache")
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.register_system_shared_memory("in", f"/{KEY}_x", 8)
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED" and "--allow-shm" in refused.value.message()
        tensor = grpcclient.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory("in", 16)
        with pytest.raises(InferenceServerException) as by_region:
            client.infer("clf", [tensor])
        assert by_region.value.status() == "StatusCode.PERMISSION_DENIED"
    finally:
        client.close()
        stop_server(proc)


def test_rest_inputs_and_outputs_by_region_equal_the_binary_request(bundles, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http")
    shm_utils = pytest.importorskip("tritonclient.utils.shared_memory")
    from server_process import start_server, stop_server
    from tritonclient.utils import InferenceServerException

    proc, url = start_server([str(bundles["classifier"]), "--allow-shm"], tmp_path / "cache")
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    x = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    inp = shm_utils.create_shared_memory_region("in", f"/{KEY}_rin", x.nbytes)
    out = shm_utils.create_shared_memory_region("out", f"/{KEY}_rout", 24)
    try:
        shm_utils.set_shared_memory_region(inp, [x])
        client.register_system_shared_memory("in", f"/{KEY}_rin", x.nbytes)
        client.register_system_shared_memory("out", f"/{KEY}_rout", 24)
        assert {r["name"] for r in client.get_system_shared_memory_status()} == {"in", "out"}
        tensor = httpclient.InferInput("x", [2, 4], "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        wanted = httpclient.InferRequestedOutput("probs")
        wanted.set_shared_memory("out", 24)
        result = client.infer("clf", [tensor], outputs=[wanted])
        assert result.get_output("probs")["parameters"]["shared_memory_region"] == "out"
        by_region = shm_utils.get_contents_as_numpy(out, np.float32, [2, 3])
        plain = httpclient.InferInput("x", [2, 4], "FP32")
        plain.set_data_from_numpy(x, binary_data=True)
        assert client.infer("clf", [plain]).as_numpy("probs").tobytes() == by_region.tobytes()
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
        with pytest.raises(InferenceServerException) as gone:
            client.infer("clf", [tensor])
        assert "no shared-memory region named 'in'" in gone.value.message()
    finally:
        stop_server(proc)
        shm_utils.destroy_shared_memory_region(inp)
        shm_utils.destroy_shared_memory_region(out)


def test_rest_shared_memory_is_off_unless_asked(bundles, load_options):
    from fastapi.testclient import TestClient

    from edgerun.reload import ModelRepository
    from edgerun.server import ServerConfig, create_app

    repo = ModelRepository(load_options)
    repo.load(bundles["classifier"])
    with TestClient(create_app(repo, ServerConfig())) as client:
        refused = client.post("/v2/systemsharedmemory/region/in/register", json={"key": KEY, "byte_size": 8})
        assert refused.status_code == 403 and "--allow-shm" in refused.json()["error"]
        body = {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": 16},
                }
            ]
        }
        by_region = client.post("/v2/models/clf/infer", json=body)
        assert by_region.status_code == 403 and "--allow-shm" in by_region.json()["error"]
    with TestClient(create_app(repo, ServerConfig(allow_shm=True))) as client:
        # TestClient's peer is not a loopback address: on, but not for it.
        remote = client.get("/v2/systemsharedmemory/status")
        assert remote.status_code == 403 and "clients on this host" in remote.json()["error"]
