"""Every ``edgerun serve`` option, declared once: name, type, default, help, flags, environment variable.

The click options of ``serve`` (and of ``verify``/``bench``, which share the load options) are
generated from :class:`ServeOptions`; :meth:`ServeOptions.load_options` and
:meth:`ServeOptions.server_config` turn one set of values into what the library runs with, and the
defaults of :class:`edgerun.loader.LoadOptions`, :class:`edgerun.config.ServerConfig` and
:class:`edgerun.batching.Batcher` are read from here (:data:`DEFAULTS`), so a default can never be
one thing on the command line and another for a Python caller. Importing this module is cheap
(no click: the CLI builds the click options when it is imported itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgerun.config import ServerConfig
    from edgerun.loader import LoadOptions

DEFAULT_CACHE_DIR = "~/.cache/edgerun"
OPTIMIZE_CHOICES = ("latency", "throughput", "balanced")  # see edgerun.layout
LOG_LEVELS = ("debug", "info", "warning", "error")

# What a value is; each kind becomes one click type (see ``_click_type``).
KINDS = ("str", "int", "count", "positive", "float", "flag", "choice", "file", "dir", "multiple")


def option(
    default: Any,
    help: str,
    *,
    kind: str = "str",
    flags: tuple[str, ...] | None = None,
    choices: tuple[str, ...] | None = None,
    envvar: str | None = None,
    show_default: str | bool | None = None,
) -> Any:
    """A dataclass field that is also an ``edgerun serve`` option (``flags`` default: ``--field-name``)."""
    if kind not in KINDS:
        raise TypeError(f"unknown option kind {kind!r}; use one of {', '.join(KINDS)}")
    metadata = {
        "help": help,
        "kind": kind,
        "flags": flags,
        "choices": choices,
        "envvar": envvar,
        "show_default": show_default,
    }
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"serve_option": metadata})
    return field(default=default, metadata={"serve_option": metadata})


@dataclass
class ServeOptions:
    """What ``edgerun serve`` runs with: the command line and Python callers both build this."""

    host: str = option(
        "127.0.0.1", "Bind address (keep local unless fronted).", envvar="EDGERUN_HOST", show_default=True
    )
    port: int = option(
        8000,
        "TCP port of the HTTP server (0: any free one; the bound address is recorded in <cache-dir>/run/serve.json).",
        kind="int",
        envvar="EDGERUN_PORT",
        show_default=True,
    )
    grpc_port: int | None = option(
        None,
        "Also serve KServe v2 gRPC on this port (off unless given; same --host, token and limits; needs the "
        "grpc extra).",
        kind="int",
    )
    # -- loading (shared with verify and bench)
    providers: str | None = option(
        None, "Comma-separated execution providers to try in order (default: the manifest's)."
    )
    threads: int | None = option(
        None,
        "Intra-op threads per session instance (default: chosen within the CPU affinity and cgroup quota).",
        kind="count",
    )
    cache_dir: str = option(
        DEFAULT_CACHE_DIR,
        "Provider caches, variant decisions, kept versions.",
        envvar="EDGERUN_CACHE_DIR",
        show_default=True,
    )
    trusted_key: str | None = option(
        None, "ed25519 public key (PEM or raw); refuse bundles not signed with it.", kind="file"
    )
    no_bench: bool = option(False, "Skip the self-benchmark at start-up.", kind="flag")
    no_trt_background: bool = option(
        False,
        "Build the TensorRT engine before serving instead of serving from CUDA/CPU while it builds.",
        kind="flag",
    )
    # -- execution layout and batching
    instances: int | None = option(
        None,
        "Session instances (copies of the model in memory) serving in parallel (default: chosen by the "
        "self-benchmark within the thread budget).",
        kind="count",
    )
    runs: int | None = option(
        None,
        "Requests one instance runs at once (default: chosen by the self-benchmark; a lone request still "
        "gets every thread).",
        kind="count",
    )
    optimize: str = option(
        "balanced",
        "What the self-benchmark's layout choice favours: one client's latency, many clients' throughput, "
        "or the best throughput within 25% of the best latency.",
        kind="choice",
        choices=OPTIMIZE_CHOICES,
        show_default=True,
    )
    max_batch: int | None = option(
        None,
        "Rows per stacked run (dynamic batching; default: 1 unless the self-benchmark measures batching cheaper).",
        kind="count",
    )
    max_delay_ms: float = option(2.0, "How long to wait to fill a batch.", kind="float", show_default=True)
    max_queue: int = option(64, "Queued requests before answering 503.", kind="count", show_default=True)
    max_queue_bytes: int = option(
        256 * 1024 * 1024, "Bytes of queued input tensors before answering 503.", kind="count", show_default=True
    )
    timeout_s: float = option(
        30.0,
        "Seconds a request may wait for its result before 504.",
        kind="positive",
        flags=("--timeout",),
        show_default=True,
    )
    # -- access
    token: str | None = option(None, "Require 'Authorization: Bearer TOKEN' (not on health).", envvar="EDGERUN_TOKEN")
    token_file: str | None = option(None, "Read the inference token from FILE.", kind="file")
    model_control: bool = option(
        False,
        "Enable repository load/unload over HTTP (loads only from --watch DIR or kept versions).",
        kind="flag",
    )
    admin_token: str | None = option(
        None,
        "Bearer token for model control (required with --model-control on a non-loopback --host).",
        envvar="EDGERUN_ADMIN_TOKEN",
    )
    admin_token_file: str | None = option(None, "Read the admin token from FILE.", kind="file")
    allowed_hosts: tuple[str, ...] = option(
        (),
        "Answer only requests whose Host header is one of these names (repeatable; against DNS rebinding).",
        kind="multiple",
        flags=("--allowed-host",),
    )
    # -- limits
    max_body_mb: float = option(64.0, "Largest request body.", kind="positive", show_default=True)
    body_timeout_s: float = option(
        60.0,
        "Seconds a client may take to send its request head, and its body (408 after).",
        kind="positive",
        flags=("--body-timeout",),
        show_default=True,
    )
    watch_dir: str | None = option(None, "Load bundles dropped into DIR.", kind="dir", flags=("--watch",))
    allow_shm: bool = option(
        False,
        "Let clients on this host pass gRPC tensors through system shared memory (Triton's extension).",
        kind="flag",
    )
    shm_prefix: str = option(
        "edgerun", "Shared-memory keys must start with this (after an optional '/').", show_default=True
    )
    log_level: str = option("info", "Log level.", kind="choice", choices=LOG_LEVELS, show_default=True)

    def load_options(self, trusted_key: bytes | None = None) -> LoadOptions:
        """The loader's settings (``trusted_key``: the key's bytes, read by the caller)."""
        from edgerun.loader import LoadOptions

        options = LoadOptions(
            providers=[p.strip() for p in self.providers.split(",") if p.strip()] if self.providers else None,
            threads=self.threads,
            cache_dir=Path(self.cache_dir),
            bench=not self.no_bench,
            trusted_key=trusted_key,
            trt_background=not self.no_trt_background,
            instances=self.instances,
            runs=self.runs,
            optimize=self.optimize,
            fixed_batch=self.max_batch,
            batch_delay_ms=self.max_delay_ms,
        )
        if self.max_batch is not None:
            options.max_batch = self.max_batch  # the self-benchmark measures the batch that will be served
        return options

    def server_config(self, token: str | None = None, admin_token: str | None = None) -> ServerConfig:
        """The server's settings (``token``/``admin_token``: resolved from their flags, files or variables)."""
        from edgerun.config import ServerConfig
        from edgerun.hosts import is_loopback

        return ServerConfig(
            token=token,
            model_control=self.model_control,
            admin_token=admin_token,
            allowed_hosts=list(self.allowed_hosts) or None,
            loopback_hosts_only=is_loopback(self.host),  # against DNS rebinding; --allowed-host names others
            max_body_mb=self.max_body_mb,
            body_timeout_s=self.body_timeout_s,
            max_batch=self.max_batch or 1,  # the layout may stack more (see edgerun.layout)
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            max_queue_bytes=self.max_queue_bytes,
            timeout_s=self.timeout_s,
            watch_dir=Path(self.watch_dir) if self.watch_dir else None,
            grpc_port=self.grpc_port,
            grpc_host=self.host,
            allow_shm=self.allow_shm,
            shm_prefix=self.shm_prefix,
        )


