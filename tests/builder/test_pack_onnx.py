"""`pack MODEL.onnx`: ONNX sources, including files whose inputs pin the batch size."""

from tinymodels import write_fixed_batch_onnx, write_images_npz

from edgebuild.benchmark import bench_bundle
from edgebuild.pack import PackOptions, pack
from edgerun.loader import LoadOptions, load_model


def _pack(tmp_path, model, **kwargs):
    data = str(write_images_npz(tmp_path / "data.npz", n=10))
    options = PackOptions(
        model=str(model),
        output_dir=tmp_path / "out",
        calib_data=data,
        val_data=data,
        bench_seconds=0.05,
        max_accuracy_drop="100%",
        **kwargs,
    )
    return pack(options, progress=lambda message: None)


def test_fixed_batch_model_is_calibrated_in_its_own_batch_size(tmp_path):
    result = _pack(tmp_path, write_fixed_batch_onnx(tmp_path / "fixed.onnx", batch=1), quantize="int8")
    static = [c for c in result.candidates if c.name.startswith("int8-")]
    assert static and all(c.error is None for c in static), [c.error for c in static]
    assert result.manifest.inputs[0].shape == [1, 3, 8, 8]


def test_fixed_batch_model_validates_a_sample_count_that_is_not_a_multiple_of_its_batch(tmp_path):
    result = _pack(tmp_path, write_fixed_batch_onnx(tmp_path / "fixed4.onnx", batch=4), quantize="none")
    assert result.manifest.validation.samples == 10
    served = load_model(result.bundle, LoadOptions(cache_dir=tmp_path / "cache", bench=False))
    assert served.parameters["golden"]["passed"] is True
    assert [row["precision"] for row in bench_bundle(result.bundle, max_seconds=0.01)] == ["fp32"]


def test_fixed_batch_model_gets_tensorrt_profiles_of_its_batch(tmp_path):
    result = _pack(
        tmp_path,
        write_fixed_batch_onnx(tmp_path / "fixed.onnx", batch=1),
        target="jetson",
        quantize="fp16",
        max_batch=4,
    )
    trt = result.manifest.providers[0].options
    assert trt["trt_profile_min_shapes"] == trt["trt_profile_max_shapes"] == "x:1x3x8x8"
