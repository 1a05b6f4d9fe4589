"""Pieces the routes share: the server's state, request timing into metrics, content-type checks,
the model-control guard and the error responses each route documents."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from edgerun.batching import Batcher
from edgerun.config import ServerConfig
from edgerun.control import ModelControl
from edgerun.dataplane import DataPlane
from edgerun.errors import (
    EdgerunError,
    ForbiddenError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from edgerun.guard import bearer_matches
from edgerun.hosts import host_name, is_loopback
from edgerun.loader import ServedModel
from edgerun.metrics import Metrics
from edgerun.protocol import ErrorResponse
from edgerun.reload import ModelRepository
from edgerun.shm import SharedMemory, local_shm

# Metrics label for requests naming no served model: one series for all of them, however many names.
UNKNOWN_MODEL = "unknown"
# nginx's code for "client closed the request": counted, never reported as a server error.
CLIENT_CLOSED = 499


@dataclass
class ServerState:
    """What the doors share: the data plane (repository, batcher), metrics and model control, plus the
    HTTP-only pieces (image decode slots)."""

    repo: ModelRepository
    config: ServerConfig
    metrics: Metrics
    control: ModelControl
    # Image decoding is the one step whose memory grows with the request: a few at a time.
    image_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    dataplane: DataPlane = field(init=False)
    # System shared memory (--allow-shm), one registry for the REST and gRPC doors.
    shm: SharedMemory | None = field(init=False)

    def __post_init__(self) -> None:
        self.dataplane = DataPlane(self.repo, self.config)
        self.shm = SharedMemory(self.config.shm_prefix) if self.config.allow_shm else None

    def local_shm(self, client_host: str | None) -> SharedMemory:
        """The shared memory a request from ``client_host`` may use (refused when off or not local)."""
        return local_shm(self.shm, client_host)

    @property
    def batcher(self) -> Batcher | None:
        return self.dataplane.batcher

    @batcher.setter
    def batcher(self, batcher: Batcher | None) -> None:
        self.dataplane.batcher = batcher

    def lookup(self, name: str | None, version: str | None = None) -> ServedModel:
        return self.dataplane.model(name, version)

    def get_batcher(self) -> Batcher:
        return self.dataplane.get_batcher()


# Dependencies are ``async def`` even when they never await: FastAPI runs a plain ``def`` dependency on
# a worker thread, a thread hand-off per dependency per request.
async def server_state(request: Request) -> ServerState:
    return request.app.state.edgerun


@dataclass
class RequestTimer:
    """What the timing dependency records: the model label (once a served model is named) and the code."""

    label: str = UNKNOWN_MODEL
    code: int = 500


@contextlib.asynccontextmanager
async def timing(metrics: Metrics, endpoint: str) -> AsyncIterator[RequestTimer]:
    """Time what runs inside into ``edgerun_requests``/``errors``/``latency`` for ``endpoint``."""
    started = time.perf_counter()
    timer = RequestTimer()
    try:
        yield timer
        timer.code = 200
    except EdgerunError as exc:
        timer.code = exc.http_status
        raise
    except ClientDisconnect:
        timer.code = CLIENT_CLOSED
        raise
    finally:
        metrics.observe(timer.label, endpoint, timer.code, time.perf_counter() - started)


def timed(endpoint: str) -> Callable[..., AsyncIterator[RequestTimer]]:
    """A dependency timing the request (see :func:`timing`)."""

    async def dependency(state: ServerState = Depends(server_state)) -> AsyncIterator[RequestTimer]:
        async with timing(state.metrics, endpoint) as timer:
            yield timer

    return dependency


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def accepts(*types: str, missing_ok: bool) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing (415) a body whose Content-Type is not one of ``types`` (``image/*`` style allowed).

    Refusing form and text types matters: a web page can send those cross-site without asking.
    """
    listed = ", ".join(types)

    async def dependency(request: Request) -> None:
        seen = media_type(request)
        if not seen:
            if missing_ok:
                return
            raise UnsupportedMediaTypeError(f"this route needs a Content-Type header; send {listed}")
        for wanted in types:
            if seen == wanted or (wanted.endswith("/*") and seen.startswith(wanted[:-1])):
                return
            if wanted == "application/json" and seen.startswith("application/") and seen.endswith("+json"):
                return
        raise UnsupportedMediaTypeError(f"Content-Type '{seen}' is not accepted here; send {listed}")

    return dependency


async def model_control(request: Request, state: ServerState = Depends(server_state)) -> ModelControl:
    """Model control is on only with --model-control, and then needs the admin token (or, without one, a
    loopback bind and a loopback Host)."""
    return check_model_control(state, request.headers.get("authorization"), host_name(request.headers.get("host")))


def check_model_control(state: ServerState, authorization: str | None, addressed_to: str) -> ModelControl:
    """The model-control rules, for every door: ``authorization`` is the credential sent, ``addressed_to``
    the host the request was addressed to (HTTP's Host; over gRPC, the peer address)."""
    config = state.config
    if not config.model_control:
        raise ForbiddenError(
            "model control is off; start the server with --model-control (and --admin-token) to load or "
            "unload models over HTTP, or drop bundles into the --watch directory"
        )
    if config.admin_token is not None:
        if not bearer_matches(authorization, config.admin_token):
            raise UnauthorizedError(
                "model control needs the admin token: send 'Authorization: Bearer <admin token>' "
                "(--admin-token / EDGERUN_ADMIN_TOKEN); the inference token does not unlock it"
            )
    elif not is_loopback(addressed_to):
        raise ForbiddenError(
            "model control without an admin token answers only requests addressed to a loopback Host; "
            "set --admin-token to use it from elsewhere"
        )
    return state.control


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each code with the ErrorResponse body."""
    return {code: {"model": ErrorResponse} for code in codes}


def served_source(state: ServerState, name: str) -> Path | None:
    served = state.repo.models.get(name)
    return Path(served.source) if served is not None else None
