"""Models built in code for validation tests, importable as ``validation_models:<name>``.

Each is shaped after a real case: an untrained classifier whose outputs are nearly uniform
(top-1 flips under any quantization), a dense embedding head, and a MatMul stack with one
outlier layer that full dynamic INT8 cannot carry.
"""

import numpy as np
import torch
from torch import nn


class NearUniform(nn.Module):
    """Conv features into a head whose logits differ by ~1e-3: what an untrained model answers."""

    example_inputs = (torch.zeros(1, 3, 8, 8),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            # Every class reads the same features (plus a trace of its own): the logits move
            # together from sample to sample and differ from each other by far less than that.
            self.head.weight.copy_(self.head.weight[:1].expand(10, -1) + 1e-3 * self.head.weight)
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class Embedder(nn.Module):
    """A dense [N, 32] embedding (no classes): judged by cosine, never by argmax agreement."""

    example_inputs = (torch.zeros(1, 16),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class OutlierMLP(nn.Module):
    """Six MatMul layers; the second writes one channel 1000x larger than the rest (the third
    reads it scaled back), as transformer activations do. Quantizing that activation to 8 bits
    per tensor rounds every other channel away; the other layers quantize fine."""

    example_inputs = (torch.zeros(1, 32),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(6))
        with torch.no_grad():
            self.layers[1].weight[0, :] = self.layers[1].weight[0, :].abs() * 1000.0
            self.layers[2].weight[:, 0] /= 1000.0

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def near_uniform():
    return NearUniform().eval()


def embedder():
    return Embedder().eval()


def outlier_mlp():
    return OutlierMLP().eval()


def images(n=32, seed=0):
    """Unlabelled 3x8x8 samples (x only)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, 8, 8), dtype=np.float32)
    for i in range(0, n, 16):
        yield x[i : i + 16]


def vectors16(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 16)).astype(np.float32)]


def vectors32(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 32)).astype(np.float32)]


def labelled_images(n=32, seed=0, classes=10):
    """3x8x8 samples with labels 0..classes-1 (random: a reference accuracy at chance)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, 8, 8), dtype=np.float32)
    y = rng.integers(0, classes, n)
    for i in range(0, n, 16):
        yield x[i : i + 16], y[i : i + 16]


def wrong_labels(n=32, seed=0):
    """Labels (2-3 classes) that never match NearUniform's top-1: a reference accuracy of 0.0 (below chance)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        top1 = NearUniform()(torch.from_numpy(x)).argmax(1).numpy()
    labels = [[k for k in (0, 1, 2) if k != t][i % 2] for i, t in enumerate(top1)]
    return [(x, np.array(labels))]


class TinyWeights(nn.Module):
    """Weights below float16's smallest subnormal in several layers: fp16 conversion warns about each."""

    example_inputs = (torch.zeros(1, 16),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight[0, 0] = 1e-9

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def tiny_weights():
    return TinyWeights().eval()
