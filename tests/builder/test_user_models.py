"""Models the project did not write, packed as a user would: a stock torchvision classifier from an image
folder with ImageNet preprocessing, a Hugging-Face-style text encoder from data keyed by forward()'s
names, and a streaming ONNX model with a recurrent state, a scalar input and a dynamic time axis."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgebuild.pack import PackOptions, pack
from edgerun.loader import LoadOptions
from edgerun.loader import load_model as load_bundle
from edgerun.preprocess import parse_spec, preprocess_image

CLASSES = ["apple", "banana", "cherry"]


def quiet(_message: str) -> None:
    pass


def image_folder(root, per_class: int = 3):
    """Odd-sized images, one sub-folder per class: the preprocessing has real resizing to do."""
    rng = np.random.default_rng(0)
    files = []
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3)
            pixels = np.clip(rng.normal(60 + 60 * k, 40, shape), 0, 255).astype(np.uint8)
            path = root / name / f"{i}.{'jpg' if i % 2 else 'png'}"
            Image.fromarray(pixels).save(path)
            files.append(path)
    return files


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    """Write ``name.py`` into a folder on sys.path (the user's own package), return its import name."""

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        return name

    return write


@pytest.mark.slow
def test_stock_torchvision_factory_with_imagenet_preprocessing(tmp_path, factory_module):
    module = factory_module(
        "fruit_factory",
        "import torch, torchvision\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torchvision.models.resnet18(weights=None, num_classes=3).eval()\n",
    )
    files = image_folder(tmp_path / "images")
    result = pack(
        PackOptions(
            model=f"{module}:build",
            input_shape=(1, 3, 64, 64),
            preprocess="imagenet",
            calib_data=str(tmp_path / "images"),
            val_data=str(tmp_path / "images"),
            quantize="none",
            bench_seconds=0.05,
            output_dir=tmp_path / "dist",
            name="fruit",
        ),
        progress=quiet,
    )
    bundle = result.bundle
    manifest = result.manifest
    spec = parse_spec(manifest.preprocess or {})
    assert (spec.size, spec.resize, spec.mean, spec.input) == ((64, 64), "stretch", [0.485, 0.456, 0.406], "input")
    assert (bundle / "labels.txt").read_text().split() == CLASSES

    # Golden inputs are the preset's tensors of the folder's images (sorted by class, then file name).
    golden = np.load(bundle / "golden.npz")["input:input"]
    expected = np.concatenate([preprocess_image(f.read_bytes(), spec) for f in files])
    np.testing.assert_array_equal(golden, expected[np.arange(len(golden)) % len(expected)])

    # /v1/predict makes the same tensor from the same bytes: its top-1 is ONNX Runtime's on the preset's tensor.
    from edgerun.reload import ModelRepository
    from edgerun.server import ServerConfig, create_app

    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    repo = ModelRepository(LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1))
    repo.load(bundle)
    with TestClient(create_app(repo, ServerConfig())) as client:
        for path in files[::4]:
            response = client.post("/v1/predict?model=fruit", content=path.read_bytes())
            assert response.status_code == 200, response.text
            logits = session.run(None, {"input": preprocess_image(path.read_bytes(), spec)})[0]
            assert response.json()["predictions"][0]["label"] == CLASSES[int(logits.argmax())]


TEXT_MODEL = '''
import torch
from torch import nn


class TinyConfig:
    vocab_size = 64
    hidden_size = 24


class TinyEncoder(nn.Module):
    """Hugging-Face-style: built from a config, optional forward arguments, mean-pooled embedding out."""

    def __init__(self, config):
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None):
        hidden = torch.tanh(self.dense(self.embeddings(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build():
    return TinyEncoder(TinyConfig()).eval()
'''


