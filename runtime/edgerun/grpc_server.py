"""KServe v2 / Open Inference Protocol over gRPC: a door onto the :class:`edgerun.dataplane.DataPlane`.

Off unless ``edgerun serve --grpc-port PORT``. It runs on the HTTP server's event loop (``grpc.aio``),
beside the REST door, so both share the batcher, the queue limits and the request timeout. The stubs
are the ones ``tritonclient[grpc]`` ships, generated from Triton's ``grpc_service.proto``
(triton-inference-server/common, package ``inference``: the KServe v2 ``GRPCInferenceService`` plus
Triton's ``ModelConfig``), so ``tritonclient.grpc`` and clients built on it (Ultralytics' Triton client)
work unmodified.

Same rules as REST: bound to ``--host``; the inference token (``authorization: Bearer TOKEN``
metadata) on everything but ServerLive/ServerReady; messages bounded by ``--max-body-mb`` both ways
(grpc's own default receive limit, 4 MiB, would refuse a 1x3x640x640 FP32 frame). Model control
(RepositoryModelLoad/Unload) follows REST's rules: off unless --model-control, then the admin token,
or without one a loopback peer. ModelStreamInfer answers each request of a stream in order. System
shared memory (``--allow-shm``, loopback peers only; see ``edgerun.shm``) passes inputs and outputs by
region.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from edgerun.config import ServerConfig
from edgerun.control import ModelControl
from edgerun.dataplane import DataPlane
from edgerun.errors import EdgerunError, ForbiddenError, RequestError, UnauthorizedError
from edgerun.guard import bearer_matches
from edgerun.manifest import KSERVE_DATATYPES
from edgerun.routes.deps import ServerState, check_model_control
from edgerun.routes.repository import load_by_name
from edgerun.shm import SharedMemory

log = logging.getLogger("edgerun")

NUMPY_BY_KSERVE = {v: k for k, v in KSERVE_DATATYPES.items()}
# Typed ``contents`` field of each datatype (when a client sends values instead of raw bytes).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _region(parameters: Any) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) of a tensor passed through shared memory, or None."""
    if "shared_memory_region" not in parameters:
        return None
    region = parameters["shared_memory_region"].string_param
    size = parameters["shared_memory_byte_size"].int64_param if "shared_memory_byte_size" in parameters else -1
    offset = parameters["shared_memory_offset"].int64_param if "shared_memory_offset" in parameters else 0
    return region, offset, size


