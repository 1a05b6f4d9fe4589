"""Cold start, side by side, in one run: edgerun against a plain FastAPI + ONNX Runtime app.

    python benchmarks/startup_bench.py [BUNDLE_DIR] [--rounds 5] [--baseline-runtime DIR ...] [--restart] [--json]

Without a bundle it builds one as ``serve_bench.py`` does: torchvision ``mobilenet_v2`` (weights=None)
packed FP32 by ``edgebuild pack`` (golden data included). Then, in interleaved rounds (so machine load hits
all alike), each measured from launch to the first ``200`` on ``GET /v2/health/ready``:

- ``edgerun serve BUNDLE --no-bench`` (fresh cache each time): verify checksums, sessions, golden check;
  with ``--restart``, ``edgerun serve BUNDLE`` instead (the self-benchmark on, as the container runs it)
  on a cache an earlier start of the same runtime filled: a device restarting;
- the plain app: a uvicorn server that imports FastAPI, creates one ONNX Runtime session on the bundle's
  ``model.onnx``, runs it once and answers the ready route (no checks of any kind);
- with ``--baseline-runtime DIR`` also edgerun from another checkout's ``runtime/`` folder (before/after;
  give it more than once to compare several, each labelled with the checkout's folder name).

Each start also reports the CPU seconds (user + system, all threads) the server used by the time it was
ready: on a shared machine the wall-clock times move with other load, the CPU time much less. The ratio
to the plain app is also given per round (each start against the plain start of its own round), as the
median of those paired ratios: it moves less than the ratio of the medians when the machine's speed drifts.

Also: the import time of the server's module graph (``python -X importtime -c "import edgerun.server,
edgerun.loader"``, top-level modules summed; median of the rounds) and edgerun's start-up timeline (the
``--log-level debug`` line, last round). Every process runs with compiled bytecode, as an installed package
does (one untimed round fills a private cache, ``PYTHONPYCACHEPREFIX``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import _free_port, build_mobilenet_bundle

REPO = Path(__file__).resolve().parents[1]

PLAIN_APP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI

    model, port = sys.argv[1], int(sys.argv[2])
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], np.float32)
        for i in session.get_inputs()
    }
    session.run(None, feeds)
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready():
        return {}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    """
)


