"""Health, server and model metadata (KServe v2), and Prometheus ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from edgerun.protocol import LAZY, ModelMetadata, ServerMetadata
from edgerun.routes.deps import ServerState, error_responses, server_state

router = APIRouter()


class Live(BaseModel):
    model_config = LAZY

    live: bool


class Ready(BaseModel):
    model_config = LAZY

    ready: bool


@router.get("/v2/health/live", response_model=Live, tags=["health"])
async def live(state: ServerState = Depends(server_state)) -> Live:
    return Live(live=state.dataplane.live())


@router.get(
    "/v2/health/ready",
    response_model=Ready,
    tags=["health"],
    responses={503: {"model": Ready, "description": "no model loaded yet"}},
)
async def ready(state: ServerState = Depends(server_state)):
    if not state.dataplane.ready():
        return JSONResponse({"ready": False}, status_code=503)
    return Ready(ready=True)


@router.get("/v2", response_model=ServerMetadata, tags=["metadata"], responses=error_responses(401))
async def server_metadata(state: ServerState = Depends(server_state)) -> ServerMetadata:
    return state.dataplane.server_metadata()


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=error_responses(401, 404), tags=["metadata"])
@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=error_responses(401, 404),
    tags=["metadata"],
    include_in_schema=False,
)
async def model_metadata(name: str, version: str | None = None, state: ServerState = Depends(server_state)):
    return state.dataplane.model_metadata(name, version)


@router.get("/v2/models/{name}/config", responses=error_responses(401, 404), tags=["metadata"])
@router.get("/v2/models/{name}/versions/{version}/config", include_in_schema=False)
async def model_config(
    name: str, version: str | None = None, state: ServerState = Depends(server_state)
) -> JSONResponse:
    """Triton's model configuration: input/output data types and dims, max_batch_size, parameters.metadata."""
    return JSONResponse(state.dataplane.model_config(name, version))


class ModelReady(BaseModel):
    model_config = LAZY

    name: str
    ready: bool


@router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=error_responses(401, 404), tags=["health"])
@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReady, include_in_schema=False)
async def model_ready(name: str, version: str | None = None, state: ServerState = Depends(server_state)) -> ModelReady:
    return ModelReady(name=name, ready=state.dataplane.model_ready(name, version))


@router.get("/metrics", tags=["metadata"], responses=error_responses(401))
async def prometheus_metrics(state: ServerState = Depends(server_state)) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
