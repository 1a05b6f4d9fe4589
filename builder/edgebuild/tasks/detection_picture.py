"""``report-detections.png``: FP32's and the chosen variant's boxes drawn on validation images.

The images are the model's own input tensors turned back into pixels (the letterbox or crop the
device applies is visible), so the boxes sit exactly where the model put them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgerun.preprocess import PreprocessSpec
from edgerun.tasks.detection import Detections

FP32_COLOUR = (40, 200, 60)
CHOSEN_COLOUR = (230, 40, 40)
# Small model inputs are scaled up so boxes and labels stay readable.
MIN_SIDE = 320


def tensor_to_image(x: np.ndarray, spec: PreprocessSpec | None) -> np.ndarray:
    """One input tensor (no batch axis) -> uint8 RGB pixels [H, W, 3], undoing scale/mean/std."""
    image = x.astype(np.float32)
    layout = spec.layout if spec is not None else "NCHW"
    if layout == "NCHW":
        image = image.transpose(1, 2, 0)
    if spec is not None:
        if spec.std is not None:
            image = image * np.asarray(spec.std, dtype=np.float32)
        if spec.mean is not None:
            image = image + np.asarray(spec.mean, dtype=np.float32)
        image = image / np.float32(spec.scale)
        if spec.color == "BGR":
            image = image[:, :, ::-1]
    elif image.max() <= 1.0:
        image = image * 255.0
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _label(class_id: int, labels: Sequence[str] | None) -> str:
    return labels[class_id] if labels is not None and 0 <= class_id < len(labels) else str(class_id)


def draw(
    path: Path,
    inputs: np.ndarray,
    spec: PreprocessSpec | None,
    fp32: Sequence[Detections],
    chosen: Sequence[Detections],
    chosen_name: str,
    labels: Sequence[str] | None = None,
) -> Path:
    """Side-by-side panels, one per image: FP32 boxes (green, thick) under the chosen variant's (red)."""
    from PIL import Image, ImageDraw

    panels = []
    for x, want, got in zip(inputs, fp32, chosen):
        pixels = tensor_to_image(x, spec)
        zoom = max(1, -(-MIN_SIDE // min(pixels.shape[:2])))
        image = Image.fromarray(pixels).resize(
            (pixels.shape[1] * zoom, pixels.shape[0] * zoom), Image.Resampling.NEAREST
        )
        pen = ImageDraw.Draw(image)
        for found, colour, width in ((want, FP32_COLOUR, 4), (got, CHOSEN_COLOUR, 2)):
            for box, score, cls in zip(found.boxes, found.scores, found.class_ids):
                x1, y1, x2, y2 = (float(v) * zoom for v in box)
                pen.rectangle([x1, y1, x2, y2], outline=colour, width=width)
                text_y = y1 - 11 if colour == FP32_COLOUR else y2 + 1
                pen.text((x1 + 2, text_y), f"{_label(int(cls), labels)} {score:.2f}", fill=colour)
        panels.append(image)
    header = 18
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels) + header), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 3), "FP32", fill=FP32_COLOUR)
    pen.text((44, 3), f"{chosen_name} (chosen)", fill=CHOSEN_COLOUR)
    left = 0
    for panel in panels:
        canvas.paste(panel, (left, header))
        left += panel.width + 8
    canvas.save(path)
    return path
