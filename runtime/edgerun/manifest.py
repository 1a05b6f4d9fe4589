"""The bundle manifest: the contract between the builder (writer) and the runtime (reader).

The runtime is the authority on this schema; ``edgebuild`` writes bundles through these
models so both sides can never disagree on a key. Unknown top-level keys are kept (a newer
builder may add fields) but ``format_version`` must be one this runtime knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgerun.errors import BundleError
from edgerun.preprocess import PreprocessSpec
from edgerun.tasks.detection import FORMATS, DetectionSpec, parse_detection_spec

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MANIFEST_NAME = "manifest.json"

# numpy dtype names used in the manifest, and the KServe v2 datatype each maps to.
KSERVE_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}

GraphOptimizationLevel = Literal["disable_all", "basic", "extended", "all"]
Precision = Literal["fp32", "fp16", "int8", "int8-dynamic", "mixed"]
# What the model's outputs mean; it decides the post-processing and the /v1/predict answer.
Task = Literal["classification", "detection", "embedding", "tensor"]
TASKS: tuple[str, ...] = ("classification", "detection", "embedding", "tensor")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class TensorSpec(_Model):
    """One model input or output. ``shape`` uses -1 for a dynamic dimension."""

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. float32, int64")
    shape: list[int]
    # Float inputs with NaN/Inf are refused (HTTP 400) unless the model is known to accept them.
    allow_nonfinite: bool | None = None

    @field_validator("dtype")
    @classmethod
    def _has_kserve_datatype(cls, value: str) -> str:
        if value not in KSERVE_DATATYPES:
            raise ValueError(
                f"dtype '{value}' has no KServe v2 datatype; expected one of {', '.join(KSERVE_DATATYPES)}"
            )
        return value

    @property
    def kserve_datatype(self) -> str:
        return KSERVE_DATATYPES[self.dtype]


class SessionOptionsSpec(_Model):
    """ONNX Runtime session settings the model was validated with; the runtime applies them."""

    graph_optimization_level: GraphOptimizationLevel = "all"
    # Extra ``SessionOptions.add_session_config_entry`` pairs.
    config: dict[str, str] = Field(default_factory=dict)


class ModelFile(_Model):
    """One ONNX file of the bundle: the selected model or an extra variant."""

    path: str
    sha256: str
    size_bytes: int
    precision: Precision
    opset: int
    session_options: SessionOptionsSpec = Field(default_factory=SessionOptionsSpec)
    # Exact quantization settings (activation/weight types, format, per-channel, ...).
    quantization: dict[str, Any] | None = None
    # This variant's validation numbers (same shape as the top-level ``validation``).
    validation: dict[str, Any] | None = None
    # This variant's host measurements (p50_ms, p90_ms, ...).
    benchmark: dict[str, Any] | None = None
    # Providers this variant may run on; empty = any of the manifest's providers.
    providers: list[str] = Field(default_factory=list)
    # Per-provider option overrides for this variant, merged over the manifest's provider
    # options (e.g. trt_int8_enable only for an INT8 QDQ variant, trt_fp16_enable for fp16).
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ProviderSpec(_Model):
    """An ONNX Runtime execution provider, in preference order, with its options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class PassRecord(_Model):
    """One step the builder took: what it was, how it was configured, what it measured."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class Validation(_Model):
    metric: str
    reference: float | None = None
    packed: float | None = None
    drop: float | None = None
    samples: int = 0
    data: str = ""
    # False when no real data was used (e.g. calibration on random inputs, no --val-data).
    validated: bool = True
    max_accuracy_drop: float | None = None


class GoldenThresholds(_Model):
    """How far one variant's outputs may drift from the golden outputs; ``measured`` is what the build host saw."""

    atol: float
    rtol: float = 0.0
    # Fraction of golden samples whose top-1 must agree (classifiers), if set.
    min_top1_agreement: float | None = None
    # Detection: when any of these is set, post-NMS boxes are compared instead of raw values (atol ignored).
    min_box_iou: float | None = Field(
        default=None, gt=0, le=1, description="IoU a box must reach to match a golden box"
    )
    max_score_diff: float | None = Field(
        default=None, ge=0, description="largest |score - golden score| of a matched box"
    )
    min_box_match: float | None = Field(
        default=None, ge=0, le=1, description="fraction of boxes matched at min_box_iou (of the larger box count)"
    )
    measured: dict[str, Any] = Field(default_factory=dict)

    def compares_boxes(self) -> bool:
        return any(v is not None for v in (self.min_box_iou, self.max_score_diff, self.min_box_match))


class GoldenSpec(_Model):
    """Reference inputs/outputs checked on the device before it reports ready."""

    path: str = "golden.npz"
    atol: float
    rtol: float = 0.0
    # Fraction of golden samples whose top-1 must agree (classifiers), if set.
    min_top1_agreement: float | None = None
    # Detection box tolerances for variants not listed (see GoldenThresholds).
    min_box_iou: float | None = Field(default=None, gt=0, le=1)
    max_score_diff: float | None = Field(default=None, ge=0)
    min_box_match: float | None = Field(default=None, ge=0, le=1)
    # Per variant path: tolerances derived from what that variant measured on the build host
    # (the top-level values apply to variants not listed).
    variants: dict[str, GoldenThresholds] = Field(default_factory=dict)


