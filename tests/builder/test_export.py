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


@pytest.mark.slow
def test_a_stock_hugging_face_bert_exports_at_opset_17_with_keyword_inputs(tmp_path):
    """The TorchScript exporter (opset 17 is below dynamo's 18) binds inputs by position; BertModel's
    forward() then got "multiple values for argument 'use_cache'"."""
    import onnxruntime as ort
    from transformers import BertConfig, BertModel

    from edgebuild.sources import InputSpec, ModelSource

    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    specs = [InputSpec(n, (1, 8), "int64") for n in ("input_ids", "attention_mask")]
    source = ModelSource("callable", "hf:bert", specs, module=BertModel(config).eval())
    result = export_onnx(source, tmp_path, 17)
    assert result.exporter == "torchscript" and result.opset == 17
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    ids = np.ones((3, 11), np.int64)  # another batch and sequence length: the axes stay dynamic
    out = session.run(None, {"input_ids": ids, "attention_mask": ids})
    assert out[0].shape == (3, 11, 16)


def test_when_both_exporters_fail_the_error_suggests_a_next_step(tmp_path, monkeypatch):
    import edgebuild.export as export

    def refuse(*args, **kwargs):
        raise TypeError("forward() got multiple values for argument 'use_cache'")

    monkeypatch.setattr(export, "_export_torchscript", refuse)
    with pytest.raises(UsageError) as err:
        export_onnx(load_model("tinymodels:tiny_cnn"), tmp_path, 17)
    message = str(err.value)
    assert "dynamo: ValueError: the dynamo exporter emits opset >= 18, the target needs 17" in message
    assert "torchscript: TypeError" in message and "next step:" in message and "wrap the model" in message
