"""`pack --target jetson` on a tiny model: fp16 + INT8 QDQ variants for TensorRT, then the CPU fallback serves it."""

import numpy as np
import onnx
import pytest

from edgebuild.pack import PackOptions, pack
from edgerun.loader import LoadOptions, load_model


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("jetson")
    options = PackOptions(
        model="tinymodels:tiny_cnn",
        target="jetson",
        output_dir=out,
        calib_data="tinymodels:tiny_images",
        val_data="tinymodels:tiny_images",
        max_accuracy_drop=0.2,
        bench_seconds=0.05,
        max_batch=4,
    )
    return pack(options, progress=lambda m: None)


def test_variants_are_fp16_and_int8_with_float32_io(jetson_bundle):
    m = jetson_bundle.manifest
    precisions = {v.precision for v in m.all_models()}
    assert {"fp16", "int8"} <= precisions
    for variant in m.all_models():
        graph = onnx.load(str(jetson_bundle.bundle / variant.path)).graph
        assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.FLOAT}
        assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}
        assert variant.opset == 17
    int8 = next(v for v in m.all_models() if v.precision == "int8")
    assert int8.quantization["activation_type"] == "int8" and int8.quantization["activation_symmetric"] is True
    assert int8.quantization["coverage"]["quantized_compute_ops"] == int8.quantization["coverage"]["compute_ops"] == 2


def test_providers_in_order_with_tensorrt_options_and_profiles(jetson_bundle):
    m = jetson_bundle.manifest
    assert [p.name for p in m.providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    trt = m.providers[0].options
    assert trt["trt_engine_cache_enable"] is True and trt["trt_timing_cache_enable"] is True
    assert trt["trt_profile_min_shapes"] == "input:1x3x8x8" and trt["trt_profile_max_shapes"] == "input:4x3x8x8"
    assert m.serving["max_batch"] == 4 and m.serving["out_of_profile"] == "reject"
    # INT8 is enabled in TensorRT only for the calibrated QDQ variant.
    for variant in m.all_models():
        effective = {**trt, **variant.provider_options.get("TensorrtExecutionProvider", {})}
        assert effective["trt_int8_enable"] is (variant.precision == "int8")
        assert effective["trt_fp16_enable"] is (variant.precision in ("fp16", "int8"))
    assert any(p.name == "tensorrt-check" and p.metrics["unsupported_ops"] == {} for p in m.passes)


def test_cpu_only_runtime_falls_back_to_cpu_and_serves_correctly(jetson_bundle, tmp_path):
    import torch
    from tinymodels import tiny_cnn

    served = load_model(jetson_bundle.bundle, LoadOptions(cache_dir=tmp_path, bench=False))
    assert served.parameters["providers"] == ["CPUExecutionProvider"]
    assert served.parameters["golden"]["passed"] is True
    x = np.random.default_rng(1).random((3, 3, 8, 8), dtype=np.float32)
    out = served.session.run({"input": x})["output"]
    with torch.no_grad():
        expected = tiny_cnn()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=0.05)


def _conv_heavy_onnx(path):
    """Conv -> Relu -> Conv -> Relu -> pool -> Gemm, built in code: weights are nearly all of the file."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((32, 3, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(32).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((64, 32, 3, 3)).astype(np.float32) * 0.06,
        "b2": rng.standard_normal(64).astype(np.float32) * 0.1,
        "fc": rng.standard_normal((10, 64)).astype(np.float32) * 0.2,
        "fcb": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def conv_heavy_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("conv-heavy")
    model = _conv_heavy_onnx(work / "convnet.onnx")
    data = work / "data.npz"
    np.savez(data, x=np.random.default_rng(1).random((32, 3, 8, 8), dtype=np.float32))
    options = PackOptions(
        model=str(model),
        target="jetson",
        output_dir=work / "out",
        calib_data=str(data),
        val_data=str(data),
        max_accuracy_drop=0.2,
        bench_seconds=0.05,
    )
    return pack(options, progress=lambda m: None)


def test_tensorrt_int8_variant_stores_int8_weights_and_is_a_fraction_of_fp32(conv_heavy_bundle):
    from onnx import numpy_helper

    m = conv_heavy_bundle.manifest
    files = {v.precision: conv_heavy_bundle.bundle / v.path for v in m.all_models()}
    model = onnx.load(str(files["int8"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantized = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
            dequantized[node.input[0]] = (inits[node.input[0]], inits[node.input[1]], inits[node.input[2]], axis)
    assert len(dequantized) == 3  # both convolutions and the head
    for values, _, zero_point, _ in dequantized.values():
        assert values.dtype == np.int8 and zero_point.dtype == np.int8 and not zero_point.any()
    convs = [d for d in dequantized.values() if d[0].ndim == 4]
    assert sorted((axis, scale.shape) for _, scale, _, axis in convs) == [(0, (32,)), (0, (64,))]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in model.graph.node)
    assert files["int8"].stat().st_size < 0.6 * files["fp32"].stat().st_size
    quant = next(v for v in m.all_models() if v.precision == "int8").quantization
    assert quant["extra_options"] == {"DedicatedQDQPair": True, "QuantizeBias": False}
    row = next(r for r in m.benchmark["candidates"] if r["precision"] == "int8")
    assert row["weights"] == {"int8": 3, "float_behind_qdq": 0}


def test_tensorrt_int8_variant_runs_on_the_host_cpu_and_the_report_claims_no_float_weights(conv_heavy_bundle):
    from edgebuild.onnx_utils import make_session

    m = conv_heavy_bundle.manifest
    files = {v.precision: conv_heavy_bundle.bundle / v.path for v in m.all_models()}
    int8 = next(v for v in m.all_models() if v.precision == "int8")
    assert int8.validation is not None and int8.validation["drop"] <= 0.2
    x = np.random.default_rng(2).random((4, 3, 8, 8), dtype=np.float32)
    ref = make_session(files["fp32"]).run(None, {"x": x})[0]
    out = make_session(files["int8"]).run(None, {"x": x})[0]
    cosine = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cosine.min() > 0.98
    report = (conv_heavy_bundle.bundle / "report.md").read_text()
    assert "float32 behind" not in report and "not smaller than FP32" not in report
