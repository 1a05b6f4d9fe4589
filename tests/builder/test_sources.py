import numpy as np
import pytest
import torch

from edgebuild.errors import UsageError
from edgebuild.sources import load_model, parse_shape


def test_callable_with_example_inputs():
    source = load_model("tinymodels:tiny_cnn")
    assert source.kind == "callable"
    assert [(s.name, s.shape, s.dtype) for s in source.inputs] == [("input", (1, 3, 8, 8), "float32")]
    assert not source.module.training


def test_multi_input_names_and_dtypes_come_from_example_dict():
    source = load_model("tinymodels:token_classifier")
    assert [(s.name, s.dtype) for s in source.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]


def test_input_shape_flag_overrides_and_is_validated():
    assert load_model("tinymodels:no_shape", input_shape=(2, 5)).inputs[0].shape == (2, 5)
    with pytest.raises(UsageError, match="--input-shape"):
        load_model("tinymodels:no_shape")
    with pytest.raises(UsageError, match="comma-separated"):
        parse_shape("1,three")
    with pytest.raises(UsageError, match="positive"):
        parse_shape("1,0,8")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tinymodels:missing", "has no attribute 'missing'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("tinymodels:not_a_module", "expected a torch.nn.Module"),
        ("missing.onnx", "does not exist"),
        ("missing.pt2", "does not exist"),
        ("weird.txt", "does not exist"),
    ],
)
def test_bad_specs_have_clear_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        load_model(spec)


def test_weights_are_loaded_safely(tmp_path):
    model = load_model("tinymodels:tiny_cnn").module
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    loaded = load_model("tinymodels:tiny_cnn", weights=str(tmp_path / "w.pt")).module
    assert torch.all(loaded.conv.weight == 0.5)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="do not fit the model"):
        load_model("tinymodels:tiny_cnn", weights=str(tmp_path / "bad.pt"))


def test_weights_with_a_model_file_that_carries_its_own_are_refused(tmp_path):
    from tinymodels import write_fixed_batch_onnx

    onnx_path = tmp_path / "m.onnx"
    write_fixed_batch_onnx(onnx_path)
    torch.save({}, tmp_path / "w.pt")
    assert load_model(str(onnx_path)).kind == "onnx"
    with pytest.raises(UsageError, match="--weights applies to a package.module:callable model"):
        load_model(str(onnx_path), weights=str(tmp_path / "w.pt"))


def test_pt2_source(tmp_path):
    model = load_model("tinymodels:tiny_cnn").module
    program = torch.export.export(model, (torch.zeros(1, 3, 8, 8),))
    torch.export.save(program, tmp_path / "m.pt2")
    source = load_model(str(tmp_path / "m.pt2"))
    assert source.kind == "pt2" and source.inputs[0].shape == (1, 3, 8, 8)
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(source.module(x), model(x), atol=1e-6)


def test_onnx_source_reads_graph_inputs(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    source = load_model(str(tmp_path / "m.onnx"))
    assert source.kind == "onnx" and source.inputs[0].shape == (1, 4) and source.output_names == ["y"]
    assert np.array_equal(source.example_feed()["x"], np.zeros((1, 4), np.float32))


def test_module_in_working_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "cwd_model_mod.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    example_inputs = (torch.zeros(1, 4),)\n"
        "    def forward(self, x):\n"
        "        return x + 1\n"
        "def make():\n"
        "    return M()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_model("cwd_model_mod:make").inputs[0].shape == (1, 4)


def test_input_shapes_parse_plain_or_named():
    from edgebuild.sources import parse_input_shapes

    assert parse_input_shapes(("1,3,224,224",)) == (1, 3, 224, 224)
    assert parse_input_shapes(["x=1,576", "state=2,1,128"]) == {"x": (1, 576), "state": (2, 1, 128)}
    assert parse_input_shapes([1, 3, 8, 8]) == (1, 3, 8, 8)  # a recipe's list
    assert parse_input_shapes({"ids": [1, 16]}) == {"ids": (1, 16)}
    assert parse_input_shapes(()) is None
    with pytest.raises(UsageError, match="NAME=DIMS for each"):
        parse_input_shapes(["1,576", "state=2,1,128"])
    with pytest.raises(UsageError, match="no input name"):
        parse_input_shapes(["=1,2"])


class _Pair(torch.nn.Module):
    example_inputs = (torch.zeros(1, 6, dtype=torch.int64), torch.ones(1, 6, dtype=torch.int64))

    def forward(self, input_ids, attention_mask=None):
        return input_ids * attention_mask


def test_tuple_examples_are_named_after_forward_parameters(monkeypatch):
    monkeypatch.setattr("tinymodels.token_classifier", lambda: _Pair())
    assert load_model("tinymodels:token_classifier").input_names == ["input_ids", "attention_mask"]
    pair = _Pair()
    pair.input_names = ["ids", "mask"]  # the module's own names win
    monkeypatch.setattr("tinymodels.token_classifier", lambda: pair)
    assert load_model("tinymodels:token_classifier").input_names == ["ids", "mask"]


def test_without_shapes_only_names_are_known_until_data_is_given(monkeypatch):
    class HFStyle(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, *, return_dict=False):
            return input_ids

    monkeypatch.setattr("tinymodels.no_shape", lambda: HFStyle())
    source = load_model("tinymodels:no_shape", shapes_from_data=True)
    assert source.input_names == ["input_ids", "attention_mask"] and not source.resolved
    with pytest.raises(UsageError, match="cannot tell the shape of input 'input_ids'"):
        load_model("tinymodels:no_shape")


def _stream_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["state"], ["out"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, "N", 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_onnx_dynamic_dims_are_recorded_and_named_shapes_resolve_them(tmp_path):
    _stream_onnx(tmp_path / "s.onnx")
    with pytest.raises(UsageError, match=r"input 'x' has a dynamic non-batch dimension .* --input-shape x="):
        load_model(str(tmp_path / "s.onnx"))
    source = load_model(str(tmp_path / "s.onnx"), input_shape={"x": (1, 576), "state": (2, 1, 8)})
    assert [(s.shape, s.dynamic_axes) for s in source.inputs] == [((1, 576), (0, 1)), ((2, 1, 8), (1,))]
    with pytest.raises(UsageError, match="has no input 'h'"):
        load_model(str(tmp_path / "s.onnx"), input_shape={"h": (1, 2)})
    with pytest.raises(UsageError, match="describes one input"):
        load_model(str(tmp_path / "s.onnx"), input_shape=(1, 576))
    assert not load_model(str(tmp_path / "s.onnx"), shapes_from_data=True).resolved
