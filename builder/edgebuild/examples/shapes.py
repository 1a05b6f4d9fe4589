"""A tiny trained object detector: coloured circles, squares and triangles on textured backgrounds.

The detection counterpart of the digits example. Scenes are drawn from a seed (nothing is
downloaded): 1-5 shapes of varied size and colour on a noisy, textured background, in images
of several sizes and aspect ratios. The detector is a few convolutions with anchor-free heads
at strides 8 and 16 (~110k parameters, input 1x3x128x128) whose forward decodes its boxes, as
Ultralytics exports do: the output is the ``yolov8`` format ``[B, 4 + 3, N]`` (box centre x, y,
width, height in input pixels, then one sigmoid score per class; N = 16*16 + 8*8 = 320).

The weights in ``shapes_detector.safetensors`` were produced by ``python -m edgebuild.examples.shapes``
(fixed seed, 20 epochs over 2400 scenes: 3-5 minutes on 2 lightly loaded cores, far longer when
other jobs share them); run it again to retrain. It prints the validation mAP it reached.
``python -m edgebuild.examples.shapes --write-dataset DIR`` writes the calibration and validation
scenes as YOLO-format datasets (``DIR/calib``, ``DIR/val``: ``images/*.png`` and ``labels/*.txt``
with ``class cx cy w h`` normalised to the image), the detection DATA ``edgebuild pack`` reads.

For ``edgebuild pack --task detect`` (see the README's "Packing a detector"):
- model: ``edgebuild.examples.shapes:pretrained`` (``:pretrained_split``: the same with separate
  ``boxes`` and ``scores`` outputs); ``LABELS``, ``PREPROCESS`` and ``POSTPROCESS`` come from this module
- data: the YOLO-format folders ``--write-dataset`` writes (``DIR/calib``, ``DIR/val``); calibration
  also as ``edgebuild.examples.shapes:calibration_data``
- in memory: ``scenes(split)``, ``fit(scene, mode)``, ``validation_data()`` and ``evaluate(run)`` (COCO mAP)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("shapes_detector.safetensors")
SEED = 0
INPUT_SIZE = 128
INPUT_SHAPE = (1, 3, INPUT_SIZE, INPUT_SIZE)
LABELS = ["circle", "square", "triangle"]
STRIDES = (8, 16)
# Letterbox into the square input, centred, grey fill (as Ultralytics); the model was trained on
# stretched and bottom-right-padded scenes too, so a bundle may declare either of those instead.
PREPROCESS = {
    "layout": "NCHW",
    "color": "RGB",
    "size": [INPUT_SIZE, INPUT_SIZE],
    "resize": "letterbox",
    "fill": 114,
    "scale": 1.0 / 255.0,
    "dtype": "float32",
}
POSTPROCESS = {"type": "detection", "format": "yolov8", "conf": 0.25, "iou": 0.7, "max_det": 100}

# (width, height) of the generated images: square, landscape and portrait.
SCENE_SIZES = ((128, 128), (160, 120), (192, 128), (120, 160), (224, 128), (256, 192))
# Splits are independent streams of the same generator, so each is reproducible on its own.
SPLITS = {"train": 0, "calib": 1, "val": 2}
SPLIT_SIZES = {"train": 2400, "calib": 64, "val": 200}
Fit = Literal["stretch", "center", "bottom-right"]
FILL = 114


@dataclass(frozen=True)
class Scene:
    """One generated image and its ground truth."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    boxes: np.ndarray  # [K, 4] float32 x1, y1, x2, y2 in image pixels
    classes: np.ndarray  # [K] int64 indices into LABELS


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted colour, blotchy low-frequency texture, stripes now and then, pixel noise."""
    from PIL import Image

    base = rng.uniform(60, 190, 3)
    coarse = rng.uniform(-45, 45, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    blotches = np.asarray(
        Image.fromarray(((coarse + 128).clip(0, 255)).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    image = base + (blotches - 128)
    if rng.random() < 0.5:  # stripes: edges that are not shapes
        period, angle = rng.uniform(6, 24), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        image = image + rng.uniform(8, 25) * stripes[..., None]
    return image


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour far enough from the background's mean that the shape stays visible."""
    import colorsys

    mean = background.reshape(-1, 3).mean(0)
    for _ in range(50):
        rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))) * 255
        if np.abs(rgb - mean).sum() > 150:
            break
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: 1-5 non-overlapping shapes, 14-38 % of the shorter side each."""
    from PIL import Image, ImageDraw

    width, height = SCENE_SIZES[rng.integers(len(SCENE_SIZES))]
    background = _background(rng, width, height)
    canvas = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    boxes: list[list[float]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, 6))):
        for _attempt in range(30):
            side = rng.uniform(0.14, 0.38) * min(width, height)
            x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
            box = [x0, y0, x0 + side, y0 + side]
            if all(box[0] > b[2] + 2 or box[2] < b[0] - 2 or box[1] > b[3] + 2 or box[3] < b[1] - 2 for b in boxes):
                break
        else:
            continue
        kind = int(rng.integers(len(LABELS)))
        colour = _shape_colour(rng, background)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            # An equilateral triangle at a random angle inside the square; its box is its vertices'.
            cx, cy, radius, angle = x0 + side / 2, y0 + side / 2, side / 2, rng.uniform(0, 2 * np.pi)
            points = [
                (cx + radius * np.cos(angle + k * 2 * np.pi / 3), cy + radius * np.sin(angle + k * 2 * np.pi / 3))
                for k in range(3)
            ]
            draw.polygon(points, fill=colour)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            box = [min(xs), min(ys), max(xs), max(ys)]
        boxes.append(box)
        classes.append(kind)
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(3, 12), (height, width, 3))
    return Scene(
        image=noisy.clip(0, 255).astype(np.uint8),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        classes=np.asarray(classes, dtype=np.int64),
    )


def scenes(split: str, count: int | None = None) -> list[Scene]:
    """The first ``count`` scenes of a split (``train``, ``calib``, ``val``); the same for a given seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    count = SPLIT_SIZES[split] if count is None else count
    return [make_scene(np.random.default_rng([SEED, SPLITS[split], index])) for index in range(count)]


