"""KServe v2 inference: JSON tensors or Triton's binary tensor extension."""

from __future__ import annotations

import re
import zlib
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from edgerun.errors import PayloadTooLargeError, RequestError
from edgerun.memory import release_free_memory
from edgerun.protocol import HEADER_LENGTH, InferResponse, decode_infer_request, encode_infer_response
from edgerun.routes.deps import (
    RequestTimer,
    ServerState,
    accepts,
    error_responses,
    server_state,
    timed,
    timing,
)

router = APIRouter()

# Bodies above this are decoded on a worker thread so a large JSON tensor does not stall the loop.
OFFLOAD_DECODE_BYTES = 256 * 1024

INFER_BODY = {
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


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
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
    if not decoder.eof or decoder.unused_data:
        raise RequestError(f"body is not one complete {encoding} stream (cut short, or bytes after its end)")
    return out


def _decode_large(*args):
    """Decode a large JSON body; a big JSON tensor leaves megabytes of freed Python objects behind,
    which glibc keeps mapped (RSS grows ~10 MB per few dozen requests) unless trimmed."""
    try:
        return decode_infer_request(*args)
    finally:
        release_free_memory()


@router.post(
    "/v2/models/{name}/infer",
    openapi_extra=INFER_BODY,
    tags=["inference"],
    responses={200: {"model": InferResponse}, **error_responses(400, 401, 404, 408, 413, 415, 503, 504)},
    dependencies=[Depends(accepts("application/json", "application/octet-stream", missing_ok=True))],
)
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    include_in_schema=False,
    dependencies=[Depends(accepts("application/json", "application/octet-stream", missing_ok=True))],
)
async def infer(
    name: str,
    request: Request,
    version: str | None = None,
    state: ServerState = Depends(server_state),
    timer: RequestTimer = Depends(timed("infer")),
) -> Response:
    return await answer_infer(state, request, name, version, timer)


async def answer_infer(state: ServerState, request: Request, name: str, version: str | None, timer: RequestTimer):
    """The infer route's work, shared by the FastAPI route and the ASGI fast path (``InferFastPath``):
    read and decode the body, run it on the data plane, encode the results."""
    dataplane = state.dataplane
    served = dataplane.model(name, version)
    timer.label = served.name  # a name from the URL is only a label once it names a served model
    raw = await request.body()
    headers = request.headers
    encoding = headers.get("content-encoding")
    limit = state.config.max_body_bytes
    if encoding and encoding != "identity":  # a small gzip body can inflate to --max-body-mb
        body = await run_in_threadpool(decompress, raw, encoding, limit)
    else:
        body = raw
    header_length = headers.get(HEADER_LENGTH)
    client = request.client.host if request.client else None

    def shm():
        return state.local_shm(client)

    args = (body, served.session.inputs, served.session.output_names, header_length, shm)
    if len(body) > OFFLOAD_DECODE_BYTES and header_length is None:
        # Large JSON tensors take tens of ms to parse; binary ones are a zero-copy view.
        parsed = await run_in_threadpool(_decode_large, *args)
    else:
        parsed = decode_infer_request(*args)
    results = await dataplane.run(served, parsed.feeds, parsed.timeout_s)
    content, out_headers, media_type = encode_infer_response(
        served.name, served.version, parsed.id, results, parsed.outputs, parsed.regions, shm
    )
    return Response(content, media_type=media_type, headers=out_headers)


# The two infer routes above; ``[^/]+`` is what FastAPI's ``{name}`` matches.
INFER_PATH = re.compile(r"^/v2/models/([^/]+)/(?:versions/([^/]+)/)?infer$")
_check_infer_type = accepts("application/json", "application/octet-stream", missing_ok=True)


class InferFastPath:
    """ASGI middleware answering ``POST`` on the infer routes without FastAPI's routing and dependency
    solving (a third of a small request's event-loop time), with the same steps in the same order:
    Content-Type check (415, not timed, as a route dependency), then timing into metrics, then
    ``answer_infer``; errors get the responses the app's exception handlers give. Everything else,
    and the OpenAPI document, goes to the app.
    """

    def __init__(self, app, state: ServerState, on_error: Callable[[Request, Exception], Awaitable[Response]]):
        self.app = app
        self.state = state
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        match = INFER_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            await _check_infer_type(request)
            response = await self._timed(request, match.group(1), match.group(2))
        except Exception as exc:  # noqa: BLE001 - answered like the app's exception handlers answer it
            response = await self.on_error(request, exc)
        await response(scope, receive, send)

    async def _timed(self, request: Request, name: str, version: str | None) -> Response:
        async with timing(self.state.metrics, "infer") as timer:
            return await answer_infer(self.state, request, name, version, timer)
