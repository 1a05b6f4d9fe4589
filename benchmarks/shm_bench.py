"""A camera frame through each door, side by side: REST and gRPC, with the frame in the request or in
system shared memory.

    python benchmarks/shm_bench.py [--requests 300]

The model is built in code and costs next to nothing (a mean over each channel of a 1x3x640x640 FP32
frame, 4.9 MB), so the p50 is the door's own cost of moving the frame. One ``edgerun serve --grpc-port
--allow-shm`` process; ``tritonclient`` clients in this process; the three doors alternate in rounds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ROUNDS, _env, _free_port, p50_ms, time_calls

SHAPE = [1, 3, 640, 640]


def build_bundle(dest: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.bundle import write_bundle
    from edgerun.manifest import Manifest, ModelFile, TensorSpec

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["frame", "axes"], ["means"], keepdims=0)],
        "frame_means",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    manifest = Manifest(
        format_version=1,
        name="frame",
        created="benchmark",
        model=ModelFile(path="model.onnx", sha256="", size_bytes=0, precision="fp32", opset=18),
        inputs=[TensorSpec(name="frame", dtype="float32", shape=SHAPE)],
        outputs=[TensorSpec(name="means", dtype="float32", shape=[1, 3])],
    )
    return write_bundle(dest, manifest, {"model.onnx": model.SerializeToString()}, force=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per door (split in rounds)")
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    work = Path(tempfile.mkdtemp(prefix="shm-bench-"))
    bundle = build_bundle(work / "frame")
    port, grpc_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "edgerun.cli", "serve", str(bundle), "--no-bench", "--port", str(port)]
    command += ["--grpc-port", str(grpc_port), "--allow-shm", "--cache-dir", str(work / "cache")]
    command += ["--log-level", "warning"]
    proc = subprocess.Popen(command, env=_env(), stderr=subprocess.DEVNULL)
    rest = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    while True:
        try:
            if grpc.is_server_ready() and rest.is_server_ready():
                break
        except Exception:  # noqa: BLE001 - readiness polling
            time.sleep(0.05)
    frame = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    region = shm.create_shared_memory_region("frame", "/edgerun_bench_frame", frame.nbytes)
    try:
        shm.set_shared_memory_region(region, [frame])
        grpc.register_system_shared_memory("frame", "/edgerun_bench_frame", frame.nbytes)
        rest_in = httpclient.InferInput("frame", SHAPE, "FP32")
        rest_in.set_data_from_numpy(frame, binary_data=True)
        grpc_in = grpcclient.InferInput("frame", SHAPE, "FP32")
        grpc_in.set_data_from_numpy(frame)
        shm_in = grpcclient.InferInput("frame", SHAPE, "FP32")
        shm_in.set_shared_memory("frame", frame.nbytes)
        rest_shm_in = httpclient.InferInput("frame", SHAPE, "FP32")
        rest_shm_in.set_shared_memory("frame", frame.nbytes)
        calls = {
            "REST, binary tensor": lambda: rest.infer("frame", [rest_in]),
            "REST, system shared memory": lambda: rest.infer("frame", [rest_shm_in]),
            "gRPC, raw_input_contents": lambda: grpc.infer("frame", [grpc_in]),
            "gRPC, system shared memory": lambda: grpc.infer("frame", [shm_in]),
        }
        expected = frame.mean(axis=(2, 3))
        for call in calls.values():  # the same answer through every door
            np.testing.assert_allclose(call().as_numpy("means"), expected, rtol=1e-5)
        times: dict[str, list[float]] = {label: [] for label in calls}
        block = max(10, args.requests // ROUNDS)
        for _ in range(ROUNDS):
            for label, call in calls.items():
                times[label] += time_calls(call, block)
        grpc.unregister_system_shared_memory("frame")
    finally:
        shm.destroy_shared_memory_region(region)
        proc.terminate()
        proc.wait(timeout=30)
    rest_p50 = p50_ms(times["REST, binary tensor"])
    print(f"1x3x640x640 FP32 frame ({frame.nbytes} bytes), p50 of {block * ROUNDS} requests per door:")
    for label, samples in times.items():
        p50 = p50_ms(samples)
        print(f"  {label:<28} {p50:8.3f} ms  ({p50 / rest_p50:.2f}x REST)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