def fit(scene: Scene, mode: Fit = "center", size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The scene as the model sees it: ``[3, size, size]`` float32 in 0..1 and its boxes in input pixels.

    Same arithmetic as edgerun's letterbox (scale to fit, round the inner size, pad with grey):
    ``center`` centres the image, ``bottom-right`` puts it top-left (padding right and bottom),
    ``stretch`` ignores the aspect ratio.
    """
    from PIL import Image

    height, width = scene.image.shape[:2]
    image = Image.fromarray(scene.image)
    boxes = scene.boxes.copy()
    if mode == "stretch":
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        boxes *= np.array([size / width, size / height] * 2, dtype=np.float32)
    else:
        ratio = min(size / width, size / height)
        inner = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        pad = ((size - inner[0]) // 2, (size - inner[1]) // 2) if mode == "center" else (0, 0)
        canvas = Image.new("RGB", (size, size), (FILL, FILL, FILL))
        canvas.paste(image.resize(inner, Image.Resampling.BILINEAR), pad)
        image = canvas
        boxes = boxes * np.array([inner[0] / width, inner[1] / height] * 2, dtype=np.float32)
        boxes += np.array([pad[0], pad[1]] * 2, dtype=np.float32)
    tensor = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(tensor), boxes


def targets_of(scene: Scene, boxes: np.ndarray) -> np.ndarray:
    """``[K, 5]`` rows of ``class_id, x1, y1, x2, y2``."""
    return np.concatenate([scene.classes[:, None].astype(np.float32), boxes], axis=1)


def _batches(split: str, batch_size: int, mode: Fit) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    items = scenes(split)
    for start in range(0, len(items), batch_size):
        fitted = [(scene, *fit(scene, mode)) for scene in items[start : start + batch_size]]
        yield np.stack([x for _, x, _ in fitted]), [targets_of(scene, boxes) for scene, _, boxes in fitted]


def calibration_data(batch_size: int = 16) -> Iterator[np.ndarray]:
    """64 calibration scenes, centre-letterboxed, in batches of ``x`` (``--calib-data`` takes it as is)."""
    return (x for x, _ in _batches("calib", batch_size, "center"))


def validation_data(batch_size: int = 16) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """200 held-out scenes, centre-letterboxed, in batches of ``(x, targets)``: in-memory, for :func:`evaluate`.

    ``targets`` holds one ``[K, 5]`` float32 array per image: ``class_id, x1, y1, x2, y2`` in input pixels.
    ``edgebuild pack`` reads labelled detection data from a YOLO-format folder (:func:`write_dataset`).
    """
    return _batches("val", batch_size, "center")


def write_dataset(root: Path | str, split: str = "val", count: int | None = None) -> Path:
    """Write a split as a YOLO-format dataset: ``root/images/NNNN.png``, ``root/labels/NNNN.txt``.

    Each label line is ``class cx cy w h``, normalised to the image's width and height. Returns ``root``.
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes(split, count)):
        height, width = scene.image.shape[:2]
        Image.fromarray(scene.image).save(root / "images" / f"{index:04d}.png")
        lines = [
            f"{cls} {(b[0] + b[2]) / 2 / width:.6f} {(b[1] + b[3]) / 2 / height:.6f} "
            f"{(b[2] - b[0]) / width:.6f} {(b[3] - b[1]) / height:.6f}"
            for cls, b in zip(scene.classes.tolist(), scene.boxes.tolist())
        ]
        (root / "labels" / f"{index:04d}.txt").write_text("".join(line + "\n" for line in lines))
    return root


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ShapesDetector(nn.Module):
    """Six 3x3 convolutions, then per stride (8 and 16) a 3x3 box head (side distances) and a 3x3 class head.

    ``forward`` decodes inside the graph: distances ``softplus(raw) * stride`` from each cell's centre
    become ``cx, cy, w, h`` in input pixels, class logits become sigmoid scores; both levels are
    concatenated along the last axis: ``[B, 4 + num_classes, N]``.
    """

    example_inputs = (torch.zeros(INPUT_SHAPE),)
    points: torch.Tensor  # [2, N] cell centres (buffers of the fixed input size)
    strides: torch.Tensor  # [N]

    def __init__(self, num_classes: int = len(LABELS), size: int = INPUT_SIZE):
        super().__init__()
        self.num_classes = num_classes
        self.stride8 = nn.Sequential(_conv(3, 16, 2), _conv(16, 32, 2), _conv(32, 48, 2), _conv(48, 48, 1))
        self.stride16 = nn.Sequential(_conv(48, 64, 2), _conv(64, 64, 1))
        # Separate box and class convolutions (as YOLOv8's head): each output gets its own INT8 scale,
        # so box distances are not quantized on the range of the class logits.
        self.box_heads = nn.ModuleList([nn.Conv2d(c, 4, 3, padding=1) for c in (48, 64)])
        self.class_heads = nn.ModuleList([nn.Conv2d(c, num_classes, 3, padding=1) for c in (48, 64)])
        points, strides = [], []
        for stride in STRIDES:
            cells = size // stride
            ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
            points.append(torch.stack([xs.flatten(), ys.flatten()]).float().add(0.5).mul(stride))
            strides.append(torch.full((cells * cells,), float(stride)))
        # Constants of the fixed input size, not weights: kept out of the state dict.
        self.register_buffer("points", torch.cat(points, 1), persistent=False)  # [2, N] cell centres
        self.register_buffer("strides", torch.cat(strides), persistent=False)  # [N]

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Side distances ``[B, 4, N]`` (left, top, right, bottom, input pixels) and class logits ``[B, nc, N]``."""
        f8 = self.stride8(images)
        f16 = self.stride16(f8)
        features = (f8, f16)
        boxes = torch.cat([head(f).flatten(2) for head, f in zip(self.box_heads, features)], 2)
        logits = torch.cat([head(f).flatten(2) for head, f in zip(self.class_heads, features)], 2)
        return nn.functional.softplus(boxes) * self.strides, logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        distances, logits = self.raw(images)
        left_top, right_bottom = distances[:, :2], distances[:, 2:]
        centre = self.points + (right_bottom - left_top) / 2
        return torch.cat([centre, left_top + right_bottom, torch.sigmoid(logits)], 1)


class SplitOutputs(nn.Module):
    """The same detector with two outputs, as detectors that leave the concatenation out:
    ``boxes`` ``[B, N, 4]`` (x1, y1, x2, y2 in input pixels) and ``scores`` ``[B, N, num_classes]``.
    Packed with ``--postprocess`` format ``split`` naming both outputs (see the README)."""

    example_inputs = ShapesDetector.example_inputs

    def __init__(self, detector: ShapesDetector):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        distances, logits = self.detector.raw(images)
        points = self.detector.points
        boxes = torch.cat([points - distances[:, :2], points + distances[:, 2:]], 1)
        return {"boxes": boxes.transpose(1, 2), "scores": torch.sigmoid(logits).transpose(1, 2)}


def untrained() -> ShapesDetector:
    """A freshly initialised detector."""
    return ShapesDetector()


def pretrained() -> ShapesDetector:
    """The shipped, trained detector (FP32)."""
    from safetensors.torch import load_file

    model = ShapesDetector()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def pretrained_split() -> SplitOutputs:
    """The shipped detector with separate ``boxes`` and ``scores`` outputs."""
    return SplitOutputs(pretrained()).eval()


# ---------------------------------------------------------------------------------------------
# Training: each ground-truth box is predicted by the cells whose centre lies inside it and near
# its centre, on the level its size belongs to (FCOS-style centre sampling); class targets are the
# predicted box's IoU with its ground truth, so scores rank boxes by how well they fit.


def _assign(targets: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Index of the ground truth each cell predicts (-1: background). targets ``[K, 5]``."""
    if len(targets) == 0:
        return torch.full((points.shape[1],), -1, dtype=torch.long)
    boxes = targets[:, 1:]
    px, py = points[0][:, None], points[1][:, None]  # [N, 1]
    inside = (px > boxes[:, 0]) & (px < boxes[:, 2]) & (py > boxes[:, 1]) & (py < boxes[:, 3])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    radius = 1.5 * strides[:, None]
    central = ((px - cx).abs() < radius) & ((py - cy).abs() < radius)
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    level = torch.where(strides[:, None] == STRIDES[0], side <= 36, side >= 24)
    candidate = inside & central & level
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).expand_as(candidate)
    area = torch.where(candidate, area, torch.full_like(area, float("inf")))
    best, index = area.min(1)
    return torch.where(torch.isfinite(best), index, torch.full_like(index, -1))