def _env(runtime: Path, pycache: Path) -> dict[str, str]:
    """This checkout's (or the baseline's) sources, with bytecode as an installed package has it: pip
    compiles modules at install time, while a checkout run with PYTHONDONTWRITEBYTECODE=1 compiles every
    edgerun module from source at each start (about 40 ms here). The untimed first round fills the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "builder"), str(runtime)])
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def _ready(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/v2/health/ready")
        ok = connection.getresponse().status == 200
        connection.close()
        return ok
    except OSError:
        return False


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_start(command: list[str], port: int, env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds from launch to ready, CPU seconds used by then, and the server's stderr."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while not _ready(port):
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        cpu = cpu_s(proc.pid)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    return seconds, cpu, stderr.decode(errors="replace")


def import_ms(env: dict[str, str]) -> float:
    """Import time of the server's module graph: ``-X importtime``'s top-level entries, summed."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import edgerun.server, edgerun.loader"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    total = 0
    for line in out.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # no indent: imported at top level
        if match:
            total += int(match.group(1))
    return total / 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", help="a bundle directory (default: build mobilenet_v2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument(
        "--baseline-runtime",
        type=Path,
        action="append",
        default=[],
        help="also measure edgerun from this runtime/ folder (repeatable)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="edgerun with its self-benchmark, on a cache an earlier start filled (a device restarting)",
    )
    parser.add_argument("--json", dest="as_json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    bundle = args.bundle or build_mobilenet_bundle(work)
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = bundle / manifest["model"]["path"]
    runtimes = {"edgerun": REPO / "runtime"}
    for folder in args.baseline_runtime:
        label = f"edgerun ({folder.resolve().parent.name})"
        runtimes[label if label not in runtimes else f"{label[:-1]} {len(runtimes)})"] = folder.resolve()

    def env(runtime: Path) -> dict[str, str]:
        return _env(runtime, work / f"pycache-{abs(hash(str(runtime)))}")

    def edgerun(runtime: Path, port: int, cache: Path) -> tuple[float, float, str]:
        command = [sys.executable, "-m", "edgerun.cli", "serve", str(bundle), "--port", str(port)]
        command += [] if args.restart else ["--no-bench"]
        command += ["--cache-dir", str(cache), "--log-level", "debug"]
        return cold_start(command, port, env(runtime))

    def plain_start() -> tuple[float, float, str]:
        port = _free_port()
        return cold_start([sys.executable, "-c", PLAIN_APP, str(model), str(port)], port, env(REPO / "runtime"))

    plain_start()  # untimed: fills the bytecode caches
    for label, runtime in runtimes.items():
        edgerun(runtime, _free_port(), work / f"cache-{label}-warm")

    times: dict[str, list[float]] = {"plain FastAPI + ONNX Runtime": [], **{label: [] for label in runtimes}}
    cpus: dict[str, list[float]] = {label: [] for label in times}
    imports: dict[str, list[float]] = {label: [] for label in runtimes}
    timeline = ""
    for i in range(args.rounds):
        seconds, cpu, _ = plain_start()
        times["plain FastAPI + ONNX Runtime"].append(seconds)
        cpus["plain FastAPI + ONNX Runtime"].append(cpu)
        for label, runtime in runtimes.items():
            cache = work / (f"cache-{label}-warm" if args.restart else f"cache-{label}-{i}")
            seconds, cpu, stderr = edgerun(runtime, _free_port(), cache)
            times[label].append(seconds)
            cpus[label].append(cpu)
            imports[label].append(import_ms(env(runtime)))
            if label == "edgerun":
                timeline = next((line for line in stderr.splitlines() if "start-up:" in line), timeline)

    medians = {label: statistics.median(values) for label, values in times.items()}
    plain_runs = times["plain FastAPI + ONNX Runtime"]
    plain = medians["plain FastAPI + ONNX Runtime"]
    paired = {
        label: statistics.median(t / p for t, p in zip(values, plain_runs, strict=True))
        for label, values in times.items()
    }
    numbers = {
        "bundle": str(bundle),
        "rounds": args.rounds,
        "restart": args.restart,
        "cold_start_s": {label: round(value, 3) for label, value in medians.items()},
        "cold_start_runs_s": {label: [round(v, 3) for v in values] for label, values in times.items()},
        "vs_plain": {label: round(value / plain, 3) for label, value in medians.items()},
        "vs_plain_paired": {label: round(value, 3) for label, value in paired.items()},
        "cpu_to_ready_s": {label: round(statistics.median(values), 3) for label, values in cpus.items()},
        "import_ms": {label: round(statistics.median(values), 1) for label, values in imports.items()},
        "timeline": timeline.split("DEBUG ", 1)[-1],
    }
    if args.as_json:
        print(json.dumps(numbers, indent=2))
        return 0
    how = "restarts (self-benchmark on, cache filled)" if args.restart else "cold starts"
    print(f"bundle {bundle}, median of {args.rounds} interleaved {how} (launch -> /v2/health/ready 200)")
    for label, value in medians.items():
        runs = ", ".join(f"{v:.3f}" for v in times[label])
        cpu = numbers["cpu_to_ready_s"][label]
        print(
            f"  {label:<30} {value:.3f} s  {value / plain:.2f}x the plain app (paired {paired[label]:.2f}x)  "
            f"CPU {cpu:.2f} s  ({runs})"
        )
    for label, value in numbers["import_ms"].items():
        print(f"  import edgerun.server, edgerun.loader ({label}): {value:.0f} ms")
    print(f"  timeline (edgerun, last round): {numbers['timeline'] or 'not logged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
