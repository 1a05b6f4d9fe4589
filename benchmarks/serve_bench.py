"""Serving at the box's limit, side by side, in one run.

    python benchmarks/serve_bench.py [BUNDLE_DIR|MODEL.onnx] [--requests 1000] [--clients 8] [--grpc] [--json]

Without a model it builds one: torchvision ``mobilenet_v2`` (weights=None) packed with
``edgebuild pack ... --quantize none`` (FP32, golden data included). Then, batch 1, client
``tritonclient.http`` binary tensors in this process:

- edgerun (default flags: the self-benchmark picks the layout; and ``--optimize throughput`` when
  that picks another layout) with N concurrent clients;
- the box's limit: the best in-process layout (edgerun's own candidates: N sessions x T threads,
  R runs at once per session, spinning; each run slot back to back from its own thread, no HTTP) and the transport floor
  (the same clients against a bare ASGI app on uvicorn that reads the body and answers a canned
  reply of the same size), combined as 1 / (1/a + 1/b) since both share the same cores;
- one client: edgerun's p50 split into in-process p50 (a session with the served layout's threads
  and spinning) + the transport floor's p50 + edgerun's own;
- start-up to ready with the self-benchmark (fresh cache), cold start with ``--no-bench``
  (fresh cache), server RSS after >= 1000 requests, JSON p50 for reference;
- with ``--grpc``: the same through edgerun's gRPC door (``tritonclient.grpc``), against the gRPC
  transport floor (a bare ``grpc.aio`` server answering a canned ``ModelInferResponse`` of the same size).

In-process, transport and edgerun blocks alternate in rounds so machine load hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

ROUNDS = 3  # measurements alternate in this many blocks
DATATYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8", "bool": "BOOL"}
DYNAMIC_DIM = 16  # stand-in for dynamic non-batch dims (sequence length) when benchmarking a bare .onnx
REPO = Path(__file__).resolve().parents[1]

TVMODEL_SOURCE = """
import torch, torchvision

def mobilenet_v2():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    model.example_inputs = (torch.randn(1, 3, 224, 224),)
    return model
