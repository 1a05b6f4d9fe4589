"""Model repository (KServe v2 / Triton repository extension): the index, and model control.

Load and unload are model control: off unless the server runs with ``--model-control``, guarded
by the admin token, JSON bodies only, and a load reads only what ``edgerun.control`` allows.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from edgerun.control import ModelControl
from edgerun.errors import EdgerunError, RequestError
from edgerun.loader import ServedModel
from edgerun.protocol import LAZY
from edgerun.routes.deps import ServerState, accepts, error_responses, model_control, served_source, server_state

log = logging.getLogger("edgerun")
router = APIRouter(tags=["repository"])


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    bundle: str | None = Field(
        None,
        description="a bundle name (or path) in the repository directory (--watch), or a kept version's path "
        "under <cache-dir>/models; omitted: re-read the served model, or load NAME from the repository directory",
    )


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="allow", defer_build=True)
    parameters: LoadParameters | None = None


class LoadResponse(BaseModel):
    model_config = LAZY

    name: str
    version: str
    parameters: dict[str, Any]


class IndexEntry(BaseModel):
    model_config = LAZY

    name: str
    version: str
    state: str


JSON_ONLY = [Depends(accepts("application/json", missing_ok=False))]
LOAD_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoadRequest"}}},
    }
}


async def load_by_name(state: ServerState, control: ModelControl, name: str, requested: str | None) -> ServedModel:
    """Model control's load, for every door (the caller has checked the model-control rules)."""
    location = control.resolve(name, requested, served_source(state, name))
    try:
        served = await run_in_threadpool(state.repo.load, location, name)
    except EdgerunError as exc:
        state.metrics.count_reload(name if name in state.repo.models else "unknown", "refused")
        log.error("load of %s refused, previous version keeps serving: %s", name, exc)
        raise RequestError(f"load refused, previous version keeps serving: {exc}") from None
    state.metrics.count_reload(served.name, "loaded")
    return served


@router.post("/v2/repository/index", response_model=list[IndexEntry], responses=error_responses(401))
async def repository_index(state: ServerState = Depends(server_state)) -> list[IndexEntry]:
    return [IndexEntry(name=s.name, version=s.version, state="READY") for s in state.repo.models.values()]


def _parse_load(body: bytes) -> str | None:
    if not body.strip():
        return None
    try:
        request = LoadRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(
            f'invalid load request at \'{where}\': {first["msg"]}; send {{"parameters": {{"bundle": NAME}}}}'
        ) from None
    return request.parameters.bundle if request.parameters else None


@router.post(
    "/v2/repository/models/{name}/load",
    response_model=LoadResponse,
    responses=error_responses(400, 401, 403, 404, 408, 413, 415),
    dependencies=JSON_ONLY,
    openapi_extra=LOAD_BODY,
)
async def repository_load(
    name: str,
    request: Request,
    state: ServerState = Depends(server_state),
    control: ModelControl = Depends(model_control),
) -> LoadResponse:
    """Load or reload a model: verify, load, golden-check and warm the bundle, then swap it in atomically.

    A bundle that fails any check is refused (400) and the old one keeps serving.
    """
    served = await load_by_name(state, control, name, _parse_load(await request.body()))
    return LoadResponse(name=served.name, version=served.version, parameters=served.status.to_json())


@router.post(
    "/v2/repository/models/{name}/unload",
    response_model=IndexEntry,
    responses=error_responses(401, 403, 404, 415),
    dependencies=[*JSON_ONLY, Depends(model_control)],
    openapi_extra={"requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def repository_unload(name: str, state: ServerState = Depends(server_state)) -> IndexEntry:
    """Stop serving a model; requests already running on it finish."""
    served = await run_in_threadpool(state.repo.unload, name)
    return IndexEntry(name=served.name, version=served.version, state="UNAVAILABLE")
