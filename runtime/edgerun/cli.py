"""``edgerun`` command line: thin commands over the library (loader, server, reload).

Heavy modules (numpy, onnxruntime, FastAPI) are imported inside commands so ``--help`` and
the start of ``serve`` stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgerun.errors import EdgerunError, report_errors
from edgerun.memory import tune_malloc

DEFAULT_CACHE_DIR = "~/.cache/edgerun"

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


_POSITIVE = click.FloatRange(min=0, min_open=True)


def _providers(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="edgebuild", prog_name="edgerun")
def main(debug: bool) -> None:
    """Serve edgebuild bundles on the device (KServe v2 REST)."""


def _load_once(bundle, providers, threads, cache_dir, trusted_key, bench: bool, max_batch: int = 8):
    """Load BUNDLE as the server would (verify, sessions, golden check), for a one-off command."""
    _setup_logging("warning")
    from edgerun.loader import LoadOptions, load_model

    options = LoadOptions(
        providers=_providers(providers),
        threads=threads,
        cache_dir=Path(cache_dir),
        bench=bench,
        max_batch=max_batch,
        trusted_key=_read_key(trusted_key),
    )
    served = load_model(bundle, options)
    served.close()  # the numbers are kept; an archive's extracted copy is not
    return served


common_load = [
    click.option("--providers", help="Comma-separated execution providers to try in order (default: the manifest's)."),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="Intra-op threads per session instance (default: chosen within the CPU affinity and cgroup quota).",
    ),
    click.option(
        "--cache-dir",
        default=lambda: os.environ.get("EDGERUN_CACHE_DIR", DEFAULT_CACHE_DIR),
        show_default=DEFAULT_CACHE_DIR,
        help="Provider caches, variant decisions, kept versions.",
    ),
    click.option(
        "--trusted-key",
        type=click.Path(dir_okay=False),
        help="ed25519 public key (PEM or raw); refuse bundles not signed with it.",
    ),
]


def _with(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@main.command()
@click.argument("bundles", nargs=-1, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (keep local unless fronted).")
@click.option("--port", default=8000, show_default=True, type=int)
@_with(common_load)
@click.option("--no-bench", is_flag=True, help="Skip the self-benchmark at start-up.")
@click.option(
    "--no-trt-background",
    is_flag=True,
    help="Build the TensorRT engine before serving instead of serving from CUDA/CPU while it builds.",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    help="Session instances (copies of the model in memory) serving in parallel (default: chosen by the "
    "self-benchmark within the thread budget).",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    help="Requests one instance runs at once (default: chosen by the self-benchmark; a lone request still "
    "gets every thread).",
)
@click.option(
    "--optimize",
    type=click.Choice(["latency", "throughput", "balanced"]),
    default="balanced",
    show_default=True,
    help="What the self-benchmark's layout choice favours: one client's latency, many clients' throughput, "
    "or the best throughput within 25% of the best latency.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    help="Rows per stacked run (dynamic batching; default: 1 unless the self-benchmark measures batching cheaper).",
)
@click.option("--max-delay-ms", default=2.0, show_default=True, type=float, help="How long to wait to fill a batch.")
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Queued requests before answering 503.",
)
@click.option(
    "--max-queue-bytes",
    default=256 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes of queued input tensors before answering 503.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=30.0,
    show_default=True,
    type=_POSITIVE,
    help="Seconds a request may wait for its result before 504.",
)
@click.option("--token", envvar="EDGERUN_TOKEN", help="Require 'Authorization: Bearer TOKEN' (not on health).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Read the inference token from FILE.")
@click.option(
    "--model-control",
    is_flag=True,
    help="Enable repository load/unload over HTTP (loads only from --watch DIR or kept versions).",
)
@click.option(
    "--admin-token",
    envvar="EDGERUN_ADMIN_TOKEN",
    help="Bearer token for model control (required with --model-control on a non-loopback --host).",
)
@click.option("--admin-token-file", type=click.Path(dir_okay=False), help="Read the admin token from FILE.")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Answer only requests whose Host header is one of these names (repeatable; against DNS rebinding).",
)
@click.option("--max-body-mb", default=64.0, show_default=True, type=_POSITIVE, help="Largest request body.")
@click.option(
    "--body-timeout",
    "body_timeout_s",
    default=60.0,
    show_default=True,
    type=_POSITIVE,
    help="Seconds a client may take to send its request head, and its body (408 after).",
)
@click.option("--watch", "watch_dir", type=click.Path(file_okay=False), help="Load bundles dropped into DIR.")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@_handle_errors
def serve(
    bundles,
    host,
    port,
    providers,
    threads,
    cache_dir,
    trusted_key,
    no_bench,
    no_trt_background,
    instances,
    runs,
    optimize,
    max_batch,
    max_delay_ms,
    max_queue,
    max_queue_bytes,
    timeout_s,
    token,
    token_file,
    model_control,
    admin_token,
    admin_token_file,
    allowed_hosts,
    max_body_mb,
    body_timeout_s,
    watch_dir,
    log_level,
):
    """Verify, check and benchmark BUNDLE(s) (directory or .tar.gz), then serve them over HTTP."""
    from edgerun.guard import is_loopback

    if not bundles and not watch_dir:
        raise click.UsageError("give a BUNDLE to serve, or --watch DIR")
    token = _secret(token, token_file, "--token", "EDGERUN_TOKEN")
    admin_token = _secret(admin_token, admin_token_file, "--admin-token", "EDGERUN_ADMIN_TOKEN")
    if model_control and admin_token is None and not is_loopback(host):
        raise click.UsageError(
            f"--model-control on --host {host} (not loopback) needs an admin token: set --admin-token, "
            f"--admin-token-file or EDGERUN_ADMIN_TOKEN, or bind 127.0.0.1"
        )
    if admin_token is not None and token is not None and admin_token == token:
        raise click.UsageError(
            "--admin-token must differ from --token: the inference token must not unlock model control"
        )
    _setup_logging(log_level)
    tune_malloc()
    import threading

    from edgerun.errors import EdgerunError
    from edgerun.loader import LoadOptions
    from edgerun.reload import ModelRepository, VersionStore, bundle_entries

    options = LoadOptions(
        providers=_providers(providers),
        threads=threads,
        cache_dir=Path(cache_dir),
        bench=not no_bench,
        trusted_key=_read_key(trusted_key),
        trt_background=not no_trt_background,
        instances=instances,
        runs=runs,
        optimize=optimize,
        fixed_batch=max_batch,
        batch_delay_ms=max_delay_ms,
    )
    if max_batch is not None:
        options.max_batch = max_batch
    repo = ModelRepository(options, store=VersionStore(Path(cache_dir)))
    failure: list[BaseException] = []

    def load_all() -> None:
        try:
            for location in bundles:
                repo.load(location)
            if watch_dir:
                Path(watch_dir).mkdir(parents=True, exist_ok=True)
                for location in bundle_entries(Path(watch_dir)):
                    try:
                        repo.load(location)
                    except EdgerunError as exc:
                        logging.getLogger("edgerun").error("watch: skipped %s: %s", location, exc)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            failure.append(exc)

    loader = threading.Thread(target=load_all, name="edgerun-load")
    if no_bench:  # session creation runs in native code without the GIL: it overlaps with the imports
        loader.start()
    from edgerun.server import ServerConfig, create_app
    from edgerun.server import serve as run_server

    if not no_bench:  # the self-benchmark times every core: importing next to it would skew it
        loader.start()

    loader.join()
    if failure:
        repo.close()
        raise failure[0]
    if not repo.models and not watch_dir:
        raise click.UsageError("no bundle loaded")
    config = ServerConfig(
        token=token,
        model_control=model_control,
        admin_token=admin_token,
        allowed_hosts=list(allowed_hosts) or None,
        loopback_hosts_only=is_loopback(host),  # against DNS rebinding; --allowed-host names others
        max_body_mb=max_body_mb,
        body_timeout_s=body_timeout_s,
        max_batch=max_batch or 1,  # the layout may stack more (see edgerun.layout)
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_queue_bytes=max_queue_bytes,
        timeout_s=timeout_s,
        watch_dir=Path(watch_dir) if watch_dir else None,
    )
    if not is_loopback(host) and not token:
        logging.getLogger("edgerun").warning("serving on %s without --token: anyone who can reach it can use it", host)
    try:
        run_server(create_app(repo, config), host=host, port=port, log_level=log_level)
    finally:
        repo.close()  # also when the server stops before its shutdown hook runs


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--trusted-key", type=click.Path(dir_okay=False), help="Also check the signature with this key.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_handle_errors
def info(bundle, trusted_key, as_json):
    """Print the manifest summary of BUNDLE (checksums are verified on the way)."""
    from edgerun.loader import describe_bundle

    summary = describe_bundle(bundle, _read_key(trusted_key))
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
    click.echo(f"  golden     {golden['path'] + ' atol ' + str(golden['atol']) if golden else 'none'}")
    click.echo(f"  signed     {'yes' if summary['signed'] else 'no'}; {summary['files']} files")


@main.command()
@click.argument("bundle", type=click.Path())
@_with(common_load)
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
@_with(common_load)
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