def decode_inputs(request: Any, shm: SharedMemory | None = None) -> dict[str, np.ndarray]:
    """Tensors of a ``ModelInferRequest``: a shared-memory region, ``raw_input_contents`` (one entry per
    input not in shared memory, in order) or typed ``contents``."""
    raw = list(request.raw_input_contents)
    regions = [_region(tensor.parameters) for tensor in request.inputs]
    if any(regions) and shm is None:
        raise ForbiddenError("system shared memory is off; start the server with --allow-shm")
    if raw and len(raw) != regions.count(None):
        raise RequestError(
            f"raw_input_contents has {len(raw)} entries for {regions.count(None)} inputs not in shared memory; "
            f"send one per input"
        )
    raw.reverse()  # consumed in order with pop()
    feeds: dict[str, np.ndarray] = {}
    for tensor, region in zip(request.inputs, regions):
        if tensor.name in feeds:
            raise RequestError(f"input '{tensor.name}' is given twice")
        name = NUMPY_BY_KSERVE.get(tensor.datatype)
        if name is None:
            raise RequestError(f"input '{tensor.name}': datatype {tensor.datatype!r} is not supported")
        dtype = np.dtype(name)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise RequestError(f"input '{tensor.name}': shape {shape} has a negative dimension")
        count = math.prod(shape)
        data: bytes | None = None
        if region is not None and shm is not None:
            name, offset, size = region
            if size != count * dtype.itemsize:
                raise RequestError(
                    f"input '{tensor.name}': shared_memory_byte_size {size} but shape {shape} of {tensor.datatype} "
                    f"needs {count * dtype.itemsize}"
                )
            data = shm.read(name, offset, size)
        elif raw:
            data = raw.pop()
        if data is not None:
            if len(data) != count * dtype.itemsize:
                raise RequestError(
                    f"input '{tensor.name}': {len(data)} raw bytes but shape {shape} of {tensor.datatype} "
                    f"needs {count * dtype.itemsize}"
                )
            feeds[tensor.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
            continue
        values = getattr(tensor.contents, _CONTENTS[tensor.datatype]) if tensor.datatype in _CONTENTS else []
        if len(values) != count:
            raise RequestError(f"input '{tensor.name}' has {len(values)} values but shape {shape} needs {count}")
        array = np.asarray(values)
        if dtype.kind in "iu" and array.size:
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise RequestError(f"input '{tensor.name}' has values outside the {name} range")
        feeds[tensor.name] = array.astype(dtype).reshape(shape)
    return feeds


def _timeout_s(request: Any) -> float | None:
    if "timeout" not in request.parameters:
        return None
    parameter = request.parameters["timeout"]
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise RequestError(f"parameters.timeout must be a positive number of microseconds, got {value!r}")
    return value / 1e6


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:/path``)."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return "localhost"
    return rest.rsplit(":", 1)[0].strip("[]")


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the data plane (and model control, with its own rules)."""

    def __init__(self, state: ServerState):
        self.state = state
        self.dataplane: DataPlane = state.dataplane
        self.config: ServerConfig = state.config

    def _local_shm(self, context: Any) -> SharedMemory:
        """The server's shared memory (one registry for both doors), for a local peer with --allow-shm."""
        return self.state.local_shm(peer_host(context.peer()))

    async def SystemSharedMemoryStatus(self, request, context):
        def answer():
            regions = self._local_shm(context).status(request.name or None)
            status = service_pb2.SystemSharedMemoryStatusResponse.RegionStatus
            return service_pb2.SystemSharedMemoryStatusResponse(
                regions={
                    r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions
                }
            )

        return await self._answer(context, answer)

    async def SystemSharedMemoryRegister(self, request, context):
        def answer():
            self._local_shm(context).register(request.name, request.key, request.offset, request.byte_size)
            return service_pb2.SystemSharedMemoryRegisterResponse()

        return await self._answer(context, answer)

    async def SystemSharedMemoryUnregister(self, request, context):
        def answer():
            self._local_shm(context).unregister(request.name or None)
            return service_pb2.SystemSharedMemoryUnregisterResponse()

        return await self._answer(context, answer)

    async def _answer(self, context: Any, call, *, authorized: bool = True):
        try:
            if authorized:
                self._check_token(context)
            return call()
        except EdgerunError as exc:
            await context.abort(_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL), str(exc))

    def _check_token(self, context: Any) -> None:
        token = self.config.token
        if token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_matches(metadata.get("authorization"), token):
            raise UnauthorizedError("this server needs 'authorization: Bearer <token>' metadata (--token)")

    async def ServerLive(self, request, context):
        return await self._answer(
            context, lambda: service_pb2.ServerLiveResponse(live=self.dataplane.live()), authorized=False
        )

    async def ServerReady(self, request, context):
        return await self._answer(
            context, lambda: service_pb2.ServerReadyResponse(ready=self.dataplane.ready()), authorized=False
        )

    async def ModelReady(self, request, context):
        return await self._answer(
            context,
            lambda: service_pb2.ModelReadyResponse(
                ready=self.dataplane.model_ready(request.name, request.version or None)
            ),
        )

    async def ServerMetadata(self, request, context):
        def answer():
            meta = self.dataplane.server_metadata()
            return service_pb2.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

        return await self._answer(context, answer)

    async def ModelMetadata(self, request, context):
        def answer():
            meta = self.dataplane.model_metadata(request.name, request.version or None)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
            )

        return await self._answer(context, answer)

    async def ModelConfig(self, request, context):
        def answer():
            config = self.dataplane.model_config(request.name, request.version or None)
            return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

        return await self._answer(context, answer)

    def _control(self, context: Any) -> ModelControl:
        """Model control's rules, as over REST: on with --model-control; the admin token, or without one a
        loopback peer (the inference token does not unlock it)."""
        metadata = dict(context.invocation_metadata() or ())
        return check_model_control(self.state, metadata.get("authorization"), peer_host(context.peer()))

    async def RepositoryIndex(self, request, context):
        def answer():
            self._check_token(context)
            entry = service_pb2.RepositoryIndexResponse.ModelIndex
            models = self.state.repo.models.values()
            return service_pb2.RepositoryIndexResponse(
                models=[entry(name=s.name, version=s.version, state="READY") for s in models]
            )

        return await self._answer(context, answer, authorized=False)

    async def RepositoryModelLoad(self, request, context):
        try:
            control = self._control(context)
            requested = request.parameters["bundle"].string_param if "bundle" in request.parameters else None
            await load_by_name(self.state, control, request.model_name, requested or None)
        except EdgerunError as exc:
            await context.abort(_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL), str(exc))
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            self._control(context)
            await asyncio.to_thread(self.state.repo.unload, request.model_name)
        except EdgerunError as exc:
            await context.abort(_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL), str(exc))
        return service_pb2.RepositoryModelUnloadResponse()

    async def _infer(self, request: Any, context: Any) -> Any:
        """One ModelInferRequest through the data plane; EdgerunError for what the caller did wrong."""
        in_shm = any(_region(t.parameters) for t in request.inputs) or any(
            _region(o.parameters) for o in request.outputs
        )
        shm = self._local_shm(context) if in_shm else None
        feeds = decode_inputs(request, shm)
        served, results = await self.dataplane.infer(
            request.model_name,
            feeds,
            version=request.model_version or None,
            outputs=[output.name for output in request.outputs] or None,
            timeout_s=_timeout_s(request),
        )
        response = service_pb2.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
        placed = {o.name: _region(o.parameters) for o in request.outputs}
        for name, value in results.items():
            array = np.ascontiguousarray(value)
            output = response.outputs.add(
                name=name, datatype=KSERVE_DATATYPES[array.dtype.name], shape=list(array.shape)
            )
            region = placed.get(name)
            if region is not None and shm is not None:
                shm.write(region[0], region[1], region[2], array.tobytes())
                output.parameters["shared_memory_region"].string_param = region[0]
                output.parameters["shared_memory_byte_size"].int64_param = array.nbytes
                if region[1]:
                    output.parameters["shared_memory_offset"].int64_param = region[1]
                response.raw_output_contents.append(b"")  # keeps the other outputs' entries in order
            else:
                response.raw_output_contents.append(array.tobytes())
        return response

    async def ModelInfer(self, request, context):
        try:
            self._check_token(context)
            return await self._infer(request, context)
        except EdgerunError as exc:
            await context.abort(_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL), str(exc))

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests on one stream, answered in order; a refused request is an ``error_message`` on the
        stream (as Triton answers), the stream itself stays open."""
        try:
            self._check_token(context)
        except EdgerunError as exc:
            await context.abort(_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL), str(exc))
        async for request in request_iterator:
            try:
                yield service_pb2.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except EdgerunError as exc:
                yield service_pb2.ModelStreamInferResponse(
                    error_message=str(exc), infer_response=service_pb2.ModelInferResponse(id=request.id)
                )


def message_limit(config: ServerConfig) -> int:
    """Largest message either way: the REST body limit (``--max-body-mb``, 64 MiB by default)."""
    return config.max_body_bytes


async def start_grpc(state: ServerState, host: str, port: int) -> Any:
    """Bind and start the gRPC server on the running event loop; the caller stops it (``await server.stop``)."""
    limit = message_limit(state.config)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a shared port
        ]
    )
    servicer = InferenceServicer(state)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise EdgerunError(f"gRPC cannot bind {address} (--grpc-port); is the port taken?")
    await server.start()
    log.info("gRPC (KServe v2) on %s, messages up to %d bytes", address, limit)
    return GrpcDoor(server, servicer)


class GrpcDoor:
    """The running gRPC server and what it holds (shared-memory mappings)."""

    def __init__(self, server: Any, servicer: InferenceServicer):
        self.server = server
        self.servicer = servicer

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