@dataclass(frozen=True)
class _Defaults:
    """The declared defaults by name, for the library classes' own field defaults."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def _declared() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ServeOptions) if "serve_option" in f.metadata]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


DEFAULTS = _Defaults({f.name: _default(f) for f in _declared()})

# Options of the one-off load commands (verify, bench) besides serve.
LOAD_OPTIONS = ("providers", "threads", "cache_dir", "trusted_key")


def _click_type(kind: str, choices: tuple[str, ...] | None) -> Any:
    import click

    return {
        "int": int,
        "float": float,
        "count": click.IntRange(min=1),
        "positive": click.FloatRange(min=0, min_open=True),
        "choice": click.Choice(list(choices or ())),
        "file": click.Path(dir_okay=False),
        "dir": click.Path(file_okay=False),
    }.get(kind)


def click_options(names: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a click command with the declared options (``names``: only these), in declaration order."""
    import click

    chosen = [f for f in _declared() if names is None or f.name in names]

    def decorate(command: Callable) -> Callable:
        for f in reversed(chosen):
            meta = f.metadata["serve_option"]
            flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
            kwargs: dict[str, Any] = {"help": meta["help"]}
            if meta["kind"] == "flag":
                kwargs["is_flag"] = True
            elif meta["kind"] == "multiple":
                kwargs["multiple"] = True
            else:
                kwargs["default"] = _default(f)
                click_type = _click_type(meta["kind"], meta["choices"])
                if click_type is not None:
                    kwargs["type"] = click_type
            if meta["envvar"]:
                kwargs["envvar"] = meta["envvar"]
            if meta["show_default"] is not None:
                kwargs["show_default"] = meta["show_default"]
            command = click.option(*flags, f.name, **kwargs)(command)
        return command

    return decorate


__all__ = ["DEFAULTS", "LOAD_OPTIONS", "ServeOptions", "click_options", "option"]
