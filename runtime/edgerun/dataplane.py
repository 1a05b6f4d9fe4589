"""The data plane: what every door (REST routes, the ASGI fast path, gRPC) asks of the server.

One ``DataPlane`` over the model repository and the batcher answers health, server and model
metadata, the model configuration and inference on decoded tensors. A door only translates its wire
format (JSON or binary tensors, protobuf) into these calls and their results back, so two doors
cannot drift apart, and the core is tested without a server (as KServe's ``protocol/dataplane.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import edgerun
from edgerun.batching import Batcher
from edgerun.config import ServerConfig
from edgerun.errors import ModelNotFoundError, OverloadedError, RequestError
from edgerun.loader import ServedModel
from edgerun.model_config import PLATFORM, triton_config
from edgerun.protocol import MetadataTensor, ModelMetadata, ServerMetadata
from edgerun.reload import ModelRepository
from edgerun.tensorrt import check_batch

EXTENSIONS = ["binary_tensor_data", "model_repository"]


class DataPlane:
    """Health, metadata, configuration and inference over a repository and its batcher.

    The batcher is set when the server starts (it needs the running event loop); before that an
    inference is answered 503 (retry shortly).
    """

    def __init__(self, repo: ModelRepository, config: ServerConfig, batcher: Batcher | None = None):
        self.repo = repo
        self.config = config
        self.batcher = batcher

    # ---- health and metadata ----

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready once the bundles the server started with are loaded and a model serves (health/ready
        is 503 before)."""
        return self.repo.initial_load.is_set() and bool(self.repo.models)

    def model(self, name: str | None, version: str | None = None) -> ServedModel:
        """The served model ``name`` (and ``version`` when given), or ModelNotFoundError (404)."""
        served = self.repo.get(name)
        if version and version != served.version:
            raise ModelNotFoundError(
                f"model '{name}' version '{version}' is not served; current version is '{served.version}'"
            )
        return served

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.model(name, version)  # a model that serves is ready: only checked models are served
        return True

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name="edgerun", version=edgerun.__version__, extensions=list(EXTENSIONS))

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        served = self.model(name, version)
        return metadata_of(served, {"max_batch": self.config.max_batch, "max_delay_ms": self.config.max_delay_ms})

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``)."""
        return triton_config(self.model(name, version))

    # ---- inference ----

    def get_batcher(self) -> Batcher:
        if self.batcher is None:  # lifespan not run (e.g. app mounted elsewhere)
            raise OverloadedError("server is starting; retry shortly")
        return self.batcher

    async def run(
        self, served: ServedModel, feeds: dict[str, np.ndarray], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run decoded, checked feeds on ``served`` through the batcher (its queue limits and timeout)."""
        check_batch(served.session.max_batch, feeds)
        return await self.get_batcher().submit(served.session, feeds, timeout_s)

    async def infer(
        self,
        name: str,
        feeds: dict[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: list[str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[ServedModel, dict[str, np.ndarray]]:
        """Inference on decoded tensors for a door that has not looked the model up itself: checks the
        feeds against the model's inputs, returns the model and the requested outputs in order."""
        served = self.model(name, version)
        check_feeds(served, feeds)
        wanted = check_outputs(served, outputs)
        results = await self.run(served, feeds, timeout_s)
        return served, {output: results[output] for output in wanted}


def metadata_of(served: ServedModel, extra: dict[str, Any] | None = None) -> ModelMetadata:
    session = served.session
    return ModelMetadata(
        name=served.name,
        versions=[served.version],
        platform=PLATFORM,
        inputs=[MetadataTensor(name=s.name, datatype=s.kserve_datatype, shape=s.shape) for s in session.inputs],
        outputs=[MetadataTensor(name=s.name, datatype=s.kserve_datatype, shape=s.shape) for s in session.outputs],
        parameters={**served.status.to_json(), "task": served.manifest.task_name(), **(extra or {})},
    )


def check_feeds(served: ServedModel, feeds: dict[str, np.ndarray]) -> None:
    """The checks the REST decoder makes, for tensors decoded elsewhere: names, dtypes, shapes, NaN/Inf."""
    specs = {spec.name: spec for spec in served.session.inputs}
    for name in feeds:
        if name not in specs:
            raise RequestError(f"unknown input '{name}'; the model's inputs are {list(specs)}")
    missing = [name for name in specs if name not in feeds]
    if missing:
        raise RequestError(f"missing inputs {missing}; the model needs {list(specs)}")
    for name, array in feeds.items():
        spec = specs[name]
        if array.dtype != np.dtype(spec.dtype):
            raise RequestError(f"input '{name}' expects datatype {spec.kserve_datatype}, got {array.dtype.name}")
        shape = list(array.shape)
        if len(shape) != len(spec.shape) or any(want > 0 and d != want for d, want in zip(shape, spec.shape)):
            raise RequestError(f"input '{name}' expects shape {spec.shape} (-1 = any size), got {shape}")
        if array.dtype.kind == "f" and not spec.allow_nonfinite and not np.isfinite(array).all():
            raise RequestError(f"input '{name}' contains NaN or Inf; the model does not accept them")
    rows = {array.shape[0] for array in feeds.values() if array.ndim}
    if len(rows) > 1 and all(spec.shape and spec.shape[0] == -1 for spec in specs.values()):
        raise RequestError(f"inputs disagree on the batch size (first dimensions {sorted(rows)})")


def check_outputs(served: ServedModel, outputs: list[str] | None) -> list[str]:
    """The outputs to answer with, in the order asked (all of them, in the model's order, when none is named)."""
    names = served.session.output_names
    if not outputs:
        return list(names)
    seen: list[str] = []
    for output in outputs:
        if output not in names:
            raise RequestError(f"unknown output '{output}'; the model's outputs are {names}")
        if output in seen:
            raise RequestError(f"output '{output}' is requested twice; name each output once")
        seen.append(output)
    return seen
