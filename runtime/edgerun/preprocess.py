"""Image pre-processing from the manifest, and where the image lands in the model input.

One implementation turns an image into the model's tensor everywhere: the builder's image-folder
data (calibration, validation, golden inputs) and the server's ``/v1/predict`` both call
:func:`preprocess_image` with the manifest's :class:`PreprocessSpec`, so the device sees the
tensors the bundle was calibrated and validated on.

``manifest.preprocess`` example (the ``imagenet`` preset for a 224x224 model)::

    {"layout": "NCHW", "color": "RGB", "size": [224, 224], "resize": "stretch",
     "interpolation": "bilinear", "scale": 0.00392156862745098,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dtype": "float32"}

:func:`preprocess_image_with_transform` also returns the :class:`ImageTransform` (scale, offsets) that
maps boxes found in the model input back to the image as sent.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgerun.errors import BundleError, PayloadTooLargeError, RequestError

# Refuse images that would decode to more than this many pixels (decompression bombs).
MAX_PIXELS = 40_000_000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Named starting points; ``size`` is filled in from the model's input shape by the builder.
PRESETS: dict[str, dict[str, Any] | None] = {
    "imagenet": {"color": "RGB", "scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    "unit": {"scale": 1 / 255},
    "none": None,
}

_CHANNELS = {"L": 1, "RGB": 3, "BGR": 3}
_INTERPOLATION = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


class PreprocessSpec(BaseModel):
    """How an image becomes the model's input tensor. Unknown keys are refused: a step this
    runtime does not know cannot be applied, and skipping it would serve wrong answers."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR", "L"] = "RGB"
    size: tuple[int, int] | None = Field(
        None, description="[height, width] of the model input; none keeps the image size"
    )
    resize: Literal["stretch", "center-crop", "letterbox"] = Field(
        "stretch",
        description="stretch to size; center-crop: shorter side to resize_shorter, then crop (torchvision); "
        "letterbox: fit inside size keeping the aspect ratio, pad with fill",
    )
    resize_shorter: int | None = Field(
        None, description="center-crop: shorter side before cropping (default: crop side)"
    )
    fill: int = Field(114, ge=0, le=255, description="letterbox padding, in pixel values 0..255 (114: Ultralytics)")
    pad: Literal["center", "bottom-right"] = Field(
        "center",
        description="letterbox: where the padding goes; center (Ultralytics) or bottom-right (the image at the "
        "top-left corner)",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    scale: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    input: str | None = Field(None, description="input tensor fed with the image (default: the first)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_resize(cls, data: Any) -> Any:
        # Early manifests used ``resize`` for the interpolation method.
        if isinstance(data, Mapping) and data.get("resize") in _INTERPOLATION:
            data = {**data, "interpolation": data["resize"], "resize": "stretch"}
        return data

    @field_validator("size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) <= 0:
            raise ValueError(f"size must be [height, width] with positive sides, got {list(value)}")
        if value is not None and value[0] * value[1] > MAX_PIXELS:  # every image is scaled to it
            raise ValueError(f"size {list(value)} is over the {MAX_PIXELS} pixel limit")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        channels = self.channels
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) not in (1, channels):
                raise ValueError(f"{key} has {len(values)} values; color {self.color} has {channels} channel(s)")
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError("std must not contain 0")
        if self.resize_shorter is not None and self.resize_shorter**2 > MAX_PIXELS:
            raise ValueError(f"resize_shorter {self.resize_shorter} squared is over the {MAX_PIXELS} pixel limit")
        if self.resize_shorter is not None and self.size is not None and self.resize_shorter < max(self.size):
            raise ValueError(f"resize_shorter {self.resize_shorter} is smaller than the crop {list(self.size)}")
        return self

    @property
    def channels(self) -> int:
        return _CHANNELS[self.color]

    def tensor_shape(self) -> list[int] | None:
        """The per-image tensor shape (no batch axis), when ``size`` is set."""
        if self.size is None:
            return None
        height, width = self.size
        return [self.channels, height, width] if self.layout == "NCHW" else [height, width, self.channels]

    def for_input(self, shape: list[int] | tuple[int, ...], name: str | None = None) -> PreprocessSpec:
        """This spec completed for an input of ``shape`` (batch first): ``size`` and channels from it.

        Raises ``ValueError`` naming both shapes when the image tensor cannot feed the input.
        """
        shape = list(shape)
        if len(shape) != 4:
            raise ValueError(f"image preprocessing makes a [N, C, H, W] or [N, H, W, C] tensor; the input is {shape}")
        height, width = (shape[2], shape[3]) if self.layout == "NCHW" else (shape[1], shape[2])
        channels = shape[1] if self.layout == "NCHW" else shape[3]
        update: dict[str, Any] = {}
        if self.input is None and name is not None:
            update["input"] = name
        if self.size is None and height > 0 and width > 0:
            update["size"] = (height, width)
        try:
            spec = PreprocessSpec.model_validate({**self.model_dump(), **update})
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None
        if channels > 0 and channels != spec.channels:
            raise ValueError(
                f"color {spec.color} gives {spec.channels} channel(s) but the input {shape} ({spec.layout}) takes {channels}"
            )
        if spec.size is not None and (height > 0 and height != spec.size[0] or width > 0 and width != spec.size[1]):
            raise ValueError(f"size {list(spec.size)} does not match the input {shape} ({spec.layout})")
        return spec

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def parse_spec(data: Mapping[str, Any] | PreprocessSpec, source: str = "preprocess") -> PreprocessSpec:
    """A :class:`PreprocessSpec` from manifest keys, with a one-line error naming the bad key.

    A ``preset`` key starts from that preset (``imagenet``, ``unit``) and the other keys override it.
    """
    if isinstance(data, PreprocessSpec):
        return data
    values = dict(data)
    preset = values.pop("preset", None)
    if preset is not None:
        base = preset_values(preset, source)
        values = {**(base or {}), **values}
    try:
        return PreprocessSpec.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "preprocess"
        raise BundleError(f"{source}: invalid preprocess key '{where}': {first['msg']}") from None


def preset_values(name: str, source: str = "preprocess") -> dict[str, Any] | None:
    if name not in PRESETS:
        raise BundleError(
            f"{source}: unknown preprocess preset '{name}'; use one of {', '.join(PRESETS)} or a .toml file"
        )
    preset = PRESETS[name]
    return None if preset is None else dict(preset)


@dataclass(frozen=True)
class ImageTransform:
    """Where the original image landed in the model input: ``input = original * scale + pad`` per axis.

    Letterbox padding gives a positive ``pad``, a centre crop a negative one (the cut-off part).
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    original: tuple[int, int]  # (width, height) of the image as sent
    input: tuple[int, int]  # (width, height) of the model input

    @classmethod
    def identity(cls, width: int, height: int) -> ImageTransform:
        return cls(1.0, 1.0, 0.0, 0.0, (width, height), (width, height))

    def to_image(self, xyxy: np.ndarray) -> np.ndarray:
        """Boxes [K, 4] x1, y1, x2, y2 in model-input pixels -> original-image pixels, clipped to the image."""
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        width, height = self.original
        xs = np.clip((boxes[:, [0, 2]] - self.pad_x) / self.scale_x, 0, width)
        ys = np.clip((boxes[:, [1, 3]] - self.pad_y) / self.scale_y, 0, height)
        return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)

    def to_input(self, xyxy: np.ndarray) -> np.ndarray:
        """Boxes in original-image pixels -> model-input pixels (the inverse of :meth:`to_image`, unclipped)."""
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        scale = np.asarray([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        pad = np.asarray([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return (boxes * scale + pad).astype(np.float32)


def _resize(image: Any, spec: PreprocessSpec, original: tuple[int, int]) -> tuple[Any, ImageTransform]:
    """The image resized as ``spec`` says, and the transform from ``original`` (the size before any
    JPEG draft reduction) to the result."""
    from PIL import Image

    if spec.size is None:
        return image, ImageTransform(
            image.width / original[0], image.height / original[1], 0.0, 0.0, original, image.size
        )
    height, width = spec.size
    method = _INTERPOLATION[spec.interpolation]
    if spec.resize == "stretch":
        return image.resize((width, height), method), ImageTransform(
            width / original[0], height / original[1], 0.0, 0.0, original, (width, height)
        )
    if spec.resize == "center-crop":
        # torchvision's Resize(shorter) + CenterCrop(size): scale the shorter side, then cut the middle.
        # Same arithmetic as torchvision: the longer side truncated, the crop offset rounded.
        shorter = spec.resize_shorter or max(height, width)
        if image.width <= image.height:
            scaled = (shorter, int(shorter * image.height / image.width))
        else:
            scaled = (int(shorter * image.width / image.height), shorter)
        if scaled[0] * scaled[1] > MAX_PIXELS:  # a long thin image scales up by its aspect ratio
            raise PayloadTooLargeError(
                f"image is {image.width}x{image.height}: its center crop would first scale it to "
                f"{scaled[0]}x{scaled[1]}, over the {MAX_PIXELS} pixel limit; crop it closer to the model's "
                f"aspect ratio first"
            )
        image = image.resize(scaled, method)
        left, top = int(round((scaled[0] - width) / 2.0)), int(round((scaled[1] - height) / 2.0))
        transform = ImageTransform(
            scaled[0] / original[0], scaled[1] / original[1], -left, -top, original, (width, height)
        )
        return image.crop((left, top, left + width, top + height)), transform
    # letterbox: the whole image inside size, aspect ratio kept, the rest padded with ``fill``
    ratio = min(width / image.width, height / image.height)
    inner = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    # centre: the odd pixel of padding goes right/bottom, as Ultralytics' LetterBox
    offset = ((width - inner[0]) // 2, (height - inner[1]) // 2) if spec.pad == "center" else (0, 0)
    canvas = Image.new(image.mode, (width, height), (spec.fill,) * len(image.getbands()))
    canvas.paste(image.resize(inner, method), offset)
    transform = ImageTransform(
        inner[0] / original[0], inner[1] / original[1], offset[0], offset[1], original, (width, height)
    )
    return canvas, transform


def _decode_size(spec: PreprocessSpec) -> tuple[int, int] | None:
    """The smallest (width, height) decode that still covers what the resize step reads."""
    if spec.size is None:
        return None
    height, width = spec.size
    if spec.resize == "center-crop":
        side = spec.resize_shorter or max(height, width)
        return side, side
    return width, height


def preprocess_image(
    data: bytes, spec: PreprocessSpec | Mapping[str, Any], *, max_pixels: int | None = None
) -> np.ndarray:
    """Decode image bytes into a batch of one, as the manifest's preprocess describes.

    JPEGs are decoded in draft mode (DCT scaling) at the smallest scale that still covers the
    model's input size; ``max_pixels`` (default :data:`MAX_PIXELS`) bounds what is decoded.
    """
    return preprocess_image_with_transform(data, spec, max_pixels=max_pixels)[0]


def preprocess_image_with_transform(
    data: bytes | Any, spec: PreprocessSpec | Mapping[str, Any], *, max_pixels: int | None = None
) -> tuple[np.ndarray, ImageTransform]:
    """:func:`preprocess_image`, plus where the original image landed in the tensor (to map boxes back).

    ``data`` is image bytes or an already opened ``PIL.Image``.
    """
    from PIL import Image, UnidentifiedImageError

    spec = spec if isinstance(spec, PreprocessSpec) else parse_spec(spec, "manifest preprocess")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    is_bytes = isinstance(data, (bytes, bytearray, memoryview))
    if is_bytes and not data:
        raise RequestError("empty image; send the image bytes as the body or as a multipart file")
    try:
        # An image the caller opened stays open: it is theirs to close.
        opened: Any = Image.open(io.BytesIO(data)) if is_bytes else contextlib.nullcontext(data)
        with opened as image:
            original = image.size
            decode = _decode_size(spec)
            if decode is not None and image.format == "JPEG":
                image.draft("RGB" if spec.color != "L" else "L", decode)
            if image.width * image.height > limit:
                raise RequestError(f"image is {image.width}x{image.height}; over the {limit} pixel limit")
            converted, transform = _resize(image.convert("L" if spec.color == "L" else "RGB"), spec, original)
            array: np.ndarray = np.asarray(converted, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"body is not a readable image ({exc}); send PNG or JPEG bytes") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if spec.color == "BGR":
        array = array[:, :, ::-1]
    array = array * np.float32(spec.scale)
    if spec.mean is not None:
        array = array - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        array = array / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        array = array.transpose(2, 0, 1)
    if spec.dtype == "uint8":
        array = np.clip(np.rint(array), 0, 255)
    return np.ascontiguousarray(array[None], dtype=np.dtype(spec.dtype)), transform


def load_labels(root: Path, labels: str | None) -> list[str] | None:
    if not labels:
        return None
    try:
        return [line.strip() for line in (Path(root) / labels).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise BundleError(f"labels file '{labels}' cannot be read ({exc})") from None
