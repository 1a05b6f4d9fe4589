"""Prometheus metrics for one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

if TYPE_CHECKING:
    from edgerun.status import ModelStatus

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
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
        self._children: dict[tuple[str, str, int], tuple[Counter, Counter | None, Histogram]] = {}
        self.reloads = Counter(
            "edgerun_reloads", "Model (re)loads by outcome", ["model", "outcome"], registry=self.registry
        )

    def observe(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        key = (model, endpoint, code)
        children = self._children.get(key)
        if children is None:
            # Looked up once per label set (labels() costs more than the increments it serves); the
            # registry keeps every child anyway, so this holds no series it would not.
            errors = self.errors.labels(model, endpoint, str(code)) if code >= 400 else None
            children = (self.requests.labels(model, endpoint, str(code)), errors, self.latency.labels(model, endpoint))
            self._children[key] = children
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def describe_model(self, name: str, version: str, status: ModelStatus) -> None:
        self.model_info.labels(name).info(
            {
                "version": version,
                "variant": status.variant,
                "providers": ",".join(status.providers),
                "threads": str(status.threads),
                "layout": status.layout.layout.label if status.layout is not None else "",
                "tensorrt": status.tensorrt.state if status.tensorrt is not None else "",
            }
        )

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
