"""The server's settings (what ``edgerun serve`` flags set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerConfig:
    token: str | None = None  # inference bearer token (everything but health and model control)
    # Model control: repository load/unload over HTTP. Off unless asked for; then guarded by its own token.
    model_control: bool = False
    admin_token: str | None = None
    allowed_hosts: list[str] | None = None  # Host header allow-list (DNS rebinding); None = any
    loopback_hosts_only: bool = False  # answer loopback Host names only (set by the CLI on a loopback bind)
    max_body_mb: float = 64.0
    body_timeout_s: float = 60.0  # the whole request body must arrive within this
    max_batch: int = 1
    max_delay_ms: float = 2.0
    max_queue: int = 64
    max_queue_bytes: int | None = None  # the queue is bounded in bytes too (see edgerun.batching)
    timeout_s: float = 30.0
    watch_dir: Path | None = None
    watch_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    image_decodes: int = 2  # images decoded at once by /v1/predict (memory grows with each)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
