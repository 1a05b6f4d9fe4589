"""Refuse ONNX models that read data from other files: "external data" tensors, EPContext nodes.

An ONNX tensor may keep its bytes in a file the model names. ONNX Runtime resolves that name
against the working directory when a session is made from bytes, as the runtime does, and that
file is covered by no checksum of the bundle: a model naming ``secret.key`` would read it and
hand it out through inference. Bundles hold single-file models, so a model naming external data
is refused before ONNX Runtime sees it; so is a model with an EPContext node, which hands an
execution provider a precompiled engine (by file path when its embed_mode is 0).

The runtime does not depend on the ``onnx`` package, so this walks the protobuf wire format
through every place a tensor can sit (initializers, sparse initializers, node attributes,
subgraphs, functions, training graphs) and skips everything else, raw tensor bytes included.
"""

from __future__ import annotations

from edgerun.errors import BundleError, SessionError

# Field numbers from onnx.proto: for each message, the fields holding messages that may hold tensors.
_MODEL, _TRAINING, _GRAPH, _FUNCTION, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_NODE_OP_TYPE = 4
# A node that hands a provider a precompiled engine, by file path when its embed_mode is 0.
_EP_CONTEXT = b"EPContext"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint longer than 64 bits")


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, varint value or (start, end) of a length-delimited value)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")


def _location(data: bytes, start: int, end: int) -> str:
    """The ``location`` value of an external_data entry (StringStringEntryProto key=1, value=2)."""
    entry = {n: data[v[0] : v[1]] for n, w, v in _fields(data, start, end) if w == 2 and isinstance(v, tuple)}
    if entry.get(1) == b"location":
        return entry.get(2, b"").decode("utf-8", "replace")
    return ""


def external_data_references(data: bytes) -> list[str]:
    """Each tensor of the serialized ModelProto ``data`` that keeps its bytes outside it, as
    ``'name' -> location``, and each EPContext node; raises ValueError when ``data`` is not protobuf."""
    found = []
    stack = [(_MODEL, 0, len(data))]
    while stack:
        kind, start, end = stack.pop()
        name, locations, external = "", [], False
        for number, wire, value in _fields(data, start, end):
            if kind == _TENSOR:
                if number == _TENSOR_DATA_LOCATION and wire == 0:
                    external = external or value == _EXTERNAL
                elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, tuple):
                    external = True
                    locations.append(_location(data, *value))
                elif number == _TENSOR_NAME and isinstance(value, tuple):
                    name = data[value[0] : value[1]].decode("utf-8", "replace")
            elif kind == _NODE and number == _NODE_OP_TYPE and isinstance(value, tuple):
                if data[value[0] : value[1]] == _EP_CONTEXT:
                    found.append("an EPContext node (a precompiled provider engine, possibly read from a file)")
            elif wire == 2 and number in _CHILDREN[kind] and isinstance(value, tuple):
                stack.append((_CHILDREN[kind][number], *value))
        if external:
            found.append(f"'{name}' -> {', '.join(repr(loc) for loc in locations if loc) or 'an unnamed file'}")
    return found


def check_self_contained(data: bytes, relpath: str) -> None:
    """Refuse (BundleError) a model that reads tensor data from files; SessionError if it is not protobuf."""
    try:
        references = external_data_references(data)
    except ValueError as exc:
        raise SessionError(f"'{relpath}' is not a valid ONNX model ({exc})") from None
    if references:
        raise BundleError(
            f"'{relpath}' reads data from outside the model file ({'; '.join(references[:3])}"
            f"{' ...' if len(references) > 3 else ''}), which no checksum of the bundle covers; a bundle's "
            f"models must be self-contained: rebuild it without ONNX external data or EPContext nodes"
        )
