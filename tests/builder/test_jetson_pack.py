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