@pytest.mark.slow
def test_text_encoder_packs_from_data_keyed_by_forward_names(tmp_path, factory_module):
    module = factory_module("tiny_text_encoder", TEXT_MODEL)
    rng = np.random.default_rng(0)
    calls, length = 24, 12
    mask = (np.arange(length)[None, None, :] < rng.integers(4, length + 1, (calls, 1, 1))).astype(np.int64)
    np.savez(tmp_path / "text.npz", input_ids=rng.integers(0, 64, (calls, 1, length)), attention_mask=mask)
    result = pack(
        PackOptions(
            model=f"{module}:build",
            calib_data=str(tmp_path / "text.npz"),
            val_data=str(tmp_path / "text.npz"),
            quantize="none",
            bench_seconds=0.05,
            output_dir=tmp_path / "dist",
        ),
        progress=quiet,
    )
    inputs = [(t.name, t.dtype, t.shape) for t in result.manifest.inputs]
    assert inputs == [("input_ids", "int64", [-1, -1]), ("attention_mask", "int64", [-1, -1])]
    assert result.manifest.outputs[0].shape[-1] == 24
    assert result.manifest.validation is not None and result.manifest.validation.samples == calls
    # A sequence length the data never had runs too: the dynamic axes are real.
    session = ort.InferenceSession(str(result.bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input_ids": np.ones((2, 30), np.int64), "attention_mask": np.ones((2, 30), np.int64)})
    assert out[0].shape == (2, 24)


def streaming_onnx(path) -> None:
    """x [N, T], state [2, N, 8], sr [] (int64 sample rate) -> y [N], state_out [2, N, 8]."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ReduceMean", ["x", "axis1"], ["m"], keepdims=1),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k"], ["rate"]),
        helper.make_node("Mul", ["m", "rate"], ["ms"]),
        helper.make_node("MatMul", ["state", "w"], ["s1"]),
        helper.make_node("Add", ["s1", "ms"], ["state_out"]),
        helper.make_node("ReduceMean", ["state_out", "axes02"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "stream",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        # Outputs without a declared shape, as some exporters write them.
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([16000.0], np.float32), "k"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([0, 2], np.int64), "axes02"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


@pytest.mark.slow
def test_streaming_onnx_with_state_scalar_and_dynamic_time_packs_from_npz(tmp_path):
    streaming_onnx(tmp_path / "stream.onnx")
    rng = np.random.default_rng(1)
    calls = 16
    np.savez(
        tmp_path / "stream.npz",
        x=rng.normal(0, 1, (calls, 1, 320)).astype(np.float32),
        state=rng.normal(0, 1, (calls, 2, 1, 8)).astype(np.float32),  # each call's state keeps its own batch axis
        sr=np.full((calls,), 16000, np.int64),
    )
    result = pack(
        PackOptions(
            model=str(tmp_path / "stream.onnx"),
            calib_data=str(tmp_path / "stream.npz"),
            val_data=str(tmp_path / "stream.npz"),
            bench_seconds=0.05,
            output_dir=tmp_path / "dist",
        ),
        progress=quiet,
    )
    shapes = {t.name: t.shape for t in result.manifest.inputs}
    assert shapes == {"x": [-1, -1], "state": [2, -1, 8], "sr": []}
    assert result.manifest.validation is not None and result.manifest.validation.samples == calls
    golden = np.load(result.bundle / "golden.npz")
    assert golden["input:state"].shape[1:] == (2, 1, 8) and golden["input:sr"].ndim == 1  # one entry per call
    # The device's own loader verifies the bundle, runs the golden calls and serves it.
    served = load_bundle(result.bundle, LoadOptions(cache_dir=tmp_path / "cache", bench=False, threads=1))
    out = served.session.run(
        {"x": np.ones((1, 50), np.float32), "state": np.zeros((2, 1, 8), np.float32), "sr": np.array(8000)}
    )
    assert out["y"].shape == (1,) and out["state_out"].shape == (2, 1, 8)


@pytest.mark.slow
def test_streaming_model_tensorrt_profile_is_the_calls_shapes(tmp_path):
    streaming_onnx(tmp_path / "stream.onnx")
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "stream.npz",
        x=rng.normal(0, 1, (8, 1, 96)).astype(np.float32),
        state=rng.normal(0, 1, (8, 2, 1, 8)).astype(np.float32),
        sr=np.full((8,), 16000, np.int64),
    )
    result = pack(
        PackOptions(
            model=str(tmp_path / "stream.onnx"),
            target="jetson",
            calib_data=str(tmp_path / "stream.npz"),
            quantize="none",
            bench_seconds=0.05,
            output_dir=tmp_path / "dist",
        ),
        progress=quiet,
    )
    trt = next(p for p in result.manifest.providers if p.name == "TensorrtExecutionProvider")
    # The state's batch is its second axis and the scalar has none: no batch-first stretching, no scalar entry.
    for kind in ("min", "opt", "max"):
        assert trt.options[f"trt_profile_{kind}_shapes"] == "x:1x96,state:2x1x8"
