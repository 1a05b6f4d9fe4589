"""The embedded default model: a small CNN for scikit-learn's 8x8 handwritten digits.

The data ships inside scikit-learn (``load_digits``), so nothing is downloaded. The weights in
``digits_cnn.safetensors`` were produced by ``python -m edgebuild.examples.digits`` (fixed
seed, about ten seconds on 2 cores); run it again to retrain.

Used by ``edgebuild pack`` when no model is given:
- model: ``edgebuild.examples.digits:pretrained``
- calibration: ``edgebuild.examples.digits:calibration_data`` (train split)
- validation: ``edgebuild.examples.digits:validation_data`` (held-out split)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
SEED = 0
INPUT_SHAPE = (1, 1, 8, 8)
LABELS = [str(d) for d in range(10)]
# Pixel values in load_digits are 0..16; the model sees them scaled to 0..1.
PIXEL_SCALE = 1.0 / 16.0
# The /v1/predict path of the runtime turns an 8-bit grayscale image into the model input.
PREPROCESS = {"layout": "NCHW", "color": "L", "size": [8, 8], "scale": 1.0 / 255.0, "dtype": "float32"}
POSTPROCESS = {"type": "classification", "softmax": True, "top_k": 3}


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and a linear head; ~25k parameters."""

    example_inputs = (torch.zeros(INPUT_SHAPE),)

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) * PIXEL_SCALE)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_train, y_train, x_val, y_val


def calibration_data(batch_size: int = 32):
    """Train split, in batches of ``(x, y)``: real data for INT8 calibration."""
    x, y, _, _ = _splits()
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def validation_data(batch_size: int = 64):
    """Held-out split (450 images) in batches of ``(x, y)``."""
    _, _, x, y = _splits()
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def train_data(batch_size: int = 64):
    """Alias of the train split for distillation / fine-tuning recipes."""
    return calibration_data(batch_size)


def untrained(width: int = 32) -> DigitsCNN:
    """A freshly initialised model (e.g. a student for distillation)."""
    return DigitsCNN(width)


def pretrained() -> DigitsCNN:
    """The shipped, trained model (FP32)."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def train(epochs: int = 30, seed: int = SEED) -> tuple[DigitsCNN, float]:
    """Train deterministically; returns the model and its held-out accuracy."""
    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = _splits()
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * ((len(x_train) + 63) // 64)
    )
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_val)).argmax(1).numpy() == y_val).mean()
    return model, float(accuracy)


if __name__ == "__main__":
    from safetensors.torch import save_file

    trained, acc = train()
    save_file(trained.state_dict(), WEIGHTS)
    print(f"held-out accuracy {acc:.4f}; weights written to {WEIGHTS}")
