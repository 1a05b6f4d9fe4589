"""A tiny YOLOv8-style detector built in code (milliseconds), importable as ``detmodels:<name>`` in tests.

Its ONNX graph has what real anchor-free detectors have after their last convolutions: a DFL
(Softmax + a fixed 1x1 Conv), the anchor/stride decode, a Sigmoid on the class logits and the final
Concat into ``[B, 4+nc, N]``. Weights are random but fixed, so FP32's own detections serve as labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 32
STRIDES = (8, 16)
CLASSES = 3
REG_MAX = 4
POSTPROCESS = {"type": "detection", "format": "yolov8", "strides": list(STRIDES)}
PREPROCESS = {"preset": "unit", "resize": "letterbox", "fill": 114}


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over REG_MAX bins, expectation by a fixed 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, REG_MAX, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _anchors() -> tuple[torch.Tensor, torch.Tensor]:
    points, strides = [], []
    for s in STRIDES:
        n = SIZE // s
        ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
        points.append(torch.stack([xs, ys], -1).view(-1, 2))
        strides.append(torch.full((n * n, 1), float(s)))
    return torch.cat(points).T.unsqueeze(0), torch.cat(strides).T.unsqueeze(0)


class TinyYolo(nn.Module):
    example_inputs = (torch.zeros(1, 3, SIZE, SIZE),)
    input_names = ["images"]

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.box = nn.ModuleList(nn.Conv2d(16, 4 * REG_MAX, 1) for _ in STRIDES)
        self.cls = nn.ModuleList(nn.Conv2d(16, CLASSES, 1) for _ in STRIDES)
        with torch.no_grad():
            for head in self.cls:
                head.weight.mul_(4.0)  # spread the scores: some boxes well above conf 0.25, most below
        self.dfl = DFL()
        anchors, strides = _anchors()
        self.register_buffer("anchors", anchors)
        self.register_buffer("strides", strides)

    def forward(self, images):
        p8 = self.down(self.stem(images))  # stride 8
        p16 = self.down2(p8)  # stride 16
        levels = [torch.cat([b(p), c(p)], 1) for p, b, c in zip((p8, p16), self.box, self.cls)]
        x = torch.cat([lv.flatten(2) for lv in levels], 2)
        box, cls = x.split((4 * REG_MAX, CLASSES), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((xywh, cls.sigmoid()), 1)


def tiny_yolo():
    return TinyYolo().eval()


def silent_yolo():
    """TinyYolo whose every class score is sigmoid(-60): it finds nothing at any confidence."""
    model = TinyYolo().eval()
    with torch.no_grad():
        for head in model.cls:
            head.weight.zero_()
            head.bias.fill_(-60.0)
    return model


def write_tiny_yolo_onnx(path: Path, batch: int | None = None) -> Path:
    """The detector as ONNX; ``batch`` pins the input's batch size (dynamic when None)."""
    model = tiny_yolo()
    dynamic = None if batch else {"images": {0: "batch"}}
    example = torch.zeros(batch or 1, 3, SIZE, SIZE)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes=dynamic,
        opset_version=17,
        dynamo=False,
    )
    return path


def images(n: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` textured 3x32x32 inputs in 0..1 with a bright square each (something for the convs to see)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, SIZE, SIZE), dtype=np.float32) * 0.3
    for i in range(n):
        top, left = rng.integers(0, SIZE - 12, 2)
        x[i, :, top : top + 12, left : left + 12] += 0.7
    return x


def write_scene_folder(root: Path, n: int = 8, seed: int = 0, labels: bool = True, size=(48, 40)) -> Path:
    """A YOLO-format dataset (``images/*.png`` + ``labels/*.txt``) of coloured squares on noise, or a
    flat folder of the images alone when ``labels`` is False."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = root / "images" if labels else root
    image_dir.mkdir(parents=True, exist_ok=True)
    if labels:
        (root / "labels").mkdir(exist_ok=True)
    width, height = size
    for i in range(n):
        pixels = (rng.random((height, width, 3)) * 80).astype(np.uint8)
        side = int(rng.integers(10, 20))
        left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        cls = int(rng.integers(0, CLASSES))
        pixels[top : top + side, left : left + side] = [(255, 60, 60), (60, 255, 60), (60, 60, 255)][cls]
        Image.fromarray(pixels).save(image_dir / f"scene{i:02d}.png")
        if labels:
            cx, cy = (left + side / 2) / width, (top + side / 2) / height
            (root / "labels" / f"scene{i:02d}.txt").write_text(
                f"{cls} {cx:.6f} {cy:.6f} {side / width:.6f} {side / height:.6f}\n"
            )
    return root


def write_self_labelled_folder(root: Path, n: int = 8, seed: int = 0) -> Path:
    """A YOLO-format dataset whose labels are the FP32 detector's own boxes at conf 0.25 (so its mAP
    against them is 1.0 and a variant's mAP drop is its real loss), letterboxed as PREPROCESS says."""
    from edgerun.preprocess import parse_spec, preprocess_image_with_transform
    from edgerun.tasks.detection import DetectionSpec, detect

    write_scene_folder(root, n=n, seed=seed)
    spec = parse_spec(PREPROCESS).for_input([1, 3, SIZE, SIZE])
    model = tiny_yolo()
    for image in sorted((root / "images").iterdir()):
        x, transform = preprocess_image_with_transform(image.read_bytes(), spec)
        with torch.no_grad():
            out = model(torch.from_numpy(x)).numpy()
        found = detect([out], ["output0"], DetectionSpec.model_validate(POSTPROCESS), (SIZE, SIZE))[0]
        # Unclipped (labels may reach past the image edge), so they are exactly the detector's own boxes.
        boxes = (found.boxes - [transform.pad_x, transform.pad_y] * 2) / ([transform.scale_x, transform.scale_y] * 2)
        width, height = transform.original
        lines = [
            f"{c} {(b[0] + b[2]) / 2 / width:.6f} {(b[1] + b[3]) / 2 / height:.6f} "
            f"{(b[2] - b[0]) / width:.6f} {(b[3] - b[1]) / height:.6f}"
            for b, c in zip(boxes, found.class_ids)
        ]
        (root / "labels" / f"{image.stem}.txt").write_text("\n".join(lines) + "\n")
    return root


def self_labelled_batches(n: int = 8, batch: int = 4):
    """Callable DATA: ``(x, targets)`` with one ``[K, 5]`` array (class, x1, y1, x2, y2 in input pixels) per image,
    the detector's own boxes at conf 0.25."""
    from edgerun.tasks.detection import DetectionSpec, detect

    x = images(n)
    with torch.no_grad():
        out = tiny_yolo()(torch.from_numpy(x)).numpy()
    found = detect([out], ["output0"], DetectionSpec.model_validate(POSTPROCESS), (SIZE, SIZE))
    targets = [np.concatenate([d.class_ids[:, None].astype(np.float32), d.boxes], axis=1) for d in found]
    for i in range(0, n, batch):
        yield x[i : i + batch], targets[i : i + batch]
