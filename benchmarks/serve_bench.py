"""Serving overhead, side by side, in one run: in-process ``session.run`` vs the edgerun server.

    python benchmarks/serve_bench.py MODEL.onnx|BUNDLE_DIR [--requests 1000] [--clients 8] [--json]

Measures (batch 1): in-process p50 and sequential throughput; server cold start
(launch -> ready, --no-bench); tritonclient binary p50; throughput with N concurrent binary
clients; tritonclient JSON p50; server RSS after >= 1000 requests. Prints ratios against the
targets (binary p50 <= in-process + 1 ms, N-client throughput >= 0.9x in-process sequential,
RSS <= 150 MB, cold start <= 1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROUNDS = 5  # in-process and HTTP measurements alternate in this many blocks
DYNAMIC_DIM = 16  # stand-in for dynamic non-batch dims (sequence length) when benchmarking a bare .onnx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bundle_from_onnx(model: Path, dest: Path) -> Path:
    """Wrap a bare .onnx in a bundle (no golden data) so the server can load it."""
    import onnxruntime as ort

    from edgebuild.bundle import write_bundle
    from edgerun.manifest import Manifest, ModelFile, TensorSpec
    from edgerun.session import _ORT_TYPES

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def spec(node):
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        return TensorSpec(name=node.name, dtype=np.dtype(_ORT_TYPES[node.type]).name, shape=shape)

    manifest = Manifest(
        format_version=1,
        name=model.stem.replace("_", "-"),
        created="benchmark",
        model=ModelFile(path="model.onnx", sha256="", size_bytes=0, precision="fp32", opset=0),
        inputs=[spec(n) for n in session.get_inputs()],
        outputs=[spec(n) for n in session.get_outputs()],
    )
    return write_bundle(dest, manifest, {"model.onnx": model})


def example_inputs(specs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in specs:
        shape = [1 if (j == 0 and d < 0) else (d if d > 0 else DYNAMIC_DIM) for j, d in enumerate(spec.shape)]
        dtype = np.dtype(spec.dtype)
        feeds[spec.name] = rng.normal(size=shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype=dtype)
    return feeds


def percentile_ms(samples: list[float], q: float = 50) -> float:
    return float(np.percentile(np.array(samples) * 1000.0, q))


def time_calls(call, n: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def run_clients(url: str, name: str, make_inputs, clients: int, per_client: int) -> float:
    """Seconds for ``clients`` threads, each with its own connection, to send ``per_client`` requests."""
    import tritonclient.http as httpclient

    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def worker():
        own = httpclient.InferenceServerClient(url=url)
        inputs, outputs = make_inputs(True)
        own.infer(name, inputs, outputs=outputs)
        barrier.wait()
        try:
            for _ in range(per_client):
                own.infer(name, inputs, outputs=outputs)
        except BaseException as exc:  # reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"concurrent clients failed: {errors[0]}")
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an .onnx file or a bundle directory")
    parser.add_argument("--requests", type=int, default=1000, help="binary requests for p50 (and RSS)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json-requests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: fit the box)")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    import tritonclient.http as httpclient

    from edgerun.loader import LoadOptions, load_model

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    bundle = args.model if args.model.is_dir() else bundle_from_onnx(args.model, work / "bundle")
    cache_dir = work / "cache"

    # 1. In-process: the same session the server builds (options, threads), no HTTP. It is measured
    # in blocks interleaved with the HTTP blocks below, so both see the same machine load.
    served = load_model(bundle, LoadOptions(cache_dir=cache_dir, bench=False, threads=args.threads))
    feeds = example_inputs(served.session.inputs)
    run = served.session.session.run
    names = served.session.output_names
    name = served.name
    del served

    # 2. Cold start: launch -> /v2/health/ready == 200.
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "edgerun.cli",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--no-bench",
        "--cache-dir",
        str(cache_dir),
        "--log-level",
        "warning",
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"127.0.0.1:{port}"
    try:
        client = httpclient.InferenceServerClient(url=url)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
            try:
                if client.is_server_ready():
                    break
            except Exception:
                time.sleep(0.005)
        cold_start_s = time.perf_counter() - started

        def make_inputs(binary: bool):
            tensors = []
            for spec_name, value in feeds.items():
                tensor = httpclient.InferInput(
                    spec_name,
                    list(value.shape),
                    {
                        "float32": "FP32",
                        "float16": "FP16",
                        "int64": "INT64",
                        "int32": "INT32",
                        "uint8": "UINT8",
                        "bool": "BOOL",
                    }[value.dtype.name],
                )
                tensor.set_data_from_numpy(value, binary_data=binary)
                tensors.append(tensor)
            return tensors, [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]

        # 3. Binary vs in-process, sequential, in interleaved blocks.
        binary_inputs, binary_outputs = make_inputs(True)
        block = max(10, args.requests // ROUNDS)
        inproc, binary = [], []
        for _ in range(ROUNDS):
            inproc += time_calls(lambda: run(names, feeds), block, warmup=3)
            binary += time_calls(lambda: client.infer(name, binary_inputs, outputs=binary_outputs), block, warmup=3)
        inproc_p50, binary_p50 = percentile_ms(inproc), percentile_ms(binary)
        binary_tput = len(binary) / sum(binary)

        # 4. N concurrent binary clients (own connection each) vs in-process sequential, interleaved.
        per_client = max(1, args.requests // args.clients // ROUNDS)
        concurrent_time = inproc_time = 0.0
        for _ in range(ROUNDS):
            inproc_time += sum(time_calls(lambda: run(names, feeds), per_client * args.clients, warmup=0))
            concurrent_time += run_clients(url, name, make_inputs, args.clients, per_client)
        concurrent_tput = ROUNDS * per_client * args.clients / concurrent_time
        inproc_seq_tput = ROUNDS * per_client * args.clients / inproc_time

        # 5. JSON, sequential.
        json_inputs, json_outputs = make_inputs(False)
        json_times = time_calls(
            lambda: client.infer(name, json_inputs, outputs=json_outputs), args.json_requests, warmup=3
        )
        json_p50 = percentile_ms(json_times)

        # 6. RSS after all of the above (>= 1000 requests when --requests >= 500).
        served_requests = len(binary) + ROUNDS * (per_client + 1) * args.clients + args.json_requests + 3 * ROUNDS + 3
        rss = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    numbers = {
        "model": str(args.model),
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "inprocess_p50_ms": round(inproc_p50, 3),
        "binary_p50_ms": round(binary_p50, 3),
        "binary_sequential_throughput_per_s": round(binary_tput, 1),
        f"binary_{args.clients}_clients_throughput_per_s": round(concurrent_tput, 1),
        "json_p50_ms": round(json_p50, 3),
        "server_rss_mb": round(rss, 1),
        "requests_served": served_requests,
        "cold_start_s": round(cold_start_s, 3),
        "binary_overhead_ms": round(binary_p50 - inproc_p50, 3),
        "inprocess_sequential_throughput_per_s": round(inproc_seq_tput, 1),
        "concurrent_vs_inprocess": round(concurrent_tput / inproc_seq_tput, 3),
    }
    checks = {
        "binary p50 <= in-process + 1 ms": numbers["binary_overhead_ms"] <= 1.0,
        f"{args.clients}-client throughput >= 0.9x in-process": numbers["concurrent_vs_inprocess"] >= 0.9,
        "RSS <= 150 MB": rss <= 150,
        "cold start <= 1 s": cold_start_s <= 1.0,
    }
    if args.as_json:
        print(json.dumps({**numbers, "targets": checks}, indent=2))
        return 0
    print(f"model {args.model}  inputs {numbers['inputs']}  ({os.cpu_count()} CPUs)")
    print(f"  in-process session.run    p50 {inproc_p50:8.3f} ms   {inproc_seq_tput:8.1f}/s sequential")
    print(
        f"  HTTP binary (tritonclient) p50 {binary_p50:8.3f} ms   {binary_tput:8.1f}/s sequential  "
        f"(+{numbers['binary_overhead_ms']:.3f} ms)"
    )
    print(
        f"  HTTP binary, {args.clients} clients              {concurrent_tput:8.1f}/s  "
        f"({numbers['concurrent_vs_inprocess']:.2f}x in-process sequential)"
    )
    print(f"  HTTP JSON                  p50 {json_p50:8.3f} ms   ({json_p50 / inproc_p50:.1f}x in-process)")
    print(f"  server RSS after {served_requests} requests: {rss:.1f} MB")
    print(f"  cold start (launch -> ready, --no-bench): {cold_start_s:.3f} s")
    for label, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISS'}] {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
