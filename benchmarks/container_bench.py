"""The runtime image, measured: build time, layers it adds, cold start and memory, next to the
same server outside the container.

    docker/podman-standin.sh          # once: podman + a stand-in base image (root)
    python benchmarks/container_bench.py [BUNDLE_DIR] [--requests 1000] [--no-record]

Without a bundle it packs the embedded digits example (``edgebuild pack --target x86``). Then:

- image build time: from scratch (``--no-cache``: both stages, pip downloads included) and
  again with every layer cached (what a CI session pays after the first);
- the layers the image adds over its base (the stand-in base is larger than the real
  ``python:3.11-slim``, so totals would mislead);
- cold start, launch -> ``/v2/health/ready``: ``podman run`` of the image (uid 10001,
  read-only root, fresh tmpfs cache, host network) vs ``edgerun serve`` started directly on
  the host, with the self-benchmark (the image's default) and with ``--no-bench``;
- server RSS after N sequential ``tritonclient.http`` binary requests, inside vs outside.

Results go to BENCHMARKS.md ("Runtime image") unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docker"))
sys.path.insert(0, str(Path(__file__).parent))

import podman_image as podman  # noqa: E402
from common import replace_section  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, alive, timeout_s: float = 300.0) -> None:
    if not podman.wait_ready(port, alive, timeout_s, poll_s=0.02):
        raise SystemExit("the server exited before it was ready" if not alive() else "the server never became ready")


def pack_digits(dest: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "edgebuild.cli", "pack", "--target", "x86", "-o", str(dest)],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def requests(port: int, bundle: Path, n: int) -> None:
    import tritonclient.http as httpclient

    from edgerun.manifest import read_manifest

    manifest = read_manifest(bundle)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    inputs = []
    for spec in manifest.inputs:
        x = np.random.default_rng(0).random([d if d > 0 else 1 for d in spec.shape]).astype(spec.dtype)
        inp = httpclient.InferInput(spec.name, list(x.shape), "FP32" if spec.dtype == "float32" else "INT64")
        inp.set_data_from_numpy(x, binary_data=True)
        inputs.append(inp)
    for _ in range(n):
        client.infer(manifest.name, inputs)
    client.close()


def rss_mb(status_text: str) -> float:
    line = next(line for line in status_text.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def in_container(image: str, bundle: Path, bench: bool, n: int) -> tuple[float, float | None]:
    """(launch -> ready seconds, RSS MB after n requests or None)."""
    port = free_port()
    args = ["/bundle", "--host", "127.0.0.1", "--port", str(port)] + ([] if bench else ["--no-bench"])
    start = time.perf_counter()
    container = podman.run(image, args, bundle=bundle)
    try:
        wait_ready(port, container.running)
        ready = time.perf_counter() - start
        rss = None
        if n:
            requests(port, bundle, n)
            assert "edgerun" in container.exec("cat", "/proc/1/cmdline").stdout  # the server is PID 1
            rss = rss_mb(container.exec("cat", "/proc/1/status").stdout)
        container.signal("TERM")
        container.wait(timeout=60)
        return ready, rss
    finally:
        container.remove()


def on_host(bundle: Path, bench: bool, n: int) -> tuple[float, float | None]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-cache-") as cache:
        cmd = [sys.executable, "-m", "edgerun.cli", "serve", str(bundle), "--port", str(port), "--cache-dir", cache]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd + ([] if bench else ["--no-bench"]), stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, lambda: proc.poll() is None)
            ready = time.perf_counter() - start
            rss = None
            if n:
                requests(port, bundle, n)
                rss = rss_mb(Path(f"/proc/{proc.pid}/status").read_text())
            return ready, rss
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    reason = podman.unavailable()
    if reason:
        raise SystemExit(f"container_bench: {reason}")
    with tempfile.TemporaryDirectory(prefix="edgerun-image-bench-") as tmp:
        root = Path(tmp)
        bundle = args.bundle.resolve() if args.bundle else pack_digits(root / "dist")
        context = podman.make_context(root / "context")
        tag = f"localhost/edgerun-bench-{os.getpid()}:x86"
        cold_build = podman.build(context, tag, no_cache=True)
        # A normal build first, so the timed one finds every layer cached whatever --no-cache left.
        filling = podman.build(context, tag)
        print(f"first cached build (fills the layer cache): {filling:.1f} s", file=sys.stderr)
        warm_build = podman.build(context, tag)
        layers = podman.added_layers(tag)
        added = sum(size for size, _ in layers)
        rows = {}
        try:
            for bench in (True, False):
                rows[bench] = (
                    in_container(tag, bundle, bench, args.requests if not bench else 0),
                    on_host(bundle, bench, args.requests if not bench else 0),
                )
        finally:
            podman.podman("rmi", tag, check=False)
    (c_bench, _), (h_bench, _) = rows[True]
    (c_cold, c_rss), (h_cold, h_rss) = rows[False]
    assert c_rss is not None and h_rss is not None
    venv, rest = layers[0][0], sum(size for size, _ in layers[1:])
    top = f"the virtual environment {venv / 1e6:.0f} MB, the other {len(layers) - 1} layers {rest / 1e3:.0f} kB"
    lines = [
        f"bundle: {bundle.name}; {args.requests} sequential tritonclient binary requests for RSS",
        f"image build from scratch (--no-cache): {cold_build:.1f} s; with every layer cached: {warm_build:.1f} s",
        f"layers added over the base: {added / 1e6:.0f} MB ({top})",
        f"cold start, launch -> ready, self-benchmark: container {c_bench:.2f} s, host {h_bench:.2f} s "
        f"({c_bench / h_bench:.2f}x)",
        f"cold start, launch -> ready, --no-bench: container {c_cold:.2f} s, host {h_cold:.2f} s ({c_cold / h_cold:.2f}x)",
        f"server RSS after {args.requests} requests: container {c_rss:.1f} MB, host {h_rss:.1f} MB "
        f"({c_rss / h_rss:.2f}x)",
    ]
    print("\n".join(lines))
    if not args.no_record:
        table = "\n".join(
            [
                "| measure | in the container | on the host | container / host |",
                "|---|---|---|---|",
                f"| image build, from scratch (`--no-cache`) | {cold_build:.1f} s | | |",
                f"| image build, every layer cached | {warm_build:.1f} s | | |",
                f"| layers added over the base | {added / 1e6:.0f} MB ({top}) | | |",
                f"| launch → ready, self-benchmark (the image's default) | {c_bench:.2f} s | {h_bench:.2f} s "
                f"| {c_bench / h_bench:.2f}× |",
                f"| launch → ready, `--no-bench` | {c_cold:.2f} s | {h_cold:.2f} s | {c_cold / h_cold:.2f}× |",
                f"| server RSS after {args.requests} requests | {c_rss:.1f} MB | {h_rss:.1f} MB | {c_rss / h_rss:.2f}× |",
            ]
        )
        body = (
            "Command: `docker/podman-standin.sh && python benchmarks/container_bench.py` — Dockerfile.x86 built "
            "with rootful podman (runc) on a stand-in `python:3.11-slim` made from Debian bookworm packages "
            "(larger than the real base, so only the added layers are compared); the container runs as uid "
            "10001 with a read-only root, a tmpfs cache and host networking; bundle "
            f"`{bundle.name}`, 2 cores shared with other work.\n\n{table}\n"
        )
        replace_section("Runtime image", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
