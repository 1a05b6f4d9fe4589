"""Target profiles: validated data describing a device family (providers, precisions, INT8 preset)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgebuild.errors import UsageError
from edgerun.manifest import SessionOptionsSpec
from edgerun.session import canonical_provider_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_Strict = ConfigDict(extra="forbid")


Precision = Literal["fp32", "fp16", "int8", "int8-dynamic"]


class ProviderProfile(BaseModel):
    model_config = _Strict
    name: str = Field(description="ONNX Runtime execution provider, e.g. CUDAExecutionProvider (or cuda, trt, cpu)")
    options: dict[str, Any] = Field(default_factory=dict, description="provider options written to the manifest")
    # Some options only fit one precision of the packed model: TensorRT refuses a QDQ (INT8)
    # network unless trt_int8_enable is set, and the flag must stay off for float models.
    precision_options: dict[Precision, dict[str, Any]] = Field(
        default_factory=dict,
        description="options merged over `options` when the packed model has that precision",
    )

    @field_validator("name")
    @classmethod
    def _runtime_provider_name(cls, name: str) -> str:
        # The runtime's names: "cuda"/"trt" become the onnxruntime names it looks for on the device.
        return canonical_provider_name(name)

    def options_for(self, precision: str) -> dict[str, Any]:
        """This provider's options for a packed model of ``precision``."""
        extra = self.precision_options.get(cast(Precision, precision), {})  # other precisions: none
        return {**self.options, **extra}


class QuantizationProfile(BaseModel):
    """Static INT8 preset (ONNX Runtime quantization tool settings)."""

    model_config = _Strict
    format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"


class SessionProfile(SessionOptionsSpec):
    """The manifest's session options (the runtime's schema), with unknown keys refused in a profile."""

    model_config = _Strict


class ContainerProfile(BaseModel):
    model_config = _Strict
    dockerfile: str
    base_image: str
    runtime: str | None = Field(default=None, description="container runtime, e.g. nvidia on Jetson")
    platform: Literal["linux/amd64", "linux/arm64"] = Field(
        default="linux/amd64", description="image platform (docker --platform); also the fleet's node architecture"
    )


class TargetProfile(BaseModel):
    model_config = _Strict
    name: str
    description: str
    device: Literal["cpu", "gpu"]
    opset: int = Field(ge=13, le=23, description="ONNX opset; >= 13 so per-channel QDQ is valid")
    precisions: list[Precision] = Field(min_length=1)
    providers: list[ProviderProfile] = Field(min_length=1)
    quantization: QuantizationProfile = Field(default_factory=QuantizationProfile)
    session: SessionProfile = Field(default_factory=SessionProfile)
    container: ContainerProfile | None = None
    # Free-form target facts (e.g. TensorRT op support notes) carried into the manifest.
    notes: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _precision_options_match_precisions(self) -> TargetProfile:
        for provider in self.providers:
            for precision in provider.precision_options:
                if precision not in self.precisions:
                    raise ValueError(
                        f"providers '{provider.name}' has precision_options for '{precision}', "
                        f"which is not in precisions {self.precisions}"
                    )
        return self

    def providers_for(self, precision: str) -> list[ProviderProfile]:
        """The provider list to write into a manifest whose model has ``precision``."""
        return [ProviderProfile(name=p.name, options=p.options_for(precision)) for p in self.providers]


def profiles_dir() -> Path:
    """Where the built-in profiles are: ``edgebuild/profiles`` in a wheel, ``targets/`` in a checkout."""
    packaged = Path(__file__).parent / "profiles"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "targets"


def builtin_target_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def _parse(text: str, source: str) -> TargetProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"target profile {source}: not valid TOML ({exc})") from None
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors()[:3])
        raise UsageError(f"target profile {source} is invalid: {problems}") from None


def _describe(err: Any) -> str:
    """One validation problem as 'key.path': what is wrong (got value)."""
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"'{where}': unknown key (check its spelling against targets/x86.toml)"
    if not where:  # a check across keys: its message names them
        return err["msg"].removeprefix("Value error, ")
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"'{where}': {err['msg']} (got {got})"


def load_target(name_or_path: str) -> TargetProfile:
    """Load a built-in profile by name (``x86``) or a user profile file (``my-board.toml``)."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"target profile file '{path}' does not exist")
        return _parse(path.read_text(), str(path))
    names = builtin_target_names()
    if name_or_path not in names:
        raise UsageError(
            f"unknown target '{name_or_path}'; known targets: {', '.join(names)} (or a path to a .toml profile)"
        )
    text = (profiles_dir() / f"{name_or_path}.toml").read_text()
    return _parse(text, f"'{name_or_path}'")
