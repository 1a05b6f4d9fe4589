"""KServe v2 (Open Inference Protocol) messages, with Triton's binary tensor extension.

Requests are decoded here from raw bytes (orjson for the JSON part, ``np.frombuffer`` for
binary tensors) and checked against the manifest's inputs, so every mistake becomes a
``RequestError`` that names the input, the value seen and what the model expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerun.errors import ForbiddenError, PayloadTooLargeError, RequestError
from edgerun.manifest import KSERVE_DATATYPES, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
# Each JSON value becomes a Python object of 30-70 bytes once parsed ('[],' is 3 bytes of body and
# 64 of memory), so the count of values is bounded before parsing; tensors larger than this go as
# binary data. 4 Mi values: a batch of 26 images of 3x224x224.
MAX_JSON_VALUES = 4 * 1024 * 1024
NUMPY_BY_KSERVE = {v: k for k, v in KSERVE_DATATYPES.items()}


# ---- pydantic models: the wire format, also what the OpenAPI document shows ----
# Built on first use (``defer_build``), not at import: the server's start-up does not validate any of them.

LAZY = ConfigDict(defer_build=True)


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", defer_build=True)


class RequestInput(_Message):
    name: str
    shape: list[int]
    datatype: str = Field(description="KServe datatype, e.g. FP32, INT64")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: bytes of this tensor after the JSON")
    data: Any = Field(None, description="tensor values, flat (row-major) or nested")


class RequestOutput(_Message):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true to get raw bytes")


class InferRequest(_Message):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="binary_data_output, timeout (microseconds)")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Message):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(_Message):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    model_config = LAZY

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    model_config = LAZY

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] = Field(default_factory=dict)


class ServerMetadata(BaseModel):
    model_config = LAZY

    name: str
    version: str
    extensions: list[str]


class ErrorResponse(BaseModel):
    model_config = LAZY

    error: str


# ---- decoding ----


@dataclass
class ParsedRequest:
    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (output name, binary)
    timeout_s: float | None
    # Outputs to write into shared-memory regions: name -> (region, offset, byte_size).
    regions: dict[str, tuple[str, Any, Any]] = field(default_factory=dict)


# Where a door's shared memory comes from: called only when a request names a region (it refuses when
# shared memory is off or the client is not local).
SharedMemoryGetter = Callable[[], Any]


def _as_bool(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _json_tensor(spec: TensorSpec, item: RequestInput, count: int) -> np.ndarray:
    if item.data is None:
        raise RequestError(f"input '{item.name}' has neither 'data' nor parameters.binary_data_size")
    try:
        raw = np.asarray(item.data)
    except (ValueError, TypeError):
        raise RequestError(
            f"input '{item.name}': 'data' is ragged or not numeric; send a flat list of {count} numbers"
        ) from None
    target = np.dtype(spec.dtype)
    kinds = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}[target.kind] if target.kind in "fiub" else ""
    if raw.size and raw.dtype.kind not in kinds:
        seen = {
            "U": "strings",
            "O": "mixed or out-of-range values",
            "f": "non-integer numbers",
            "b": "booleans",
            "i": "integers",
            "u": "integers",
        }.get(raw.dtype.kind, str(raw.dtype))
        raise RequestError(f"input '{item.name}' ({item.datatype}) got {seen} in 'data'")
    if raw.size and target.kind in "iu":
        info = np.iinfo(target)
        if raw.min() < info.min or raw.max() > info.max:
            raise RequestError(
                f"input '{item.name}' has values outside the {spec.dtype} range [{info.min}, {info.max}]"
            )
    if raw.size != count:
        raise RequestError(f"input '{item.name}' has {raw.size} values in 'data' but shape {item.shape} needs {count}")
    return raw.astype(target, copy=False).reshape(item.shape)


def _check_shape(spec: TensorSpec, item: RequestInput) -> int:
    if len(item.shape) != len(spec.shape) or any(
        d < 0 or (want > 0 and d != want) for d, want in zip(item.shape, spec.shape)
    ):
        raise RequestError(f"input '{item.name}' expects shape {spec.shape} (-1 = any size), got {item.shape}")
    return math.prod(item.shape)


def decode_infer_request(
    body: bytes,
    specs: list[TensorSpec],
    output_names: list[str],
    header_length: str | None = None,
    shm: SharedMemoryGetter | None = None,
) -> ParsedRequest:
    """Turn a raw KServe v2 request body (JSON, optionally followed by binary tensors) into feeds."""
    if not body:
        raise RequestError("empty request body; send a KServe v2 inference request (JSON with 'inputs')")
    binary: bytes | memoryview = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < size <= len(body):
            raise RequestError(f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes")
        body, binary = body[:size], memoryview(body)[size:]
    # Commas and opening brackets bound the number of values from above (commas in strings count too).
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > MAX_JSON_VALUES:
        raise PayloadTooLargeError(
            f"JSON request holds up to {values} values, over the {MAX_JSON_VALUES} this server parses; send "
            f"large tensors as binary data (Triton's binary tensor extension, {HEADER_LENGTH})"
        )
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON ({exc}); binary tensors need the {HEADER_LENGTH} header"
        ) from None
    if not isinstance(document, dict):
        raise RequestError(f"request must be a JSON object with 'inputs', got {type(document).__name__}")
    try:
        request = InferRequest.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise RequestError(f"invalid inference request at '{where}': {first['msg']}") from None

    by_name = {s.name: s for s in specs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for item in request.inputs:
        spec = by_name.get(item.name)
        if spec is None:
            raise RequestError(f"unknown input '{item.name}'; the model's inputs are {list(by_name)}")
        if item.name in feeds:
            raise RequestError(f"input '{item.name}' is given twice")
        if item.datatype != spec.kserve_datatype:
            raise RequestError(f"input '{item.name}' expects datatype {spec.kserve_datatype}, got {item.datatype!r}")
        count = _check_shape(spec, item)
        parameters = item.parameters or {}
        binary_size = parameters.get("binary_data_size")
        if "shared_memory_region" in parameters:
            region, region_size = parameters["shared_memory_region"], parameters.get("shared_memory_byte_size")
            dtype = np.dtype(spec.dtype)
            if region_size != count * dtype.itemsize:
                raise RequestError(
                    f"input '{item.name}': shared_memory_byte_size is {region_size!r} but shape {item.shape} of "
                    f"{item.datatype} needs {count * dtype.itemsize} bytes"
                )
            memory = _shared_memory(shm)
            data = memory.read(str(region), parameters.get("shared_memory_offset", 0), region_size)
            feeds[item.name] = np.frombuffer(data, dtype=dtype).reshape(item.shape)
        elif binary_size is not None:
            dtype = np.dtype(spec.dtype)
            if (
                not isinstance(binary_size, int)
                or isinstance(binary_size, bool)
                or binary_size != count * dtype.itemsize
            ):
                raise RequestError(
                    f"input '{item.name}': binary_data_size is {binary_size!r} but shape {item.shape} of "
                    f"{item.datatype} needs {count * dtype.itemsize} bytes"
                )
            if offset + binary_size > len(binary):
                raise RequestError(
                    f"input '{item.name}': binary_data_size {binary_size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left after the JSON header)"
                )
            feeds[item.name] = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(item.shape)
            offset += binary_size
        else:
            feeds[item.name] = _json_tensor(spec, item, count)
        if np.dtype(spec.dtype).kind == "f" and not spec.allow_nonfinite:
            if not np.isfinite(feeds[item.name]).all():
                raise RequestError(f"input '{item.name}' contains NaN or Inf; the model does not accept them")
    if offset != len(binary):
        raise RequestError(
            f"body has {len(binary) - offset} bytes after the tensors that binary_data_size "
            f"does not account for; check {HEADER_LENGTH}"
        )
    missing = [name for name in by_name if name not in feeds]
    if missing:
        raise RequestError(f"missing inputs {missing}; the model needs {list(by_name)}")
    rows = {v.shape[0] for v in feeds.values() if v.ndim}
    if len(rows) > 1 and all(s.shape and s.shape[0] == -1 for s in specs):
        raise RequestError(f"inputs disagree on the batch size (first dimensions {sorted(rows)})")

    params = request.parameters or {}
    default_binary = _as_bool(params.get("binary_data_output", False))
    regions: dict[str, tuple[str, Any, Any]] = {}
    if request.outputs:
        outputs: list[tuple[str, bool]] = []
        for out in request.outputs:
            if out.name not in output_names:
                raise RequestError(f"unknown output '{out.name}'; the model's outputs are {output_names}")
            if any(out.name == name for name, _ in outputs):  # each entry is encoded into the response
                raise RequestError(f"output '{out.name}' is requested twice; name each output once")
            out_parameters = out.parameters or {}
            if "shared_memory_region" in out_parameters:
                _shared_memory(shm)  # refused here, before the run, when shared memory is not allowed
                regions[out.name] = (
                    str(out_parameters["shared_memory_region"]),
                    out_parameters.get("shared_memory_offset", 0),
                    out_parameters.get("shared_memory_byte_size"),
                )
            outputs.append((out.name, _as_bool(out_parameters.get("binary_data", default_binary))))
    else:
        outputs = [(name, default_binary) for name in output_names]
    timeout_s = None
    if "timeout" in params:
        value = params["timeout"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise RequestError(f"parameters.timeout must be a positive number of microseconds, got {value!r}")
        timeout_s = value / 1e6
    return ParsedRequest(request.id, feeds, outputs, timeout_s, regions)


def _shared_memory(shm: SharedMemoryGetter | None) -> Any:
    if shm is None:
        raise ForbiddenError("system shared memory is off; start the server with --allow-shm")
    return shm()


# ---- encoding ----


def _datatype(array: np.ndarray) -> str:
    name = array.dtype.name
    return KSERVE_DATATYPES.get(name) or name.upper()


def encode_infer_response(
    model_name: str,
    version: str | None,
    request_id: str | None,
    results: dict[str, np.ndarray],
    outputs: list[tuple[str, bool]],
    regions: dict[str, tuple[str, Any, Any]] | None = None,
    shm: SharedMemoryGetter | None = None,
) -> tuple[bytes, dict[str, str], str]:
    """Return (body, extra headers, media type); binary outputs go after the JSON header, outputs placed
    in shared memory are written there and described without data."""
    described = []
    blobs: list[Any] = []
    for name, binary in outputs:
        array = np.ascontiguousarray(results[name])
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": _datatype(array)}
        region = (regions or {}).get(name)
        if region is not None:
            region_name, offset, size = region
            _shared_memory(shm).write(region_name, offset, size, array.tobytes())
            entry["parameters"] = {"shared_memory_region": region_name, "shared_memory_byte_size": array.nbytes}
            if offset:
                entry["parameters"]["shared_memory_offset"] = offset
        elif binary:
            # A view of the output: its bytes are copied once, into the response body.
            entry["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array.reshape(-1).data.cast("B") if array.size else b"")
        else:
            flat = array.reshape(-1)
            entry["data"] = flat if flat.dtype.name in _ORJSON_NUMPY else flat.tolist()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "outputs": described}
    if version:
        document["model_version"] = version
    if request_id is not None:
        document["id"] = request_id
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {}, "application/json"
    return b"".join([header, *blobs]), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"


_ORJSON_NUMPY = {"float64", "float32", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"}
