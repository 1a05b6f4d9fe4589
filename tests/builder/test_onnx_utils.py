"""ONNX helpers: sessions built with the runtime's options; library calls that litter the cwd run in a scratch one."""

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgebuild.onnx_utils import make_session, scratch_cwd
from edgebuild.passes.quantize import preprocess
from edgerun.manifest import SessionOptionsSpec
from edgerun.session import make_session_options


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


# --- sessions: the builder validates with the options the runtime serves with ---------------


def relu_model(path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


SPINNING = "session.intra_op.allow_spinning"


def settings(options, keys):
    """What a SessionOptions object decides, comparable with ==."""
    return (
        options.graph_optimization_level,
        options.intra_op_num_threads,
        options.inter_op_num_threads,
        options.execution_mode,
        {key: options.get_session_config_entry(key) for key in keys},
    )


@pytest.mark.parametrize(
    "spec",
    [
        SessionOptionsSpec(),
        SessionOptionsSpec(graph_optimization_level="basic"),
        SessionOptionsSpec(graph_optimization_level="disable_all", config={SPINNING: "1"}),
        SessionOptionsSpec(config={"session.set_denormal_as_zero": "1"}),
    ],
)
@pytest.mark.parametrize("threads", [None, 2])
def test_builder_sessions_use_the_runtime_session_options(tmp_path, spec, threads):
    session = make_session(relu_model(tmp_path / "relu.onnx"), spec, threads=threads)
    keys = [SPINNING, *spec.config]
    builder = settings(session.get_session_options(), keys)
    assert builder == settings(make_session_options(spec, threads or 0), keys)
    # The manifest's spinning setting wins over the runtime's default (off).
    assert builder[4][SPINNING] == spec.config.get(SPINNING, "0")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_a_level_and_config_make_the_same_session_as_the_spec(tmp_path):
    path = relu_model(tmp_path / "relu.onnx")
    spec = SessionOptionsSpec(graph_optimization_level="extended", config={SPINNING: "1"})
    by_level = make_session(path, "extended", config={SPINNING: "1"}).get_session_options()
    assert settings(by_level, [SPINNING]) == settings(make_session(path, spec).get_session_options(), [SPINNING])
