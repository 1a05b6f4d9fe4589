"""Tiny models and data built in code (milliseconds), importable as ``tinymodels:<name>`` in tests."""

import numpy as np
import torch
from torch import nn


class TinyCNN(nn.Module):
    example_inputs = (torch.zeros(1, 3, 8, 8),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class TokenClassifier(nn.Module):
    """Two int64 inputs (input_ids, attention_mask), like a tiny transformer encoder head."""

    example_inputs = {
        "input_ids": torch.zeros(1, 6, dtype=torch.int64),
        "attention_mask": torch.ones(1, 6, dtype=torch.int64),
    }

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.proj(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class NoShape(nn.Module):
    def forward(self, x):
        return x * 2


class Broken(nn.Module):
    example_inputs = (torch.zeros(1, 4),)

    def forward(self, x):
        raise RuntimeError("layer 'mystery' exploded")


class ConvStack(nn.Module):
    """Three 3x3 convolutions at 64x64, 64 channels (~0.3 G MACs): milliseconds per run, so kernels dominate
    ONNX Runtime's fixed per-run overhead (~0.1 ms) in a profile."""

    example_inputs = (torch.zeros(1, 3, 64, 64),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.convs(x).mean((2, 3)))


def tiny_cnn():
    return TinyCNN().eval()


def conv_stack():
    return ConvStack().eval()


def token_classifier():
    return TokenClassifier().eval()


def no_shape():
    return NoShape()


def broken():
    return Broken()


def not_a_module():
    return 42


def tiny_images(n=48, seed=0):
    """(x, y) batches whose labels are the TinyCNN's own predictions (so accuracy is meaningful)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        y = TinyCNN()(torch.from_numpy(x)).argmax(1).numpy()
    for i in range(0, n, 16):
        yield x[i : i + 16], y[i : i + 16]


def token_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n // 8):
        ids = rng.integers(0, 50, (8, 6)).astype(np.int64)
        mask = np.ones((8, 6), dtype=np.int64)
        yield {"input_ids": ids, "attention_mask": mask}


def stream_calls(n=3, seed=0):
    """One dict per call of a streaming model: samples [1, 40], state [2, 1, 8], a scalar sample rate."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {
            "x": rng.random((1, 40), dtype=np.float32),
            "state": rng.random((2, 1, 8), dtype=np.float32),
            "sr": np.int64(16000),
        }


def write_fixed_batch_onnx(path, batch=1):
    """An ONNX classifier (Conv -> GlobalAveragePool -> Gemm) whose input pins the batch size, as many exported files do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        initializer=weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def write_images_npz(path, n=10, seed=0):
    """``n`` unlabelled 3x8x8 samples for the models above."""
    np.savez(path, x=np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32))
    return path


def tiny_bert(layers=2, hidden=32, heads=4):
    """A Hugging Face BERT encoder built from a config (random weights, nothing downloaded), with the
    library's default attention implementation (SDPA)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=32,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    model.example_inputs = {
        "input_ids": torch.zeros(1, 6, dtype=torch.int64),
        "attention_mask": torch.ones(1, 6, dtype=torch.int64),
    }
    return model


class TwoHeads(nn.Module):
    """Two outputs: ``scores`` survives INT8, ``fine`` does not (it rides on a +1000 offset that a uint8
    scale cannot resolve), as a detector whose box head is fine while its score head collapses."""

    example_inputs = (torch.zeros(1, 3, 8, 8),)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        scores = self.head(features)
        return scores, (features + 1000.0) - 1000.0


def two_heads():
    return TwoHeads().eval()