class Manifest(_Model):
    format_version: int
    name: str
    created: str
    builder: dict[str, str] = Field(default_factory=dict)
    target: dict[str, Any] = Field(default_factory=dict)
    model: ModelFile
    variants: list[ModelFile] = Field(default_factory=list)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Checked against :class:`edgerun.preprocess.PreprocessSpec` and stored normalised (defaults filled in).
    preprocess: dict[str, Any] | None = None
    # Detection: checked against :class:`edgerun.tasks.detection.DetectionSpec` and stored normalised.
    postprocess: dict[str, Any] | None = None
    # None in bundles older than the key: :meth:`task_name` infers it from ``postprocess``.
    task: Task | None = None
    providers: list[ProviderSpec] = Field(default_factory=lambda: [ProviderSpec(name="CPUExecutionProvider")])
    passes: list[PassRecord] = Field(default_factory=list)
    validation: Validation | None = None
    benchmark: dict[str, Any] = Field(default_factory=dict)
    golden: GoldenSpec | None = None
    # Serving limits the model was built for, e.g. {"max_batch": 8, "out_of_profile": "reject"}:
    # TensorRT engines are built for the recorded shape profiles only.
    serving: dict[str, Any] | None = None
    labels: str | None = None
    report: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)
    signature: dict[str, str] | None = None

    @field_validator("preprocess", mode="before")
    @classmethod
    def _typed_preprocess(cls, value: Any) -> dict[str, Any] | None:
        if value is None or isinstance(value, PreprocessSpec):
            return None if value is None else value.to_manifest()
        try:
            return PreprocessSpec.model_validate(value).to_manifest()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "preprocess"
            raise ValueError(f"{where}: {first['msg']}") from None

    @field_validator("postprocess", mode="before")
    @classmethod
    def _typed_postprocess(cls, value: Any) -> dict[str, Any] | None:
        if isinstance(value, DetectionSpec):
            return value.to_manifest()
        if isinstance(value, dict) and value.get("type") == "detection":
            return parse_detection_spec(value).to_manifest()
        return value

    @model_validator(mode="after")
    def _task_matches_postprocess(self) -> Manifest:
        kind = (self.postprocess or {}).get("type")
        if self.task == "detection" and kind != "detection":
            raise ValueError(
                f"task 'detection' needs postprocess.type 'detection' (got {kind!r}); add a [postprocess] table "
                f"with a detection format ({', '.join(FORMATS)})"
            )
        if kind == "detection" and self.task not in (None, "detection"):
            raise ValueError(f"postprocess.type 'detection' does not fit task {self.task!r}")
        return self

    def task_name(self) -> str:
        """The bundle's task; older bundles without ``task``: from ``postprocess.type``, else ``tensor``."""
        if self.task is not None:
            return self.task
        kind = (self.postprocess or {}).get("type")
        return kind if kind in ("classification", "detection") else "tensor"

    def detection_spec(self) -> DetectionSpec | None:
        """The typed detection post-processing, for a detection bundle."""
        if (self.postprocess or {}).get("type") != "detection":
            return None
        return DetectionSpec.model_validate(self.postprocess)

    def preprocess_spec(self) -> PreprocessSpec | None:
        return None if self.preprocess is None else PreprocessSpec.model_validate(self.preprocess)

    def all_models(self) -> list[ModelFile]:
        """The selected model first, then the extra variants."""
        return [self.model, *self.variants]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=False) + "\n"

    def signed_payload(self) -> bytes:
        """Canonical bytes a signature covers: the manifest without its signature.

        The manifest lists every file's sha256, so signing it signs the whole bundle.
        """
        data = self.model_dump(mode="json", exclude_none=True)
        data.pop("signature", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(data: dict[str, Any], source: str = MANIFEST_NAME) -> Manifest:
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{source}: format_version {version!r} is not supported by this runtime "
            f"(supported: {sorted(SUPPORTED_FORMAT_VERSIONS)}); upgrade edgerun or rebuild the bundle"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own text
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{source}: invalid manifest at '{where or 'top level'}': {message}") from None
    if not is_one_path_component(manifest.name):
        raise BundleError(
            f"{source}: model name {manifest.name!r} must be a single path component (no '/', "
            f"'\\' or '..'); rebuild the bundle with another --name"
        )
    return manifest


def is_one_path_component(name: str) -> bool:
    """The model/bundle name rule: it becomes a URL segment, the bundle folder and a folder under
    --cache-dir (kept versions), so it must be one path component."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST_NAME} found; is this an edgebuild bundle directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    return parse_manifest(data, str(path))
