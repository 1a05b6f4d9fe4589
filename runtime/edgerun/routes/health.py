"""Health, server and model metadata (KServe v2), and Prometheus ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

import edgerun
from edgerun.loader import ServedModel
from edgerun.protocol import MetadataTensor, ModelMetadata, ServerMetadata
from edgerun.routes.deps import ServerState, error_responses, server_state

router = APIRouter()


def model_metadata_of(served: ServedModel, extra: dict[str, Any] | None = None) -> ModelMetadata:
    session = served.session
    return ModelMetadata(
        name=served.name,
        versions=[served.version],
        platform="onnxruntime_onnx",
        inputs=[MetadataTensor(name=s.name, datatype=s.kserve_datatype, shape=s.shape) for s in session.inputs],
        outputs=[MetadataTensor(name=s.name, datatype=s.kserve_datatype, shape=s.shape) for s in session.outputs],
        parameters={**served.status.to_json(), "task": served.manifest.task_name(), **(extra or {})},
    )


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


@router.get("/v2/health/live", response_model=Live, tags=["health"])
async def live() -> Live:
    return Live(live=True)


@router.get(
    "/v2/health/ready",
    response_model=Ready,
    tags=["health"],
    responses={503: {"model": Ready, "description": "no model loaded yet"}},
)
async def ready(state: ServerState = Depends(server_state)):
    if not state.repo.models:
        return JSONResponse({"ready": False}, status_code=503)
    return Ready(ready=True)


@router.get("/v2", response_model=ServerMetadata, tags=["metadata"], responses=error_responses(401))
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(
        name="edgerun", version=edgerun.__version__, extensions=["binary_tensor_data", "model_repository"]
    )


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=error_responses(401, 404), tags=["metadata"])
@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=error_responses(401, 404),
    tags=["metadata"],
    include_in_schema=False,
)
async def model_metadata(name: str, version: str | None = None, state: ServerState = Depends(server_state)):
    served = state.lookup(name, version)
    config = state.config
    return model_metadata_of(served, {"max_batch": config.max_batch, "max_delay_ms": config.max_delay_ms})


class ModelReady(BaseModel):
    name: str
    ready: bool


@router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=error_responses(401, 404), tags=["health"])
@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReady, include_in_schema=False)
async def model_ready(name: str, version: str | None = None, state: ServerState = Depends(server_state)) -> ModelReady:
    state.lookup(name, version)
    return ModelReady(name=name, ready=True)


@router.get("/metrics", tags=["metadata"], responses=error_responses(401))
async def prometheus_metrics(state: ServerState = Depends(server_state)) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
