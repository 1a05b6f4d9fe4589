"""Image pre-processing and classification post-processing from the manifest.

``manifest.preprocess`` example::

    {"layout": "NCHW", "color": "RGB", "size": [224, 224], "scale": 0.00392156862745098,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dtype": "float32"}

``manifest.postprocess`` example: ``{"type": "classification", "softmax": true, "top_k": 5}``.
Optional keys: ``input`` / ``output`` (tensor names; default the first), ``resize``
(``bilinear`` default, ``nearest``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.errors import BundleError, RequestError

# Refuse images that would decode to more than this many pixels (decompression bombs).
MAX_PIXELS = 40_000_000


def preprocess_image(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    """Decode image bytes and turn them into a batch of one, as the manifest describes."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError("empty image; send the image bytes as the body or as a multipart file")
    color = spec.get("color", "RGB")
    if color not in ("L", "RGB"):
        raise BundleError(f"manifest preprocess.color must be 'L' or 'RGB', got {color!r}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise RequestError(f"image is {image.width}x{image.height}; over the {MAX_PIXELS} pixel limit")
            image = image.convert(color)
            if "size" in spec:
                height, width = spec["size"]
                method = Image.NEAREST if spec.get("resize") == "nearest" else Image.BILINEAR
                image = image.resize((int(width), int(height)), method)
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"body is not a readable image ({exc}); send PNG or JPEG bytes") from None
    if array.ndim == 2:
        array = array[:, :, None]
    array = array * float(spec.get("scale", 1.0))
    if "mean" in spec:
        array = array - np.asarray(spec["mean"], dtype=np.float32)
    if "std" in spec:
        array = array / np.asarray(spec["std"], dtype=np.float32)
    layout = spec.get("layout", "NCHW")
    if layout == "NCHW":
        array = array.transpose(2, 0, 1)
    elif layout != "NHWC":
        raise BundleError(f"manifest preprocess.layout must be NCHW or NHWC, got {layout!r}")
    return np.ascontiguousarray(array[None], dtype=np.dtype(spec.get("dtype", "float32")))


def load_labels(root: Path, labels: str | None) -> list[str] | None:
    if not labels:
        return None
    try:
        return [line.strip() for line in (Path(root) / labels).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise BundleError(f"labels file '{labels}' cannot be read ({exc})") from None


def classify(scores: np.ndarray, spec: dict[str, Any], labels: list[str] | None) -> list[dict[str, Any]]:
    """Top-k of the first row of ``scores``; softmax first when the manifest asks for it."""
    row = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)[0]
    if spec.get("softmax"):
        row = np.exp(row - row.max())
        row = row / row.sum()
    k = max(1, min(int(spec.get("top_k", 5)), row.size))
    top = np.argsort(-row, kind="stable")[:k]
    return [
        {"index": int(i), "label": labels[i] if labels and i < len(labels) else str(int(i)), "score": float(row[i])}
        for i in top
    ]
