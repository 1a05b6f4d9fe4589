"""The server's settings (what ``edgerun serve`` flags set; defaults declared in ``edgerun.serve_options``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun.serve_options import DEFAULTS


@dataclass
class ServerConfig:
    token: str | None = None  # inference bearer token (everything but health and model control)
    # Model control: repository load/unload over HTTP. Off unless asked for; then guarded by its own token.
    model_control: bool = DEFAULTS.model_control
    admin_token: str | None = None
    allowed_hosts: list[str] | None = None  # Host header allow-list (DNS rebinding); None = any
    loopback_hosts_only: bool = False  # answer loopback Host names only (set by the CLI on a loopback bind)
    max_body_mb: float = DEFAULTS.max_body_mb
    body_timeout_s: float = DEFAULTS.body_timeout_s  # the whole request body must arrive within this
    max_batch: int = 1
    max_delay_ms: float = DEFAULTS.max_delay_ms
    max_queue: int = DEFAULTS.max_queue
    max_queue_bytes: int | None = DEFAULTS.max_queue_bytes  # the queue is bounded in bytes too (None: not)
    timeout_s: float = DEFAULTS.timeout_s
    watch_dir: Path | None = None
    watch_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    # KServe v2 gRPC beside REST (edgerun.grpc_server): off unless a port is given; bound to grpc_host.
    grpc_port: int | None = DEFAULTS.grpc_port
    grpc_host: str = DEFAULTS.host
    # System shared memory for local gRPC clients (edgerun.shm): off unless asked for.
    allow_shm: bool = DEFAULTS.allow_shm
    shm_prefix: str = DEFAULTS.shm_prefix
    image_decodes: int = 2  # images decoded at once by /v1/predict (memory grows with each)

    def batcher_settings(self) -> dict[str, Any]:
        """The batcher's keyword arguments (see :class:`edgerun.batching.Batcher`)."""
        return {
            "max_batch": self.max_batch,
            "max_delay_ms": self.max_delay_ms,
            "max_queue": self.max_queue,
            "max_queue_bytes": self.max_queue_bytes,
            "timeout_s": self.timeout_s,
        }

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
