"""``edgerun`` command line: thin commands over the library (loader, server, reload).

Heavy modules (numpy, onnxruntime, FastAPI) are imported inside commands so ``--help`` and
the start of ``serve`` stay fast.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgerun import startup  # noqa: F401  (early: the start-up timeline's origin)
from edgerun.errors import DebugAnywhereGroup, EdgerunError, report_errors
from edgerun.memory import tune_malloc
from edgerun.serve_options import DEFAULT_CACHE_DIR, LOAD_OPTIONS, ServeOptions, click_options
from edgerun.threads import single_thread_blas

# One line `edgerun: error: ...` and the error class's exit code (BundleError 2, SessionError 3,
# other runtime errors 1); a traceback only with `edgerun --debug`.
_handle_errors = report_errors("edgerun", (EdgerunError,))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s edgerun %(levelname)s %(message)s",
    )


def _read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        from edgerun.errors import BundleError

        raise BundleError(f"--trusted-key '{path}' cannot be read ({exc.strerror})") from None


def _secret(value: str | None, path: str | None, option: str, envvar: str) -> str | None:
    """A token from its flag/env var or its file; an empty one is a mistake, never "no auth"."""
    if value is not None and path is not None:
        raise click.UsageError(f"give {option} or {option}-file, not both")
    if path is not None:
        try:
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"{option}-file '{path}' cannot be read ({exc})") from None
        if not value:
            raise click.UsageError(f"{option}-file '{path}' is empty; put the token in it")
    elif value is None and os.environ.get(envvar) is not None:
        value = os.environ[envvar]  # click treats an empty variable as unset; an empty token is an error here
    if value is not None and not value.strip():
        raise click.UsageError(f"{option} (or {envvar}) is empty; set a token, or unset it to serve without one")
    if value is not None and not (value.strip().isascii() and value.strip().isprintable()):
        raise click.UsageError(f"{option} must be printable ASCII: an HTTP Authorization header carries nothing else")
    return value.strip() if value is not None else None


@click.group(cls=DebugAnywhereGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (before or after the command).")
@click.version_option(package_name="edgebuild", prog_name="edgerun")
def main(debug: bool) -> None:
    """Serve edgebuild bundles on the device (KServe v2 REST)."""


def _load_once(bundle, providers, threads, cache_dir, trusted_key, bench: bool, max_batch: int = 8):
    """Load BUNDLE as the server would (verify, sessions, golden check), for a one-off command."""
    _setup_logging("warning")
    from edgerun.loader import load_model

    given = ServeOptions(providers=providers, threads=threads, cache_dir=cache_dir, no_bench=not bench)
    options = given.load_options(_read_key(trusted_key))
    options.max_batch = max_batch
    options.trt_background = False  # a one-off load builds no engine in the background
    options.remeasure = True  # `edgerun bench` measures now, not what an earlier start cached
    served = load_model(bundle, options)
    served.close()  # the numbers are kept; an archive's extracted copy is not
    return served


def _check_grpc_door(host: str, port: int) -> None:
    """Before any load: the gRPC extra is installed and the port can be bound (one line, not a traceback)."""
    import importlib.util
    import socket

    for module in ("grpc", "tritonclient.grpc"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise click.UsageError(f"--grpc-port needs {module.split('.')[0]}: pip install 'edgebuild[grpc]'")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise click.UsageError(
                f"--grpc-port {port} on {host} cannot be bound ({exc.strerror}); choose another"
            ) from None


@main.command()
@click.argument("bundles", nargs=-1, type=click.Path())
@click_options()
@_handle_errors
def serve(bundles, **values):
    """Verify, check and benchmark BUNDLE(s) (directory or .tar.gz), then serve them over HTTP."""
    from edgerun.hosts import is_loopback

    given = ServeOptions(**values)
    host = given.host
    if not bundles and not given.watch_dir:
        raise click.UsageError("give a BUNDLE to serve, or --watch DIR")
    token = _secret(given.token, given.token_file, "--token", "EDGERUN_TOKEN")
    admin_token = _secret(given.admin_token, given.admin_token_file, "--admin-token", "EDGERUN_ADMIN_TOKEN")
    if given.model_control and admin_token is None and not is_loopback(host):
        raise click.UsageError(
            f"--model-control on --host {host} (not loopback) needs an admin token: set --admin-token, "
            f"--admin-token-file or EDGERUN_ADMIN_TOKEN, or bind 127.0.0.1"
        )
    if admin_token is not None and token is not None and admin_token == token:
        raise click.UsageError(
            "--admin-token must differ from --token: the inference token must not unlock model control"
        )
    if given.grpc_port is not None:
        _check_grpc_door(host, given.grpc_port)
    _setup_logging(given.log_level)
    tune_malloc()
    single_thread_blas()  # before the loading thread imports numpy
    from edgerun.prefetch import BundlePrefetch
    from edgerun.startup import StartupLoad, deferred_model_builds, log_ready, phase

    # Each bundle directory's files are read and hashed from here on, on a thread of their own, while
    # both threads below import (edgerun.prefetch); the verification takes those bytes.
    ahead = {location: BundlePrefetch(Path(location)).start() for location in bundles if Path(location).is_dir()}

    log = logging.getLogger("edgerun")

    def make_repository():
        with phase("imports"):
            from edgerun.reload import ModelRepository, VersionStore

        options = given.load_options(_read_key(given.trusted_key))
        options.before_timing = loading.main_imports_done.wait  # nothing is timed before (see below)
        return ModelRepository(options, store=VersionStore(Path(given.cache_dir)))

    def load_all(repo) -> None:
        from edgerun.errors import EdgerunError
        from edgerun.reload import bundle_entries

        for location in bundles:
            repo.load(location, prefetched=ahead.pop(location, None))
        if given.watch_dir:
            Path(given.watch_dir).mkdir(parents=True, exist_ok=True)
            for location in bundle_entries(Path(given.watch_dir)):
                try:
                    repo.load(location)
                except EdgerunError as exc:
                    log.error("watch: skipped %s: %s", location, exc)

    # The bundles load on their own thread while this one imports the web stack, builds the app and
    # binds: ready (200) once they are loaded. The loading thread starts first and imports alone; this
    # thread's imports start once it has made the repository, so they run while that thread is in native
    # code (session creation and the golden runs release the GIL) instead of taking turns with its
    # imports for the GIL (measured: 1.21x -> 1.10x the plain app's cold start). The self-benchmark and
    # the layout measurement time every core, so they wait for this thread's imports (``main_imports_done``);
    # a restart that reuses cached numbers times nothing.
    loading = StartupLoad(make_repository, load_all, spare_a_core=True)
    # Start-up allocates some 100,000 objects (modules, pydantic schemas, routes) that all stay alive:
    # the cyclic collector scanning them again and again cost about 8% of the imports' CPU time, and one
    # full collection after them 50 ms. They are frozen (never scanned) once the server is ready.
    gc.disable()
    # FastAPI imports pydantic's bundled v1 package (18 ms of CPU here) only to refuse v1 models, which
    # edgerun has none of; this process runs no other code that could want it (bundles are data).
    sys.modules.setdefault("pydantic.v1", None)  # type: ignore[arg-type]
    try:
        loading.start()
        repo = loading.wait_repository()
        try:
            with phase("imports"):
                with deferred_model_builds():  # FastAPI's OpenAPI models: built for /openapi.json
                    import fastapi  # noqa: F401
                from edgerun.address import address_file
                from edgerun.server import create_app
                from edgerun.server import serve as run_server
        finally:
            loading.main_thread_imported()
    except BaseException:
        gc.enable()
        loading.abandon()
        raise
    if not is_loopback(host) and not token:
        log.warning("serving on %s without --token: anyone who can reach it can use it", host)

    import asyncio

    def ready() -> None:
        # Frozen objects are never collected: back into the oldest generation a minute later, so garbage
        # made during start-up (or a starting model replaced later) can still be collected.
        gc.freeze()
        gc.enable()
        asyncio.get_running_loop().call_later(60.0, gc.unfreeze)
        log_ready()

    try:
        with phase("app"):
            app = create_app(repo, given.server_config(token, admin_token))
        if loading.error is not None:  # failed already: no socket is bound for nothing
            loading.stopped_server = True
        else:
            run_server(
                app,
                host=host,
                port=given.port,
                log_level=given.log_level,
                on_ready=ready,
                address_file=address_file(given.cache_dir),
                startup=loading,
            )
    finally:
        gc.enable()
        repo.refuse_loads()  # the server stopped first: no further bundle loads
        loading.join()  # the one still running ends before its repository closes
        repo.close()  # also when the server stops before its shutdown hook runs
    if loading.stopped_server and loading.error is not None:
        raise loading.error


@main.command()
@click.argument("bundle", type=click.Path())
@click_options(("cache_dir", "trusted_key"))  # the variant decisions this device cached are shown
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_handle_errors
def info(bundle, cache_dir, trusted_key, as_json):
    """Print the manifest summary of BUNDLE (checksums are verified on the way), this device's ISA
    and the variant its self-benchmark chose here."""
    from edgerun.isa import describe
    from edgerun.loader import describe_bundle

    summary = describe_bundle(bundle, _read_key(trusted_key), Path(cache_dir))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['name']}  (format {summary['format_version']}, created {summary['created']})")
    click.echo(f"  sha256     {summary['sha256']}")
    model = summary["model"]
    click.echo(
        f"  model      {model['path']}  {model['precision']}  opset {model['opset']}  {model['size_bytes']} bytes"
    )
    for variant in summary["variants"]:
        click.echo(f"  variant    {variant['path']}  {variant['precision']}")
    for kind in ("inputs", "outputs"):
        for spec in summary[kind]:
            click.echo(f"  {kind[:-1]:<10} {spec['name']}  {spec['dtype']}  {spec['shape']}")
    click.echo(f"  providers  {', '.join(summary['providers'])}")
    post = {k: v for k, v in (summary["postprocess"] or {}).items() if k != "type" and v is not None}
    click.echo(f"  task       {summary['task']}  {' '.join(f'{k}={v}' for k, v in post.items())}".rstrip())
    golden = summary["golden"]
    click.echo(f"  golden     {golden['path'] + ' ' + summary['golden_check'] if golden else 'none'}")
    click.echo(f"  signed     {'yes' if summary['signed'] else 'no'}; {summary['files']} files")
    if summary["host_isa"] is not None:
        click.echo(f"  host ISA   {describe(summary['host_isa'])} (where the manifest's timings were taken)")
    device = summary["device"]
    click.echo(f"  device     {device['cpu']}: {describe(device['isa'])}")
    for choice in device["choices"]:
        timings = ", ".join(f"{path} {ms:.3f} ms" for path, ms in choice["p50_ms"].items())
        click.echo(
            f"  choice     {choice['variant']} ({choice['precision']}) on {','.join(choice['providers'] or [])}, "
            f"{choice['threads']} threads: {timings}"
        )
    if not device["choices"] and summary["variants"]:
        click.echo(
            "  choice     not measured on this device yet (edgerun serve or edgerun bench measures and caches it)"
        )


@main.command()
@click.argument("bundle", type=click.Path())
@click_options(LOAD_OPTIONS)
@_handle_errors
def verify(bundle, providers, threads, cache_dir, trusted_key):
    """Verify checksums (and signature), load BUNDLE and run its golden check."""
    served = _load_once(bundle, providers, threads, cache_dir, trusted_key, bench=False)
    status = served.status
    signed = "signature ok" if trusted_key else ("signed, not checked" if served.manifest.signature else "unsigned")
    click.echo(
        f"OK {served.name} {served.version}: {len(served.manifest.files)} files verified, {signed}; "
        f"{status.variant} on {','.join(status.providers)}: {status.golden.reason}"
    )


@main.command()
@click.argument("bundle", type=click.Path())
@click_options(LOAD_OPTIONS)
@click.option(
    "--batch",
    "max_batch",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Large batch size to measure.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@_handle_errors
def bench(bundle, providers, threads, cache_dir, trusted_key, max_batch, as_json):
    """Golden-check and benchmark BUNDLE on this device (every passing variant)."""
    served = _load_once(bundle, providers, threads, cache_dir, trusted_key, bench=True, max_batch=max_batch)
    status = served.status
    report: dict[str, Any] = {
        "name": served.name,
        "version": served.version,
        "variant": status.variant,
        "providers": status.providers,
        "threads": status.threads,
        "benchmark": status.benchmark or {},
        "layout": status.layout.as_dict() if status.layout is not None else {},
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{served.name} {served.version}: {status.variant} on {','.join(status.providers)}, {status.threads} threads"
    )
    for key, numbers in report["benchmark"].items():
        if key.startswith("batch_"):
            click.echo(
                f"  batch {numbers['batch']:>3}: p50 {numbers['p50_ms']:.3f} ms  p90 {numbers['p90_ms']:.3f} ms  "
                f"p99 {numbers['p99_ms']:.3f} ms  {numbers['throughput_per_s']:.1f}/s"
            )
    for variant, numbers in report["benchmark"].get("variants", {}).items():
        click.echo(f"  variant {variant}: p50 {numbers['p50_ms']:.3f} ms")
    layout = report["layout"]
    for label, numbers in layout.get("measurements", {}).items():
        click.echo(
            f"  layout {label:<24} one client p50 {numbers['p50_ms']:.3f} ms  all busy {numbers['throughput_per_s']:.1f}/s"
        )
    if layout:
        click.echo(f"  serving layout {layout['label']} ({layout['source']}, optimize {layout['optimize']})")


@main.command()
@click.argument("name")
@click.option(
    "--cache-dir",
    default=lambda: os.environ.get("EDGERUN_CACHE_DIR", DEFAULT_CACHE_DIR),
    show_default=DEFAULT_CACHE_DIR,
)
@click.option("--target", help="Which target's history (when the model has kept versions for several).")
@click.option("--url", help="Also tell the server at URL (e.g. http://127.0.0.1:8000) to load the restored version.")
@click.option("--admin-token", envvar="EDGERUN_ADMIN_TOKEN", help="The server's model-control token, for --url.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False), help="Read the admin token from FILE.")
@_handle_errors
def rollback(name, cache_dir, target, url, admin_token, admin_token_file):
    """Restore the previous kept version of model NAME (and load it into a running server with --url).

    The server must run with --model-control and the same --cache-dir.
    """
    from edgerun.reload import VersionStore

    admin_token = _secret(admin_token, admin_token_file, "--admin-token", "EDGERUN_ADMIN_TOKEN")
    restored = VersionStore(Path(cache_dir)).rollback(name, target)
    click.echo(f"{name}: restored version {restored['version']} at {restored['path']}")
    if url:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{url.rstrip('/')}/v2/repository/models/{name}/load",
            method="POST",
            data=json.dumps({"parameters": {"bundle": restored["path"]}}).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {admin_token}"} if admin_token else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                click.echo(f"server at {url} now serves version {json.loads(response.read())['version']}")
        except urllib.error.HTTPError as exc:
            raise click.ClickException(f"server refused the load: {exc.read().decode(errors='replace')}") from None
        except urllib.error.URLError as exc:
            raise click.ClickException(
                f"server at {url} not reachable ({exc.reason}); the restored version is at {restored['path']}"
            ) from None


if __name__ == "__main__":
    main()
