"""Prometheus metrics for one server (own registry, so several apps can live in one process).

``prometheus_client`` (with the HTTP, WSGI and urllib modules its exposition pulls in) is imported
when the metrics are first needed, not at start-up: the server calls ``prepare`` in the background
once it takes connections, so ready is not delayed by it and the first request rarely waits for it.
What happens before that (models described, the queue tracked) is remembered and applied then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgerun.status import ModelStatus

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# prometheus_client.CONTENT_TYPE_LATEST, known without importing it (test_telemetry checks they agree).
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"


class _Live:
    """The prometheus_client objects of one registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgerun_requests", "Inference requests handled", ["model", "endpoint", "code"], registry=self.registry
        )
        self.errors = Counter(
            "edgerun_errors", "Requests answered with an error", ["model", "endpoint", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "edgerun_request_latency_seconds",
            "Request latency, server side",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "edgerun_batch_size", "Rows per session run", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("edgerun_queue_depth", "Requests waiting for or in inference", registry=self.registry)
        self.model_info = Info(
            "edgerun_model", "Model served: variant, providers, threads, layout", ["model"], registry=self.registry
        )
        self.reloads = Counter(
            "edgerun_reloads", "Model (re)loads by outcome", ["model", "outcome"], registry=self.registry
        )


class Metrics:
    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self._live: _Live | None = None
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, str]] = {}  # described before the registry existed
        self._depth: Callable[[], int] | None = None
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def prepare(self) -> _Live:
        """Import prometheus_client and make the registry (once; later calls return it)."""
        live = self._live
        if live is not None:
            return live
        with self._lock:
            if self._live is None:
                live = _Live()
                for name, info in self._models.items():
                    live.model_info.labels(name).info(info)
                if self._depth is not None:
                    live.queue_depth.set_function(self._depth)
                self._live = live
            return self._live

    def observe(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        key = (model, endpoint, code)
        children = self._children.get(key)
        if children is None:
            # Looked up once per label set (labels() costs more than the increments it serves); the
            # registry keeps every child anyway, so this holds no series it would not.
            live = self.prepare()
            errors = live.errors.labels(model, endpoint, str(code)) if code >= 400 else None
            children = (live.requests.labels(model, endpoint, str(code)), errors, live.latency.labels(model, endpoint))
            self._children[key] = children
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def observe_batch(self, rows: int) -> None:
        self.prepare().batch_size.observe(rows)

    def count_reload(self, model: str, outcome: str) -> None:
        self.prepare().reloads.labels(model, outcome).inc()

    def describe_model(self, name: str, version: str, status: ModelStatus) -> None:
        info = {
            "version": version,
            "variant": status.variant,
            "providers": ",".join(status.providers),
            "threads": str(status.threads),
            "layout": status.layout.layout.label if status.layout is not None else "",
            "tensorrt": status.tensorrt.state if status.tensorrt is not None else "",
        }
        with self._lock:
            self._models[name] = info
            live = self._live
        if live is not None:
            live.model_info.labels(name).info(info)

    def track_queue(self, depth: Callable[[], int]) -> None:
        with self._lock:
            self._depth = depth
            live = self._live
        if live is not None:
            live.queue_depth.set_function(depth)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.prepare().registry)
