"""KServe v2 REST server (plus /v1/predict and /metrics) over a ModelRepository.

``create_app`` assembles the pieces: the guard middleware (Host, token, body limits), one
router per concern (``edgerun.routes``: health and metadata, inference, repository and model
control, predict) and the error handlers that give every error the published ``ErrorResponse``
body. ``POST`` on the infer routes is answered by ``InferFastPath`` (behind the guard) without
FastAPI's routing and dependency solving; the route stays registered for the OpenAPI document.
Handlers validate and decode, then call the ``DataPlane`` (``edgerun.dataplane``), which hands tensors
to the Batcher, whose worker threads are the only place inference runs; with ``--grpc-port`` the
lifespan also starts the gRPC door (``edgerun.grpc_server``) on the same loop and data plane. A user
mistake is a 4xx with a message; a 500 means a bug in edgerun and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import edgerun
from edgerun.batching import Batcher
from edgerun.config import ServerConfig
from edgerun.control import ModelControl
from edgerun.errors import EdgerunError, OverloadedError
from edgerun.guard import GuardMiddleware, error_body
from edgerun.metrics import Metrics
from edgerun.protocol import InferRequest
from edgerun.reload import ModelRepository, watch_directory
from edgerun.routes import health, inference, predict, repository, shm
from edgerun.routes.deps import CLIENT_CLOSED, ServerState
from edgerun.routes.inference import InferFastPath
from edgerun.routes.repository import LoadRequest
from edgerun.routes.shm import RegisterRegion
from edgerun.startup import TIMELINE, StartupLoad

log = logging.getLogger("edgerun")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, headers=headers, media_type="application/json")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answers ``{"error": "..."}``."""

    @app.exception_handler(EdgerunError)
    async def _edgerun_error(request: Request, exc: EdgerunError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, OverloadedError) else None
        if exc.http_status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(exc.http_status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _error(400, f"invalid request at '{where}': {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the routes this server has"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        else:
            message = str(exc.detail) or HTTPStatus(exc.status_code).phrase
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, exc: ClientDisconnect):
        # Nobody is left to read this; it is counted as 499, never logged as a server error.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return _error(CLIENT_CLOSED, "client closed the request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def _handled_by(app: FastAPI):
    """Answer an exception with the app's handler for its nearest class, as Starlette's exception
    middleware picks it; anything else (the 500 handler) is left to the server-error middleware."""

    async def handle(request: Request, exc: Exception) -> Response:
        for cls in type(exc).__mro__:
            if cls is Exception:
                break
            handler = app.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                return response if isinstance(response, Response) else await response
        raise exc

    return handle


ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "properties": {"error": {"type": "string", "title": "Error"}},
    "required": ["error"],
}


def _document_guard_errors(schema: dict[str, Any]) -> None:
    """Every operation lists what the guard and the framework may answer, with the ErrorResponse body:
    400 (bad request, Host not allowed), 401 (token; not on health), 408/413 (bodies), 500. FastAPI's
    422 is never sent (validation errors are 400)."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            codes = ["400", "500"]
            if not path.startswith("/v2/health"):
                codes.append("401")
            if method == "post":
                codes += ["408", "413"]
            for code in codes:
                responses.setdefault(code, {"description": HTTPStatus(int(code)).phrase, **error})


def _openapi(app: FastAPI):
    """The published document: the JSON schemas of bodies the routes read themselves (infer: JSON or
    binary tensors; load: checked after the content type and the credential) and every error code
    each route can answer."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (InferRequest, LoadRequest, RegisterRegion):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            components["ErrorResponse"] = ERROR_SCHEMA
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            _document_guard_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _lifespan(state: ServerState):
    """Start: the batcher and the directory watcher. Stop: drain, then release every model's files."""
    config, metrics, repo = state.config, state.metrics, state.repo

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(**config.batcher_settings(), on_batch=metrics.observe_batch)
        batcher.start()
        state.dataplane.batcher = batcher
        state.image_slots = asyncio.Semaphore(config.image_decodes)  # bound to this event loop
        metrics.track_queue(lambda: batcher.depth)
        watcher = None
        if config.watch_dir is not None:
            watcher = asyncio.create_task(_watch_after_initial_load(repo, config.watch_dir, config.watch_interval_s))
        grpc_server = await _start_grpc(state) if config.grpc_port is not None else None
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(5.0)  # in-flight calls finish, new ones are refused
            if watcher is not None:
                watcher.cancel()
            await batcher.close(config.drain_timeout_s)
            if state.shm is not None:
                state.shm.close()  # every region unmapped at shutdown
            # Extracted copies go with the server; off the loop, as it may wait for a load still running.
            await asyncio.get_running_loop().run_in_executor(None, repo.close)

    return lifespan


