"""The Jetson op check lists only ops that run on data: constants and shape arithmetic are folded."""

import onnx
from onnx import TensorProto, helper

from edgebuild.tensorrt import unsupported_ops


def _model(path):
    # x [N, 4] -> Reshape(x, Concat(Gather(Shape(x), 0), Constant 4)) -> Where(x > 0, x, 0)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["zero_i"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Gather", ["shape", "zero_i"], ["batch"]),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "four"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zf", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Greater", ["y", "zero"], ["positive"]),
        helper.make_node("Where", ["positive", "y", "zero"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
            helper.make_tensor("four", TensorProto.INT64, [1], [4]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_shape_and_constant_nodes_are_not_listed_data_ops_are(tmp_path):
    path = _model(tmp_path / "m.onnx")
    # Nothing is "supported": only the nodes that run on data are reported.
    assert unsupported_ops(path, []) == {"Greater": 1, "Reshape": 1, "Where": 1}
    assert unsupported_ops(path, ["Reshape", "Greater"]) == {"Where": 1}


def test_the_jetson_profile_takes_a_bert_encoders_data_ops():
    from edgebuild.targets import load_target

    ops = set(load_target("jetson").notes["tensorrt_ops"])
    assert {"Where", "Expand", "And", "IsNaN", "Equal", "GatherElements", "Range"} <= ops