def _box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of matching rows of two ``[M, 4]`` xyxy tensors."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return iou, iou - (hull - union) / hull.clamp(min=1e-6)


def _loss(model: ShapesDetector, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    distances, logits = model.raw(images)
    points = model.points
    boxes = torch.cat([points - distances[:, :2], points + distances[:, 2:]], 1).transpose(1, 2)  # [B, N, 4]
    logits = logits.transpose(1, 2)  # [B, N, nc]
    score_targets = torch.zeros_like(logits)
    box_loss, positives = images.new_zeros(()), 0
    for item, target in enumerate(targets):
        assigned = _assign(target, points, model.strides)
        cells = (assigned >= 0).nonzero().flatten()
        if len(cells) == 0:
            continue
        matched = target[assigned[cells]]
        iou, giou = _box_iou_pairs(boxes[item, cells], matched[:, 1:])
        box_loss = box_loss + (1 - giou).sum()
        score_targets[item, cells, matched[:, 0].long()] = iou.detach().clamp(min=0.1)
        positives += len(cells)
    normaliser = max(positives, 1)
    score_loss = nn.functional.binary_cross_entropy_with_logits(logits, score_targets, reduction="sum")
    return (score_loss + 2.0 * box_loss) / normaliser


def _training_set(count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Train scenes fitted in all three ways the bundles may declare (stretch, centre, bottom-right)."""
    modes: tuple[Fit, ...] = ("center", "stretch", "bottom-right")
    images, targets = [], []
    for index, scene in enumerate(scenes("train", count)):
        x, boxes = fit(scene, modes[index % len(modes)])
        images.append(torch.from_numpy((x * 255).round().astype(np.uint8)))
        targets.append(torch.from_numpy(targets_of(scene, boxes)))
    return torch.stack(images), targets


def train(epochs: int = 20, seed: int = SEED, batch_size: int = 32) -> tuple[ShapesDetector, dict[str, float]]:
    """Train deterministically; returns the model and its FP32 COCO mAP on the validation scenes."""
    torch.manual_seed(seed)
    images, targets = _training_set(SPLIT_SIZES["train"])
    model = ShapesDetector()
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=4e-3, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(seed)
    width = float(INPUT_SIZE)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            x = images[batch].float() / 255.0
            y = [targets[int(i)].clone() for i in batch]
            # Horizontal flip of half the batch: shapes have no handedness, boxes mirror.
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            for k in flip.nonzero().flatten().tolist():
                y[k][:, [1, 3]] = width - y[k][:, [3, 1]]
            optimizer.zero_grad()
            _loss(model, x, y).backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return model, evaluate(lambda x: model(torch.from_numpy(x)).detach().numpy())


def _box_labels(targets: np.ndarray):
    from edgebuild.tasks.coco import BoxLabels

    return BoxLabels(targets[:, 1:].astype(np.float32), targets[:, 0].astype(np.int64))


def evaluate(run: Callable[[np.ndarray], np.ndarray], batches=None) -> dict[str, float]:
    """COCO mAP (pycocotools) of ``run`` (``x [B, 3, H, W] -> [B, 7, N]``, numpy) on ``batches`` of
    ``(x, targets)`` (default: :func:`validation_data`), decoded with the runtime's own detection
    post-processing at conf 0.001, as COCO evaluation does."""
    from edgebuild.tasks.coco import coco_map
    from edgerun.tasks.detection import DetectionSpec, detect

    spec = DetectionSpec.model_validate(POSTPROCESS)
    found: list = []
    truth: list = []
    for x, targets in batches if batches is not None else validation_data():
        found.extend(detect([run(x)], ["output"], spec, (INPUT_SIZE, INPUT_SIZE), conf=0.001))
        truth.extend(_box_labels(t) for t in targets)
    scores = coco_map(truth, found, classes=len(LABELS))
    return {"map50_95": scores["map50_95"], "map50": scores["map50"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgebuild.examples.shapes", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--write-dataset",
        metavar="DIR",
        type=Path,
        help="write the calib and val scenes as YOLO-format datasets under DIR (DIR/calib, DIR/val) instead of training",
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    args = parser.parse_args(argv)
    if args.write_dataset is not None:
        for split in ("calib", "val"):
            print(write_dataset(args.write_dataset / split, split))
        return
    from safetensors.torch import save_file

    start = time.perf_counter()
    model, scores = train(epochs=args.epochs)
    save_file(model.state_dict(), WEIGHTS)
    print(
        f"validation mAP50 {scores['map50']:.4f}, mAP50-95 {scores['map50_95']:.4f} "
        f"({time.perf_counter() - start:.0f} s); weights written to {WEIGHTS}"
    )


if __name__ == "__main__":
    main()
