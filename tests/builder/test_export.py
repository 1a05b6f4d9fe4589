import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgebuild.errors import UsageError
from edgebuild.export import export_onnx
from edgebuild.onnx_utils import model_opset
from edgebuild.sources import load_model


def test_export_is_single_file_with_dynamic_batch(tmp_path):
    source = load_model("tinymodels:tiny_cnn")
    result = export_onnx(source, tmp_path, 18)
    assert result.exporter == "dynamo" and result.opset == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx"]  # no external .data sidecar
    session = ort.InferenceSession(str(result.path))
    x = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)
    (out,) = session.run(None, {"input": x})
    with torch.no_grad():
        expected = source.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_multi_input_export_has_dynamic_batch_and_sequence(tmp_path):
    source = load_model("tinymodels:token_classifier")
    result = export_onnx(source, tmp_path, 18)
    session = ort.InferenceSession(str(result.path))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids = np.random.default_rng(0).integers(0, 50, (3, 11)).astype(np.int64)  # other batch and length than the example
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        expected = source.module(torch.from_numpy(ids), torch.ones(3, 11, dtype=torch.int64)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_model_failing_on_its_input_names_the_error(tmp_path):
    with pytest.raises(UsageError, match="layer 'mystery' exploded"):
        export_onnx(load_model("tinymodels:broken"), tmp_path, 18)


def test_old_onnx_opset_is_upgraded(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, tmp_path / "old.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = export_onnx(load_model(str(tmp_path / "old.onnx")), out_dir, 17)
    assert model_opset(result.path) == 17 and "opset 11" in result.fallback_reason
