"""KServe v2 REST server (plus /v1/predict and /metrics) over a ModelRepository.

Handlers validate and decode, then hand tensors to the Batcher, whose single worker thread
is the only place inference runs. Every user mistake is a 4xx with a message; a 500 means a
bug in edgerun and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

import edgerun
from edgerun.batching import Batcher
from edgerun.errors import EdgerunError, ModelNotFoundError, OverloadedError, PayloadTooLargeError, RequestError
from edgerun.metrics import Metrics
from edgerun.preprocess import classify, preprocess_image
from edgerun.protocol import (
    HEADER_LENGTH,
    ErrorResponse,
    InferRequest,
    InferResponse,
    MetadataTensor,
    ModelMetadata,
    PredictResponse,
    ServerMetadata,
    decode_infer_request,
    encode_infer_response,
)
from edgerun.reload import ModelRepository, bundle_entries, watch_directory
from edgerun.tensorrt import check_batch

log = logging.getLogger("edgerun")

# Metrics label for requests naming no served model: one series for all of them, however many names.
UNKNOWN_MODEL = "unknown"

# Bodies above this are decoded on a worker thread so a large JSON tensor does not stall the loop.
_OFFLOAD_DECODE_BYTES = 256 * 1024


@dataclass
class ServerConfig:
    token: str | None = None
    max_body_mb: float = 64.0
    max_batch: int = 1
    max_delay_ms: float = 2.0
    max_queue: int = 64
    max_queue_bytes: int | None = None
    timeout_s: float = 30.0
    watch_dir: Path | None = None
    watch_interval_s: float = 1.0
    drain_timeout_s: float = 30.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


class GuardMiddleware:
    """Bearer token (everything but health) and request body limit, before any handler runs."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = f"Bearer {token}".encode() if token else None
        self.max_body = max_body

    async def _reject(self, send, status: int, message: str, headers=()) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *headers],
            }
        )
        await send({"type": "http.response.body", "body": _error_body(message)})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and not scope["path"].startswith("/v2/health"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.token):
                return await self._reject(
                    send,
                    401,
                    "missing or wrong bearer token; send 'Authorization: Bearer <token>' (see --token / EDGERUN_TOKEN)",
                    [(b"www-authenticate", b"Bearer")],
                )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await self._reject(
                    send, 400, f"Content-Length {length.decode(errors='replace')!r} is not a number"
                )
            if too_big:
                return await self._reject(
                    send,
                    413,
                    f"request body of {int(length)} bytes is over the {self.max_body} byte limit (--max-body-mb)",
                )
        received = 0
        limit = self.max_body

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"request body is over the {limit} byte limit (--max-body-mb)")
            return message

        return await self.app(scope, counting_receive, send)


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    try:
        decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"body is not valid {encoding} data ({exc})") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"decompressed body is over the {limit} byte limit (--max-body-mb)")
    return out


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - present on glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _decode_large(*args):
    """Decode a large JSON body; a big JSON tensor leaves megabytes of freed Python objects behind,
    which glibc keeps mapped (RSS grows ~10 MB per few dozen requests) unless trimmed."""
    try:
        return decode_infer_request(*args)
    finally:
        _release_free_memory()


def _metadata(served) -> ModelMetadata:
    session = served.session
    return ModelMetadata(
        name=served.name,
        versions=[served.version],
        platform="onnxruntime_onnx",
        inputs=[MetadataTensor(name=s.name, datatype=s.kserve_datatype, shape=s.shape) for s in session.inputs],
        outputs=[MetadataTensor(name=s.name, datatype=s.kserve_datatype, shape=s.shape) for s in session.outputs],
        parameters=served.parameters,
    )


