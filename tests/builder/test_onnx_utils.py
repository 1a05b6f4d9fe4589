"""ONNX helpers: library calls that write into the working directory run in a scratch one."""

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edgebuild.onnx_utils import scratch_cwd
from edgebuild.passes.quantize import preprocess


def uninferable_model(path):
    """A model with an op from an unknown domain: symbolic shape inference cannot finish it."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mystery", ["r"], ["y"], domain="test.mystery")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("test.mystery", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_scratch_cwd_returns_to_the_previous_directory_and_removes_the_scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with scratch_cwd() as scratch:
        assert os.getcwd() == str(scratch) and scratch != tmp_path
        (scratch / "left-behind.onnx").write_bytes(b"x")
    assert os.getcwd() == str(tmp_path)
    assert not scratch.exists()


def test_quantization_preprocessing_leaves_no_file_in_the_working_directory(tmp_path, monkeypatch):
    models, work = tmp_path / "models", tmp_path / "work"
    models.mkdir()
    work.mkdir()
    src = uninferable_model(models / "m.onnx")
    monkeypatch.chdir(work)
    # Relative paths, as a user types them: they must still resolve against the caller's directory.
    label = preprocess(Path(os.path.relpath(src)), Path(os.path.relpath(models / "prepared.onnx")))
    # Both symbolic attempts failed (each one saving its temp model into the cwd) before the fallback worked.
    assert label == "onnx-shape-inference"
    assert (models / "prepared.onnx").is_file()
    assert list(work.iterdir()) == []
