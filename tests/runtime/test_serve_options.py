"""``edgerun serve`` options are declared once: the command line and the library agree on every default."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from click.testing import CliRunner
from runtime_fixtures import serve_after_load

from edgerun.batching import Batcher
from edgerun.cli import main, serve
from edgerun.config import ServerConfig
from edgerun.loader import LoadOptions
from edgerun.serve_options import DEFAULTS, ServeOptions


def test_every_serve_flag_comes_from_the_declaration():
    params = {p.name: p for p in serve.params if p.name != "bundles"}
    assert set(params) == {f.name for f in dataclasses.fields(ServeOptions)}
    for name, param in params.items():
        expected = DEFAULTS.values[name]
        if isinstance(expected, tuple):
            assert getattr(param, "multiple", False), name  # repeatable; none given = ()
        elif isinstance(expected, bool):
            assert getattr(param, "is_flag", False) and not expected, name  # flags are off unless given
        else:
            assert param.default == expected, name


@pytest.fixture()
def served_with(bundles, cache_dir, monkeypatch):
    """Run ``edgerun serve BUNDLE --no-bench ARGS`` up to the bind; return the app it would serve."""
    import edgerun.server

    captured: dict = {}
    monkeypatch.setattr(edgerun.server, "serve", serve_after_load(captured))

    def run(*args: str):
        command = ["serve", str(bundles["classifier"]), "--cache-dir", str(cache_dir), "--no-bench", *args]
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        return captured["app"], captured["kwargs"]

    return run


def test_cli_and_library_defaults_agree(served_with):
    app, kwargs = served_with()
    cli_config = app.state.config
    library = ServerConfig()
    for f in dataclasses.fields(ServerConfig):
        if f.name != "loopback_hosts_only":  # set from the bind address by the command
            assert getattr(cli_config, f.name) == getattr(library, f.name), f.name
    # The two that had drifted: the queue's byte bound (256 MiB, was unbounded for Python callers) and
    # the batching window (2 ms, was 0 in the batcher).
    assert library.max_queue_bytes == 256 * 1024 * 1024
    batcher = inspect.signature(Batcher).parameters
    assert batcher["max_delay_ms"].default == library.max_delay_ms == 2.0
    assert batcher["max_queue_bytes"].default == library.max_queue_bytes
    assert batcher["max_queue"].default == library.max_queue
    assert batcher["timeout_s"].default == library.timeout_s
    assert set(library.batcher_settings()) <= set(batcher)

    cli_load = app.state.repo.options
    library_load = LoadOptions()
    assert cli_load.batch_delay_ms == library_load.batch_delay_ms == DEFAULTS.max_delay_ms
    assert cli_load.optimize == library_load.optimize == DEFAULTS.optimize
    assert cli_load.fixed_batch is library_load.fixed_batch is None
    assert kwargs["port"] == DEFAULTS.port and kwargs["host"] == DEFAULTS.host


def test_flags_reach_the_library(served_with):
    app, kwargs = served_with(
        "--max-delay-ms",
        "5",
        "--max-queue-bytes",
        "1024",
        "--max-batch",
        "4",
        "--optimize",
        "latency",
        "--allowed-host",
        "cam.local",
        "--port",
        "9123",
    )
    config, load = app.state.config, app.state.repo.options
    assert config.max_delay_ms == 5.0 and load.batch_delay_ms == 5.0
    assert config.max_queue_bytes == 1024
    assert config.max_batch == 4 and load.fixed_batch == 4 and load.max_batch == 4
    assert load.optimize == "latency"
    assert config.allowed_hosts == ["cam.local"] and config.loopback_hosts_only
    assert kwargs["port"] == 9123
    assert ServerConfig(**config.batcher_settings() | {"max_body_mb": 1}).max_queue_bytes == 1024


def test_cache_dir_from_the_environment(bundles, tmp_path, monkeypatch):
    import edgerun.server

    monkeypatch.setattr(edgerun.server, "serve", serve_after_load())
    monkeypatch.setenv("EDGERUN_CACHE_DIR", str(tmp_path / "from-env"))
    result = CliRunner().invoke(main, ["serve", str(bundles["classifier"]), "--no-bench"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env").is_dir()
