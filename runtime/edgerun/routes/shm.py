"""Triton's system shared-memory extension over REST: register, status, unregister (see ``edgerun.shm``).

Off unless ``--allow-shm``; only clients on this host (a loopback address). Infer requests then name a
region in an input's or output's ``parameters`` (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``) instead of carrying the tensor.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from edgerun.errors import RequestError
from edgerun.routes.deps import ServerState, accepts, error_responses, server_state

router = APIRouter()

# tritonclient sends these JSON bodies without a Content-Type header.
JSON_BODY = [Depends(accepts("application/json", missing_ok=True))]
SHM_ERRORS = error_responses(400, 401, 403)


class RegisterRegion(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    key: str
    offset: int = 0
    byte_size: int


class RegionStatus(BaseModel):
    model_config = ConfigDict(defer_build=True)

    name: str
    key: str
    offset: int
    byte_size: int


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


@router.post(
    "/v2/systemsharedmemory/region/{name}/register",
    tags=["shared memory"],
    responses=error_responses(400, 401, 403, 408, 413, 415),
    dependencies=JSON_BODY,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RegisterRegion"}}},
        }
    },
)
async def register_region(name: str, request: Request, state: ServerState = Depends(server_state)) -> dict:
    """Map a shared-memory segment (key, offset, byte_size) under ``name``."""
    shm = state.local_shm(_client(request))
    try:
        body = RegisterRegion.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"invalid register request at '{where}': {first['msg']}") from None
    shm.register(name, body.key, body.offset, body.byte_size)
    return {}


@router.get("/v2/systemsharedmemory/status", tags=["shared memory"], responses=SHM_ERRORS)
@router.get("/v2/systemsharedmemory/region/{name}/status", tags=["shared memory"], responses=SHM_ERRORS)
async def region_status(
    request: Request, name: str | None = None, state: ServerState = Depends(server_state)
) -> list[RegionStatus]:
    regions = state.local_shm(_client(request)).status(name)
    return [RegionStatus(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions]


@router.post(
    "/v2/systemsharedmemory/unregister",
    tags=["shared memory"],
    responses=error_responses(400, 401, 403, 415),
    dependencies=JSON_BODY,
)
@router.post(
    "/v2/systemsharedmemory/region/{name}/unregister",
    tags=["shared memory"],
    responses=error_responses(400, 401, 403, 415),
    dependencies=JSON_BODY,
)
async def unregister_region(
    request: Request, name: str | None = None, state: ServerState = Depends(server_state)
) -> dict:
    """Unmap ``name`` (every region without one)."""
    state.local_shm(_client(request)).unregister(name)
    return {}