"""

# A bare ASGI app: read the whole body, answer the canned reply. argv: port, reply file, header length.
BARE_APP = textwrap.dedent(
    """
    import sys, uvicorn
    port, reply, header = int(sys.argv[1]), open(sys.argv[2], "rb").read(), sys.argv[3].encode()
    start = {"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"), (b"inference-header-content-length", header),
        (b"content-length", str(len(reply)).encode())]}
    empty = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        if scope["method"] == "GET":
            await send(empty)
            await send({"type": "http.response.body", "body": b""})
            return
        await send(start)
        await send({"type": "http.response.body", "body": reply})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="auto", http="auto", lifespan="off",
                log_level="warning", access_log=False)
    """
)


# A bare gRPC server: ServerReady, and ModelInfer answering a canned reply. argv: port, reply file.
BARE_GRPC_APP = textwrap.dedent(
    """
    import asyncio, sys, grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    port, canned = int(sys.argv[1]), service_pb2.ModelInferResponse.FromString(open(sys.argv[2], "rb").read())

    class Bare(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        async def ModelInfer(self, request, context):
            return canned

    async def main():
        limit = 64 << 20
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    try:
        import uvloop  # as edgerun's server runs
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    """This checkout's sources first, for every subprocess."""
    paths = [str(REPO / "builder"), str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def build_mobilenet_bundle(work: Path) -> Path:
    """torchvision mobilenet_v2 (weights=None), packed FP32 by edgebuild (nothing downloaded)."""
    module_dir = work / "models"
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / "tvmodels.py").write_text(TVMODEL_SOURCE)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(module_dir), env["PYTHONPATH"]])
    command = [
        sys.executable,
        "-m",
        "edgebuild.cli",
        "pack",
        "tvmodels:mobilenet_v2",
        "--quantize",
        "none",
        "--calib-data",
        "random",
        "--calib-samples",
        "8",
        "--val-samples",
        "8",
        "--max-accuracy-drop",
        "100%",
        "-o",
        str(work / "dist"),
        "--force",
    ]
    print("building the benchmark bundle:", " ".join(command[2:]), file=sys.stderr)
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    if out.returncode != 0:
        raise SystemExit(f"pack failed ({out.returncode}): {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


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


def p50_ms(samples: list[float]) -> float:
    return float(np.percentile(np.array(samples) * 1000.0, 50))


def time_calls(call, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def parallel_seconds(factories: list, per_worker: int) -> float:
    """Seconds for one thread per factory to call what it makes ``per_worker`` times (started
    together). The call is made inside its thread: tritonclient's connections belong to one thread."""
    barrier = threading.Barrier(len(factories) + 1)
    errors: list[BaseException] = []

    def worker(factory):
        call = factory()
        call()  # warm: first call allocates / connects
        barrier.wait()
        try:
            for _ in range(per_worker):
                call()
        except BaseException as exc:  # noqa: BLE001 - reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(factory,)) for factory in factories]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"concurrent calls failed: {errors[0]!r}")
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Server:
    """A server subprocess and the seconds from launch to ready (over HTTP, or gRPC with ``grpc``)."""

    def __init__(self, command: list[str], url: str, grpc: bool = False):
        if grpc:
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module

        started = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        self.url = url
        client = client_module.InferenceServerClient(url=url)
        while True:
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"server exited: {stderr[-2000:]}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - readiness polling: any failure means not ready yet
                time.sleep(0.005)
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def edgerun_command(bundle: Path, port: int, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgerun.cli",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--cache-dir",
        str(cache_dir),
        "--log-level",
        "warning",
        *extra,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", help="a bundle directory or an .onnx (default: build one)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement (split in rounds)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json-requests", type=int, default=20)
    parser.add_argument("--grpc", action="store_true", help="also measure the gRPC door (--grpc-port)")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    import tritonclient.http as httpclient

    from edgerun.layout import LayoutRequest, candidate_layouts, create_instance, run_slots
    from edgerun.loader import LoadOptions, load_model
    from edgerun.manifest import ProviderSpec
    from edgerun.protocol import encode_infer_response
    from edgerun.threads import choose_threads

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.model is None:
        bundle = build_mobilenet_bundle(work)
    else:
        bundle = args.model if args.model.is_dir() else bundle_from_onnx(args.model, work / "bundle")

    # 1. Servers: edgerun with the self-benchmark (fresh cache), then the bare transport app.
    template = load_model(bundle, LoadOptions(cache_dir=work / "inproc", bench=False, threads=1))
    name = template.name
    port = _free_port()
    grpc_port = _free_port()
    extra = ["--grpc-port", str(grpc_port)] if args.grpc else []
    edgerun = Server(edgerun_command(bundle, port, work / "cache", *extra), f"127.0.0.1:{port}")
    edgerun_grpc_url = f"127.0.0.1:{grpc_port}"
    startup_bench_s = edgerun.ready_s
    client = httpclient.InferenceServerClient(url=edgerun.url)
    served_layout = client.get_model_metadata(name)["parameters"]["layout"]
    # The same measurements chosen for throughput (shared cache: nothing is measured again).
    port = _free_port()
    started = Server(edgerun_command(bundle, port, work / "cache", "--optimize", "throughput"), f"127.0.0.1:{port}")
    tput_layout = httpclient.InferenceServerClient(url=started.url).get_model_metadata(name)["parameters"]["layout"]
    tput_server: Server | None = started
    if tput_layout["label"] == served_layout["label"]:
        started.stop()
        tput_server = None

    feeds = example_inputs(template.session.inputs)
    names = template.session.output_names
    outputs_like = {
        n: np.zeros([1 if d < 0 else d for d in s.shape], np.dtype(s.dtype))
        for n, s in zip(names, template.session.outputs)
    }
    reply, headers, _ = encode_infer_response(name, "1", None, outputs_like, [(n, True) for n in names])
    (work / "reply.bin").write_bytes(reply)
    bare_port = _free_port()
    bare = Server(
        [
            sys.executable,
            "-c",
            BARE_APP,
            str(bare_port),
            str(work / "reply.bin"),
            headers["Inference-Header-Content-Length"],
        ],
        f"127.0.0.1:{bare_port}",
    )
    bare_grpc: Server | None = None
    if args.grpc:
        from tritonclient.grpc import service_pb2

        canned = service_pb2.ModelInferResponse(model_name=name, model_version="1")
        for n, value in outputs_like.items():
            canned.outputs.add(name=n, datatype=DATATYPES[value.dtype.name], shape=list(value.shape))
            canned.raw_output_contents.append(value.tobytes())
        (work / "reply.pb").write_bytes(canned.SerializeToString())
        grpc_bare_port = _free_port()
        bare_grpc = Server(
            [sys.executable, "-c", BARE_GRPC_APP, str(grpc_bare_port), str(work / "reply.pb")],
            f"127.0.0.1:{grpc_bare_port}",
            grpc=True,
        )

    # In-process sessions: every candidate layout edgerun considers, built the way edgerun builds them.
    model = template.bundle.verified_file(template.session.variant.path)  # read and hashed once
    budget = choose_threads().threads
    layouts = candidate_layouts(budget, LayoutRequest())
    sessions: dict[tuple[int, bool], list] = {}
    for layout in layouts:
        have = sessions.setdefault((layout.threads, layout.spinning), [])
        while len(have) < layout.instances:
            have.append(
                create_instance(
                    model,
                    template.session,
                    [ProviderSpec(name="CPUExecutionProvider")],
                    layout.threads,
                    layout.spinning,
                    None,
                )
            )

    def inproc_call(session):
        raw = session.session.run
        return lambda: raw(names, feeds)

    def make_inputs(binary: bool):
        tensors = []
        for spec_name, value in feeds.items():
            datatype = DATATYPES[value.dtype.name]
            tensor = httpclient.InferInput(spec_name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value, binary_data=binary)
            tensors.append(tensor)
        return tensors, [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]

    def http_call(url: str):
        own = httpclient.InferenceServerClient(url=url)
        inputs, outputs = make_inputs(True)
        return lambda: own.infer(name, inputs, outputs=outputs)

    def grpc_call(url: str):
        import tritonclient.grpc as grpcclient

        own = grpcclient.InferenceServerClient(url=url)
        inputs = []
        for spec_name, value in feeds.items():
            tensor = grpcclient.InferInput(spec_name, list(value.shape), DATATYPES[value.dtype.name])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return lambda: own.infer(name, inputs)

    served_requests = 0
    try:
        # 2. Concurrent: edgerun vs the limit's two parts, in alternating rounds.
        per_client = max(1, args.requests // args.clients // ROUNDS)
        total = per_client * args.clients
        edgerun_s = bare_s = tput_s = grpc_s = grpc_bare_s = 0.0
        inproc_s = {layout.label: 0.0 for layout in layouts}
        for _ in range(ROUNDS):
            for layout in layouts:
                own = run_slots(sessions[(layout.threads, layout.spinning)][: layout.instances], layout.runs)
                per_slot = max(1, total // len(own))
                seconds = parallel_seconds([lambda s=s: inproc_call(s) for s in own], per_slot)
                inproc_s[layout.label] += seconds * total / (per_slot * len(own))
            bare_s += parallel_seconds([lambda: http_call(bare.url)] * args.clients, per_client)
            edgerun_s += parallel_seconds([lambda: http_call(edgerun.url)] * args.clients, per_client)
            if tput_server is not None:
                tput_s += parallel_seconds([lambda: http_call(tput_server.url)] * args.clients, per_client)
            if bare_grpc is not None:
                grpc_bare_s += parallel_seconds([lambda: grpc_call(bare_grpc.url)] * args.clients, per_client)
                grpc_s += parallel_seconds([lambda: grpc_call(edgerun_grpc_url)] * args.clients, per_client)
                served_requests += (per_client + 1) * args.clients
            served_requests += (per_client + 1) * args.clients
        edgerun_tput = ROUNDS * total / edgerun_s
        throughput_tput = ROUNDS * total / tput_s if tput_server is not None else edgerun_tput
        floor_tput = ROUNDS * total / bare_s
        inproc_tput = {label: ROUNDS * total / seconds for label, seconds in inproc_s.items()}
        best_label = max(inproc_tput, key=lambda label: inproc_tput[label])
        limit = 1.0 / (1.0 / inproc_tput[best_label] + 1.0 / floor_tput)
        grpc_numbers: dict[str, float] = {}
        if bare_grpc is not None:
            grpc_numbers[f"grpc_{args.clients}_clients_per_s"] = ROUNDS * total / grpc_s
            grpc_numbers[f"grpc_transport_floor_{args.clients}_clients_per_s"] = ROUNDS * total / grpc_bare_s
            grpc_floor = grpc_numbers[f"grpc_transport_floor_{args.clients}_clients_per_s"]
            grpc_numbers["grpc_box_limit_per_s"] = 1.0 / (1.0 / inproc_tput[best_label] + 1.0 / grpc_floor)

        # 3. One client: edgerun's p50 = in-process (served layout's threads/spinning) + floor + own.
        single = sessions.get((served_layout["threads"], served_layout["spinning"]))
        if single is None:
            single = [
                create_instance(
                    model,
                    template.session,
                    [ProviderSpec(name="CPUExecutionProvider")],
                    served_layout["threads"],
                    served_layout["spinning"],
                    None,
                )
            ]
        one_inproc, one_bare, one_edgerun = inproc_call(single[0]), http_call(bare.url), http_call(edgerun.url)
        block = max(10, args.requests // ROUNDS)
        inproc_t, bare_t, edgerun_t, grpc_bare_t, grpc_t = [], [], [], [], []
        one_grpc_bare = grpc_call(bare_grpc.url) if bare_grpc is not None else None
        one_grpc = grpc_call(edgerun_grpc_url) if bare_grpc is not None else None
        for _ in range(ROUNDS):
            inproc_t += time_calls(one_inproc, block)
            bare_t += time_calls(one_bare, block)
            edgerun_t += time_calls(one_edgerun, block)
            served_requests += block + 3
            if one_grpc_bare is not None and one_grpc is not None:
                grpc_bare_t += time_calls(one_grpc_bare, block)
                grpc_t += time_calls(one_grpc, block)
                served_requests += block + 3
        inproc_p50, floor_p50, edgerun_p50 = p50_ms(inproc_t), p50_ms(bare_t), p50_ms(edgerun_t)
        if grpc_t:
            grpc_numbers["grpc_single_client_p50_ms"] = p50_ms(grpc_t)
            grpc_numbers["grpc_transport_floor_p50_ms"] = p50_ms(grpc_bare_t)
            grpc_numbers["grpc_own_ms"] = p50_ms(grpc_t) - inproc_p50 - p50_ms(grpc_bare_t)

        # 4. JSON (reference only), then RSS after everything above.
        json_inputs, json_outputs = make_inputs(False)
        json_p50 = p50_ms(time_calls(lambda: client.infer(name, json_inputs, outputs=json_outputs), args.json_requests))
        served_requests += args.json_requests + 3
        while served_requests < 1000:
            one_edgerun()
            served_requests += 1
        rss = rss_mb(edgerun.proc.pid)
    finally:
        edgerun.stop()
        bare.stop()
        if bare_grpc is not None:
            bare_grpc.stop()
        if tput_server is not None:
            tput_server.stop()

    # 5. Cold start without the self-benchmark, fresh cache.
    port = _free_port()
    cold = Server(edgerun_command(bundle, port, work / "cold-cache", "--no-bench"), f"127.0.0.1:{port}")
    cold.stop()

    own_ms = edgerun_p50 - inproc_p50 - floor_p50
    numbers = {
        "bundle": str(bundle),
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "cpus": budget,
        "served_layout": served_layout["label"],
        "layout_source": served_layout["source"],
        f"edgerun_{args.clients}_clients_per_s": round(edgerun_tput, 1),
        "inprocess_layouts_per_s": {k: round(v, 1) for k, v in inproc_tput.items()},
        "best_inprocess_layout": best_label,
        f"transport_floor_{args.clients}_clients_per_s": round(floor_tput, 1),
        "box_limit_per_s": round(limit, 1),
        "edgerun_vs_limit": round(edgerun_tput / limit, 3),
        "optimize_throughput_layout": tput_layout["label"],
        f"optimize_throughput_{args.clients}_clients_per_s": round(throughput_tput, 1),
        "optimize_throughput_vs_limit": round(throughput_tput / limit, 3),
        "single_client_p50_ms": round(edgerun_p50, 3),
        "inprocess_p50_ms": round(inproc_p50, 3),
        "transport_floor_p50_ms": round(floor_p50, 3),
        "edgerun_own_ms": round(own_ms, 3),
        "json_p50_ms": round(json_p50, 3),
        "startup_with_self_benchmark_s": round(startup_bench_s, 3),
        "cold_start_no_bench_s": round(cold.ready_s, 3),
        "server_rss_mb": round(rss, 1),
        "requests_served": served_requests,
        **{key: round(value, 3) for key, value in grpc_numbers.items()},
    }
    checks = {
        f"{args.clients}-client throughput >= 0.9x the box's limit (default flags)": numbers["edgerun_vs_limit"] >= 0.9,
        f"{args.clients}-client throughput >= 0.9x the box's limit (--optimize throughput)": (
            numbers["optimize_throughput_vs_limit"] >= 0.9
        ),
        "edgerun's own single-client overhead <= 0.5 ms": own_ms <= 0.5,
        "cold start (--no-bench) <= 1 s": cold.ready_s <= 1.0,
        "start-up with the self-benchmark <= 5 s": startup_bench_s <= 5.0,
        "RSS after >= 1000 requests <= 150 MB": rss <= 150,
    }
    if grpc_numbers:
        grpc_ratio = grpc_numbers[f"grpc_{args.clients}_clients_per_s"] / grpc_numbers["grpc_box_limit_per_s"]
        checks[f"gRPC {args.clients}-client throughput >= 0.9x its limit"] = grpc_ratio >= 0.9
        checks["gRPC's own single-client overhead <= 0.5 ms"] = grpc_numbers["grpc_own_ms"] <= 0.5
    if args.as_json:
        print(json.dumps({**numbers, "targets": checks}, indent=2))
        return 0
    print(f"bundle {bundle}  inputs {numbers['inputs']}  thread budget {budget}")
    print(f"  edgerun layout: {served_layout['label']} ({served_layout['source']})")
    print(f"  {args.clients} clients:")
    for label, value in inproc_tput.items():
        print(f"    {'in-process ' + label:<44} {value:8.1f}/s{'  <- best' if label == best_label else ''}")
    print(f"    {'transport floor (bare ASGI app)':<44} {floor_tput:8.1f}/s")
    print(f"    {'box limit 1/(1/a + 1/b)':<44} {limit:8.1f}/s")
    for label, value, ratio in [
        (f"edgerun default ({served_layout['label']})", edgerun_tput, numbers["edgerun_vs_limit"]),
        (
            f"edgerun --optimize throughput ({tput_layout['label']})",
            throughput_tput,
            numbers["optimize_throughput_vs_limit"],
        ),
    ]:
        print(f"    {label:<44} {value:8.1f}/s  ({ratio:.2f}x the limit)")
    print("  one client, p50:")
    print(f"    edgerun {edgerun_p50:.3f} ms = in-process {inproc_p50:.3f} + floor {floor_p50:.3f} + own {own_ms:.3f}")
    print(f"    JSON {json_p50:.3f} ms (reference)")
    print(f"  start-up to ready, self-benchmark on (fresh cache): {startup_bench_s:.3f} s")
    print(f"  cold start to ready, --no-bench (fresh cache):      {cold.ready_s:.3f} s")
    print(f"  server RSS after {served_requests} requests: {rss:.1f} MB")
    if grpc_numbers:
        g = grpc_numbers
        print(
            f"  gRPC ({args.clients} clients): edgerun {g[f'grpc_{args.clients}_clients_per_s']:.1f}/s, floor "
            f"{g[f'grpc_transport_floor_{args.clients}_clients_per_s']:.1f}/s, limit {g['grpc_box_limit_per_s']:.1f}/s "
            f"({g[f'grpc_{args.clients}_clients_per_s'] / g['grpc_box_limit_per_s']:.2f}x the limit)"
        )
        print(
            f"  gRPC one client p50: edgerun {g['grpc_single_client_p50_ms']:.3f} ms = in-process {inproc_p50:.3f} + "
            f"floor {g['grpc_transport_floor_p50_ms']:.3f} + own {g['grpc_own_ms']:.3f}"
        )
    for label, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISS'}] {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