def create_app(repo: ModelRepository, config: ServerConfig | None = None, metrics: Metrics | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = metrics or Metrics()
    batcher_box: dict[str, Batcher] = {}

    def describe(served) -> None:
        metrics.describe_model(served.name, served.version, served.parameters)

    repo.on_change = describe
    for served in repo.models.values():
        describe(served)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(
            max_batch=config.max_batch,
            max_delay_ms=config.max_delay_ms,
            max_queue=config.max_queue,
            max_queue_bytes=config.max_queue_bytes,
            timeout_s=config.timeout_s,
            on_batch=metrics.batch_size.observe,
        )
        batcher.start()
        batcher_box["batcher"] = batcher
        metrics.track_queue(lambda: batcher.depth)
        watcher = None
        if config.watch_dir is not None:
            watcher = asyncio.create_task(
                watch_directory(repo, config.watch_dir, config.watch_interval_s, seen=bundle_entries(config.watch_dir))
            )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await batcher.close(config.drain_timeout_s)

    app = FastAPI(
        title="edgerun",
        version=edgerun.__version__,
        lifespan=lifespan,
        description="KServe v2 inference server for edgebuild bundles",
    )
    app.state.repo = repo
    app.state.metrics = metrics
    app.state.config = config
    app.state.batchers = batcher_box

    @app.exception_handler(EdgerunError)
    async def _edgerun_error(request: Request, exc: EdgerunError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, OverloadedError) else None
        return Response(
            _error_body(str(exc)), status_code=exc.http_status, headers=headers, media_type="application/json"
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return Response(
            _error_body(f"invalid request at '{where}': {first['msg']}"), status_code=400, media_type="application/json"
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return Response(
            _error_body(f"internal error ({type(exc).__name__}); see the server log"),
            status_code=500,
            media_type="application/json",
        )

    def batcher() -> Batcher:
        if "batcher" not in batcher_box:  # lifespan not run (e.g. app mounted elsewhere)
            raise OverloadedError("server is starting; retry shortly")
        return batcher_box["batcher"]

    errors = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready():
        if not repo.models:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True}

    @app.get("/v2", response_model=ServerMetadata, tags=["metadata"])
    async def server_metadata():
        return ServerMetadata(
            name="edgerun", version=edgerun.__version__, extensions=["binary_tensor_data", "model_repository"]
        )

    def lookup(name: str, version: str | None = None):
        served = repo.get(name)
        if version and version != served.version:
            raise ModelNotFoundError(
                f"model '{name}' version '{version}' is not served; current version is '{served.version}'"
            )
        return served

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses=errors, tags=["metadata"])
    @app.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadata,
        responses=errors,
        tags=["metadata"],
        include_in_schema=False,
    )
    async def model_metadata(name: str, version: str | None = None):
        served = lookup(name, version)
        return _metadata(served).model_copy(
            update={
                "parameters": {**served.parameters, "max_batch": config.max_batch, "max_delay_ms": config.max_delay_ms}
            }
        )

    @app.get("/v2/models/{name}/ready", responses=errors, tags=["health"])
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        lookup(name, version)
        return {"name": name, "ready": True}

    infer_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                "application/octet-stream": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": f"JSON header ({HEADER_LENGTH} bytes) followed by binary tensors",
                    }
                },
            },
        }
    }

    @app.post(
        "/v2/models/{name}/infer",
        openapi_extra=infer_body,
        tags=["inference"],
        responses={
            200: {"model": InferResponse},
            **errors,
            413: {"model": ErrorResponse},
            504: {"model": ErrorResponse},
        },
    )
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request, version: str | None = None):
        started = time.perf_counter()
        code = 500
        label = UNKNOWN_MODEL  # a name from the URL is only a label once it names a served model
        try:
            served = lookup(name, version)
            label = served.name
            body = _decompress(await request.body(), request.headers.get("content-encoding"), config.max_body_bytes)
            args = (body, served.session.inputs, served.session.output_names, request.headers.get(HEADER_LENGTH))
            if len(body) > _OFFLOAD_DECODE_BYTES and HEADER_LENGTH not in request.headers:
                # Large JSON tensors take tens of ms to parse; binary ones are a zero-copy view.
                parsed = await run_in_threadpool(_decode_large, *args)
            else:
                parsed = decode_infer_request(*args)
            check_batch(served.session.max_batch, parsed.feeds)
            results = await batcher().submit(served.session, parsed.feeds, parsed.timeout_s)
            content, headers, media_type = encode_infer_response(
                served.name, served.version, parsed.id, results, parsed.outputs
            )
            code = 200
            return Response(content, media_type=media_type, headers=headers)
        except EdgerunError as exc:
            code = exc.http_status
            raise
        finally:
            metrics.observe(label, "infer", code, time.perf_counter() - started)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        tags=["inference"],
        responses={**errors, 413: {"model": ErrorResponse}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
                    },
                },
            }
        },
    )
    async def predict(request: Request, model: str | None = None):
        """Raw image bytes (or a multipart upload) in, top-k classes out, using the manifest's pre/post-processing."""
        started = time.perf_counter()
        code = 500
        label = UNKNOWN_MODEL
        try:
            served = repo.get(model)
            label = served.name
            spec = served.manifest.preprocess
            if not spec:
                raise RequestError(
                    f"model '{served.name}' has no 'preprocess' in its manifest; send tensors to "
                    f"/v2/models/{served.name}/infer instead"
                )
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                uploads = [v for v in form.values() if hasattr(v, "read")]
                if not uploads:
                    raise RequestError("multipart body has no file part; upload the image as a file field")
                data = await uploads[0].read()
            else:
                data = await request.body()
            array = await run_in_threadpool(preprocess_image, data, spec)
            input_name = spec.get("input", served.session.inputs[0].name)
            if len(served.session.inputs) != 1:
                raise RequestError(
                    f"/v1/predict feeds one image but model '{served.name}' has inputs "
                    f"{[s.name for s in served.session.inputs]}; use the v2 infer endpoint"
                )
            results = await batcher().submit(served.session, {input_name: array})
            post = served.manifest.postprocess or {"type": "classification", "top_k": 5}
            output_name = post.get("output", served.session.output_names[0])
            code = 200
            return PredictResponse(
                model_name=served.name, predictions=classify(results[output_name], post, served.labels)
            )
        except EdgerunError as exc:
            code = exc.http_status
            raise
        finally:
            metrics.observe(label, "predict", code, time.perf_counter() - started)

    @app.post("/v2/repository/index", tags=["repository"])
    async def repository_index() -> list[dict[str, Any]]:
        return [{"name": s.name, "version": s.version, "state": "READY"} for s in repo.models.values()]

    @app.post("/v2/repository/models/{name}/load", tags=["repository"], responses=errors)
    async def repository_load(name: str, request: Request) -> dict[str, Any]:
        """Reload a model: verify, load, golden-check and warm the bundle, then swap it in atomically.

        Body (optional): ``{"parameters": {"bundle": "/path/to/bundle"}}``; without it the model is
        re-read from where it was loaded. A bundle that fails any check is refused; the old one keeps serving.
        """
        body = await request.body()
        location = None
        if body.strip():
            try:
                document = orjson.loads(body)
                location = (document.get("parameters") or {}).get("bundle")
            except (orjson.JSONDecodeError, AttributeError):
                raise RequestError('load body must be JSON like {"parameters": {"bundle": "/path"}}') from None
            if location is not None and not isinstance(location, str):
                raise RequestError(f"parameters.bundle must be a path string, got {type(location).__name__}")
        if location is None and name not in repo.models:
            raise ModelNotFoundError(f"model '{name}' is not loaded; pass parameters.bundle with its path")
        try:
            served = await run_in_threadpool(repo.reload, name, location)
        except EdgerunError as exc:
            metrics.reloads.labels(name, "refused").inc()
            log.error("load of %s refused, previous version keeps serving: %s", name, exc)
            raise RequestError(f"load refused, previous version keeps serving: {exc}") from None
        metrics.reloads.labels(name, "loaded").inc()
        return {"name": served.name, "version": served.version, "parameters": served.parameters}

    @app.get("/metrics", tags=["metadata"])
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            request_schema = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(request_schema.pop("$defs", {}))
            components["InferRequest"] = request_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(GuardMiddleware, token=config.token, max_body=config.max_body_bytes)
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run under uvicorn with uvloop/httptools when installed (about 2x the protocol ceiling)."""
    import signal

    import uvicorn

    def _drained(signum, frame):
        raise SystemExit(0)

    # uvicorn drains on SIGTERM, then re-raises the signal to the previous handler; without this
    # a clean, drained shutdown would exit with -15 and look like a crash to supervisors.
    try:
        signal.signal(signal.SIGTERM, _drained)
    except ValueError:  # not the main thread (embedded use): keep the default
        pass
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="auto",
        http="auto",
        log_level=log_level,
        timeout_graceful_shutdown=30,
        access_log=False,
    )


__all__ = ["ServerConfig", "create_app", "serve"]