async def _watch_after_initial_load(repo: ModelRepository, directory: Path, interval_s: float) -> None:
    """The directory watcher, once the bundles the server started with are loaded: it compares against
    the files each load saw, so it must not look before those loads have run."""
    while not repo.initial_load.is_set():
        await asyncio.sleep(0.02)
    await watch_directory(repo, directory, interval_s)


async def _start_grpc(state: ServerState) -> Any:
    try:
        from edgerun.grpc_server import start_grpc
    except ImportError as exc:
        raise EdgerunError(
            f"--grpc-port needs grpcio and tritonclient[grpc] ({exc.name} is missing): pip install 'edgebuild[grpc]'"
        ) from None
    config = state.config
    assert config.grpc_port is not None
    return await start_grpc(state, config.grpc_host, config.grpc_port)


def create_app(repo: ModelRepository, config: ServerConfig | None = None, metrics: Metrics | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = metrics or Metrics()
    state = ServerState(
        repo=repo,
        config=config,
        metrics=metrics,
        control=ModelControl(
            config.watch_dir, repo.store.root if repo.store else Path(repo.options.cache_dir).expanduser() / "models"
        ),
        image_slots=asyncio.Semaphore(config.image_decodes),
    )

    def describe(served) -> None:
        metrics.describe_model(served.name, served.version, served.status)

    repo.on_change = describe
    for served in repo.models.values():
        describe(served)

    app = FastAPI(
        title="edgerun",
        version=edgerun.__version__,
        lifespan=_lifespan(state),
        description="KServe v2 inference server for edgebuild bundles",
    )
    app.state.edgerun = state
    app.state.repo = repo
    app.state.metrics = metrics
    app.state.config = config
    _install_error_handlers(app)
    for router in (health.router, inference.router, predict.router, repository.router, shm.router):
        app.include_router(router)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(InferFastPath, state=state, on_error=_handled_by(app))  # inside the guard
    app.add_middleware(
        GuardMiddleware,
        token=config.token,
        max_body=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s,
        allowed_hosts=config.allowed_hosts,
        loopback_hosts_only=config.loopback_hosts_only,
    )
    return app


# Request line plus headers. uvicorn's h11 protocol stops at 16 KiB; its httptools protocol keeps
# whatever a client sends before the blank line, without limit, so it gets this one.
MAX_REQUEST_HEAD_BYTES = 64 * 1024


def _http_protocol(head_timeout_s: float) -> Any:
    """httptools (about 2x the protocol ceiling of h11) with bounds on the request head, or h11.

    The head must end within ``MAX_REQUEST_HEAD_BYTES`` (431) and within ``head_timeout_s`` of the
    connection or of its first byte (408): a connection that sends nothing, or half a head, would
    otherwise hold a file descriptor for ever (slowloris). Every refusal has the ErrorResponse body.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class BoundedHeadProtocol(HttpToolsProtocol):
        _head_bytes: int | None = None  # bytes received while a request head is incomplete
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._head_timer is None:  # the next request on a kept-alive connection
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            self._disarm_head_timer()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            # Counted from the second piece of a head on, so the end of a pipelined body never counts.
            inside_head = self._head_bytes is not None
            super().data_received(data)
            if not inside_head or self._head_bytes is None or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self._refuse(
                    b"431 Request Header Fields Too Large",
                    f"request line and headers are over {MAX_REQUEST_HEAD_BYTES} bytes; refusing the request",
                )

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm_head_timer()  # a request is being answered; a pipelined head waits its turn
                return
            self._refuse(
                b"408 Request Timeout",
                f"request head not received within {head_timeout_s:g} s (--body-timeout); send it in one piece",
            )

        def send_400_response(self, msg: str) -> None:
            # What the HTTP parser refuses gets the ErrorResponse body too, not uvicorn's plain text.
            self._refuse(b"400 Bad Request", "request is not valid HTTP/1.1; refusing it")

        def _refuse(self, status: bytes, message: str) -> None:
            body = error_body(message)
            self.transport.write(
                b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, len(body), body)
            )
            self.transport.close()

    return BoundedHeadProtocol


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    on_ready: Callable[[], None] | None = None,
    address_file: Path | None = None,
    startup: StartupLoad | None = None,
) -> None:
    """Run under uvicorn with uvloop/httptools when installed (about 2x the protocol ceiling).

    ``on_ready`` is called once the socket takes connections and, with ``startup`` (the bundles still
    loading on their thread), once they are loaded: the start-up timeline's end. A ``startup`` that
    fails stops the server (the caller re-raises its error). The socket is bound here, before uvicorn
    starts, so the address actually bound (``port`` 0 included) can be recorded in ``address_file``
    for the health check (see ``edgerun.address``)."""
    import signal

    import uvicorn

    from edgerun.address import remove_address, write_address

    config = getattr(app.state, "config", None)

    def _drained(signum, frame):
        raise SystemExit(0)

    # uvicorn drains on SIGTERM, then re-raises the signal to the previous handler; without this
    # a clean, drained shutdown would exit with -15 and look like a crash to supervisors.
    try:
        signal.signal(signal.SIGTERM, _drained)
    except ValueError:  # not the main thread (embedded use): keep the default
        pass
    bind_started = time.perf_counter()

    class Server(uvicorn.Server):
        _after_load: asyncio.Task | None = None  # held: the loop keeps only a weak reference to tasks

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                TIMELINE.add("bind", time.perf_counter() - bind_started)
                self._after_load = asyncio.create_task(self._when_loaded())

        async def _when_loaded(self) -> None:
            # Polled: readiness itself reads the repository's event directly, this only logs and tidies.
            while startup is not None and not startup.finished.is_set():
                await asyncio.sleep(0.005)
            if startup is not None and startup.error is not None:
                if not self.should_exit:  # not a load refused because the server was stopping already
                    startup.stopped_server = True
                    self.should_exit = True
                return
            if on_ready is not None:
                on_ready()
            metrics = getattr(app.state, "metrics", None)
            if isinstance(metrics, Metrics):  # its import waits until the server is ready
                asyncio.get_running_loop().run_in_executor(None, metrics.prepare)

    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",
        http=_http_protocol(config.body_timeout_s if isinstance(config, ServerConfig) else 60.0),
        log_level=log_level,
        timeout_graceful_shutdown=30,
        access_log=False,
    )
    sock = server_config.bind_socket()  # logs and exits 1 when the address is taken, as uvicorn.run does
    if address_file is not None:
        write_address(address_file, sock)
    server = Server(server_config)
    try:
        server.run(sockets=[sock])  # what uvicorn.run does for one worker without reload
    except KeyboardInterrupt:
        pass
    finally:
        if address_file is not None:
            remove_address(address_file)
        sock.close()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


# uvicorn's exit code when the server could not start (the port is taken, the lifespan failed).
STARTUP_FAILURE = 3


__all__ = ["ServerConfig", "create_app", "serve"]
