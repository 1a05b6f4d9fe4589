"""Detection DATA: a YOLO-format dataset folder, a COCO json, or a flat folder of images.

- **YOLO format**: ``DIR/images/**`` with ``DIR/labels/<same path>.txt``, one ``class cx cy w h``
  line per object, normalised to the image's width and height (Ultralytics' layout). An image
  without a label file has no objects.
- **COCO json**: ``images`` (``file_name``, resolved next to the json, in ``images/`` beside it,
  or one folder up), ``annotations`` (``bbox`` = x, y, w, h in pixels; crowd boxes left out) and
  ``categories``; class indices are the categories in id order (as detectors number them).
- **A flat folder** of images (no sub-folders): images without labels; detectors are then judged
  by box agreement with FP32.

Images become tensors through edgerun's own preprocessing (so the letterbox is the device's), and
label boxes are mapped into model-input pixels with the same transform.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from edgebuild.errors import UsageError
from edgebuild.tasks.coco import BoxLabels
from edgerun.errors import EdgerunError
from edgerun.preprocess import ImageTransform, PreprocessSpec, preprocess_image_with_transform

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_yolo_dataset(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "labels").is_dir()


def is_flat_image_folder(path: Path) -> bool:
    """Images directly in the folder and no sub-folders (a classification folder has one per class)."""
    entries = list(path.iterdir())
    return not any(p.is_dir() for p in entries) and any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)


def is_coco_json(spec: str) -> bool:
    return spec.endswith(".json") and Path(spec).is_file()


def _yolo_labels(path: Path, transform: ImageTransform, *, source: str) -> BoxLabels:
    if not path.is_file():
        return BoxLabels.empty()
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts[:5]]
        except ValueError:
            values = []
        if len(values) != 5 or values[0] < 0 or values[0] != int(values[0]):
            raise UsageError(
                f"data '{source}': {path} line {number} is '{line.strip()}'; expected 'class cx cy w h' "
                "(a class index and four numbers normalised to 0..1)"
            )
        rows.append(values)
    if not rows:
        return BoxLabels.empty()
    table = np.asarray(rows, dtype=np.float64)
    width, height = transform.original
    cx, cy, w, h = table[:, 1] * width, table[:, 2] * height, table[:, 3] * width, table[:, 4] * height
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return BoxLabels(transform.to_input(xyxy), table[:, 0].astype(np.int64))


def _load(path: Path, preprocess: PreprocessSpec, source: str) -> tuple[np.ndarray, ImageTransform]:
    try:
        return preprocess_image_with_transform(path.read_bytes(), preprocess)
    except EdgerunError as exc:
        raise UsageError(f"data '{source}': image '{path}': {exc}") from None


LabelReader = Callable[[ImageTransform], BoxLabels]


def _batches(
    items: Sequence[tuple[Path, LabelReader | None]],
    name: str,
    dtype: str,
    batch_size: int,
    preprocess: PreprocessSpec,
    source: str,
):
    from edgebuild.data import Batch

    def batches() -> Iterable[Batch]:
        for start in range(0, len(items), batch_size):
            tensors, targets = [], []
            for path, labels in items[start : start + batch_size]:
                tensor, transform = _load(path, preprocess, source)
                tensors.append(tensor)
                targets.append(labels(transform) if labels is not None else None)
            x = np.concatenate(tensors).astype(dtype, copy=False)
            labelled = all(t is not None for t in targets)
            yield Batch({name: x}, targets=[t for t in targets if t is not None] if labelled else None)

    return batches


def yolo_source(root: Path, name: str, dtype: str, batch_size: int, preprocess: PreprocessSpec):
    images = _images(root / "images")
    if not images:
        raise UsageError(f"data '{root}': no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root / 'images'}")
    items: list[tuple[Path, LabelReader | None]] = []
    for image in images:
        label = (root / "labels" / image.relative_to(root / "images")).with_suffix(".txt")
        items.append((image, functools.partial(_yolo_labels, label, source=str(root))))
    return _batches(items, name, dtype, batch_size, preprocess, str(root))


def flat_source(root: Path, name: str, dtype: str, batch_size: int, preprocess: PreprocessSpec):
    images = _images(root)
    return _batches([(image, None) for image in images], name, dtype, batch_size, preprocess, str(root))


def _coco_labels(boxes: list, classes: list[int], transform: ImageTransform) -> BoxLabels:
    if not boxes:
        return BoxLabels.empty()
    xywh = np.asarray(boxes, dtype=np.float64)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return BoxLabels(transform.to_input(xyxy), np.asarray(classes, dtype=np.int64))


def coco_source(spec: str, name: str, dtype: str, batch_size: int, preprocess: PreprocessSpec):
    """Batches from a COCO json, and the category names (class index order)."""
    path = Path(spec)
    try:
        data = json.loads(path.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images, annotations = data["images"], data.get("annotations", [])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"data '{spec}' is not a COCO detection json ({type(exc).__name__}: {exc}); expected 'images', "
            "'annotations' and 'categories'"
        ) from None
    index = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict = {}
    for ann in annotations:
        if ann.get("iscrowd"):
            continue  # crowd regions are "ignore" areas in COCO's own evaluation, not objects to find
        if ann.get("category_id") not in index:
            raise UsageError(
                f"data '{spec}': annotation {ann.get('id')} has category {ann.get('category_id')!r}, not in 'categories'"
            )
        by_image.setdefault(ann["image_id"], []).append(ann)
    roots = [path.parent, path.parent / "images", path.parent.parent, path.parent.parent / "images"]
    items: list[tuple[Path, LabelReader | None]] = []
    for image in images:
        file = next((r / image["file_name"] for r in roots if (r / image["file_name"]).is_file()), None)
        if file is None:
            raise UsageError(
                f"data '{spec}': image '{image['file_name']}' is not next to the json, in images/ beside it, "
                "or one folder up"
            )
        boxes = [a["bbox"] for a in by_image.get(image["id"], [])]
        classes = [index[a["category_id"]] for a in by_image.get(image["id"], [])]
        items.append((file, functools.partial(_coco_labels, boxes, classes)))
    if not items:
        raise UsageError(f"data '{spec}' lists no images")
    names = [str(c.get("name", c["id"])) for c in categories]
    return _batches(items, name, dtype, batch_size, preprocess, spec), names
