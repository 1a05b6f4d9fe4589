"""What an ONNX file says about itself in ``metadata_props``, as Ultralytics exports write it.

Ultralytics writes ``task`` (``detect``, ``classify``, ``segment``, ...), ``names`` (a Python dict
literal ``{0: 'person', ...}``), ``imgsz`` (``[640, 640]``), ``stride`` and ``end2end``
(``True`` when NMS is inside the graph). Read when present: the task, the class names (labels)
and the detection format need not be declared again.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelMetadata:
    task: str | None = None
    names: list[str] | None = None
    imgsz: tuple[int, int] | None = None
    stride: int | None = None
    end2end: bool | None = None
    source: str = ""

    @property
    def found(self) -> bool:
        return self.task is not None or self.names is not None


def _literal(text: str):
    try:
        return ast.literal_eval(text)  # literals only: never evaluates code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _names(value) -> list[str] | None:
    if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
        return [str(value[k]) for k in sorted(value)]
    if isinstance(value, (list, tuple)) and value:
        return [str(v) for v in value]
    return None


def read_metadata(path: Path | str) -> ModelMetadata:
    """The metadata of an ONNX file (all fields ``None`` when it carries none of these keys)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata(source=props.get("author", ""))
    meta.task = props.get("task") or None
    meta.names = _names(_literal(props["names"])) if "names" in props else None
    imgsz = _literal(props["imgsz"]) if "imgsz" in props else None
    if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2 and all(isinstance(v, int) for v in imgsz):
        meta.imgsz = (int(imgsz[0]), int(imgsz[1]))
    elif isinstance(imgsz, int):
        meta.imgsz = (imgsz, imgsz)
    stride = _literal(props["stride"]) if "stride" in props else None
    meta.stride = int(stride) if isinstance(stride, int) else None
    if "end2end" in props:
        meta.end2end = props["end2end"].strip().lower() == "true"
    return meta
