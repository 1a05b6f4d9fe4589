"""Quantization: every mode loads in ORT close to FP32, coverage is honest, variants and partial quantization."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgebuild.candidates import (
    CandidatePlan,
    SearchConfig,
    build_candidate,
    matmul_heavy,
    plan_candidates,
    static_variants,
)
from edgebuild.data import open_data
from edgebuild.onnx_utils import make_session
from edgebuild.passes import quantize as q
from edgebuild.passes.partial import exclusion_order, partial_quantize, partial_quantize_dynamic, rank_nodes
from edgebuild.sources import load_model
from edgebuild.targets import load_target
from edgebuild.validate import Metric, evaluate

RNG = np.random.default_rng(0)


def _save(nodes, inputs, outputs, inits, path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def tiny_cnn(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: the ops static INT8 quantizes on CNNs."""
    inits = {
        "w": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "b": np.zeros(8, np.float32),
        "fw": RNG.standard_normal((4, 8)).astype(np.float32) * 0.3,
        "fb": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc"),
    ]
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
        path,
    )


def outlier_mlp(path: Path, layers: int = 6, seed: int = 0) -> Path:
    """MatMul/Relu stack whose second activation has one channel 1000x larger than the rest.

    uint8 activations calibrated on that range round the other channels away: full INT8 breaks a
    tight cosine budget, and keeping the two nodes around that tensor in float repairs it.
    """
    rng = np.random.default_rng(seed)
    inits, nodes, current = {}, [], "x"
    for i in range(layers):
        w = rng.standard_normal((16, 16)).astype(np.float32) * 0.4
        if i == 1:
            w[:, 0] = np.abs(w[:, 0]) * 1000.0  # inputs and ReLU outputs are >= 0: channel 0 is always huge
        if i == 2:
            w[0, :] /= 1000.0
        inits[f"w{i}"] = w
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"a{i}"], name=f"fc{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            current = f"h{i}"
    nodes[-1].output[0] = "y"
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        inits,
        path,
    )


def matmul_in_if(path: Path) -> Path:
    """The weights sit inside the branches of an If: ORT's tools quantize nothing there."""

    def branch(name, scale):
        w = numpy_helper.from_array((RNG.standard_normal((16, 4)) * scale).astype(np.float32), f"{name}_w")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4])],
            [w],
        )

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0), name="if"
        ),
    ]
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"zero": np.zeros((), np.float32)},
        path,
    )


def _calibration(path: Path, n=32):
    source = load_model(str(path))
    x = RNG.random((n, *source.inputs[0].shape[1:]), dtype=np.float32)
    npz = path.with_suffix(".npz")
    np.savez(npz, x=x)
    return open_data(str(npz), source.inputs, purpose="calibration"), x


def _outputs(path, x):
    return make_session(path).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "config",
    [
        q.StaticInt8Config(),
        q.StaticInt8Config(reduce_range=True),
        q.StaticInt8Config(format="qoperator"),
        q.StaticInt8Config(format="qoperator", reduce_range=True, per_channel=False),
        q.StaticInt8Config(calibration_method="entropy"),
        q.StaticInt8Config(calibration_method="percentile"),
    ],
    ids=lambda c: c.describe(),
)
def test_static_int8_variants_load_and_stay_close_to_fp32(tmp_path, config):
    src = tiny_cnn(tmp_path / "cnn.onnx")
    calibration, x = _calibration(src)
    metrics = q.quantize_static_int8(src, tmp_path / "q.onnx", calibration, config)
    assert metrics["coverage"]["fraction"] == 1.0 and metrics["recipe"] == config.describe()
    ref, out = _outputs(src, x), _outputs(tmp_path / "q.onnx", x)
    assert evaluate(Metric("cosine"), ref, out, None)["cosine_min"] > 0.98


def dense_net(path: Path) -> Path:
    """Weights dominate the file: Conv -> Relu -> pool -> Gemm (transB=1) -> Gemm (transB=0) -> MatMul, biases non-zero."""
    inits = {
        "w": RNG.standard_normal((96, 3, 3, 3)).astype(np.float32) * 0.3,
        "b": RNG.standard_normal(96).astype(np.float32) * 0.1,
        "g1": RNG.standard_normal((64, 96)).astype(np.float32) * 0.1,  # [N, K], transB=1
        "g1b": RNG.standard_normal(64).astype(np.float32) * 0.1,
        "g2": RNG.standard_normal((64, 48)).astype(np.float32) * 0.1,  # [K, N], transB=0
        "g2b": RNG.standard_normal(48).astype(np.float32) * 0.1,
        "m": RNG.standard_normal((48, 10)).astype(np.float32) * 0.1,  # [K, N]
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g1", "g1b"], ["h1"], transB=1, name="fc_t"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "g2", "g2b"], ["h2"], name="fc"),
        helper.make_node("MatMul", ["h2", "m"], ["y"], name="mm"),
    ]
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
        path,
    )


def weight_dequantizers(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """Weight initializer name -> (stored values, zero point, DequantizeLinear axis) for every weight fed to a DQ."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
            found[node.input[0]] = (inits[node.input[0]], inits[node.input[2]], axis)
    return found


def test_tensorrt_preset_ships_int8_weights_per_output_channel_with_float_biases(tmp_path):
    src = dense_net(tmp_path / "dense.onnx")
    calibration, x = _calibration(src)
    preset = static_variants(SearchConfig(quantize="int8"), load_target("jetson"))[0]
    dst = tmp_path / "q.onnx"
    metrics = q.quantize_static_int8(src, dst, calibration, preset)
    weights = weight_dequantizers(dst)
    # One int8 initializer per weight, zero point 0, symmetric range, scale per output channel.
    by_source = {name.removesuffix("_quantized"): value for name, value in weights.items()}
    assert set(by_source) == {"w", "g1", "g2", "m"}
    for values, zero_point, _ in by_source.values():
        assert values.dtype == np.int8 and zero_point.dtype == np.int8 and not zero_point.any()
        assert values.min() >= -127
    assert {name: axis for name, (_, _, axis) in by_source.items()} == {"w": 0, "g1": 0, "g2": 1, "m": 1}
    assert [len(zp) for _, zp, _ in (by_source[n] for n in ("w", "g1", "g2", "m"))] == [96, 64, 48, 10]
    # Biases stay float (TensorRT dequantizes only int8); no float weight waits behind a QuantizeLinear.
    graph = onnx.load(str(dst)).graph
    float_inits = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    assert {"b", "g1b", "g2b"} <= float_inits and not {"w", "g1", "g2", "m"} & float_inits
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in float_inits]
    assert metrics["weights"] == {"int8": 4, "float_behind_qdq": 0} and "weight_storage" not in metrics
    # Activations: symmetric int8 (zero point 0), per tensor.
    act_zps = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_zero_point")]
    assert act_zps and all(zp.dtype == np.int8 and not zp.any() for zp in act_zps)
    assert dst.stat().st_size < 0.4 * src.stat().st_size
    assert evaluate(Metric("cosine"), _outputs(src, x), _outputs(dst, x), None)["cosine_min"] > 0.98


def test_float_weights_behind_qdq_are_counted_and_explained(tmp_path):
    src = dense_net(tmp_path / "dense.onnx")
    calibration, _ = _calibration(src)
    config = q.StaticInt8Config(extra_options={"AddQDQPairToWeight": True})
    metrics = q.quantize_static_int8(src, tmp_path / "q.onnx", calibration, config)
    assert metrics["weights"] == {"int8": 0, "float_behind_qdq": 4}
    assert metrics["weight_storage"] == q.WEIGHTS_BEHIND_QDQ


def test_dynamic_int8_and_fp16_load_and_stay_close_to_fp32(tmp_path):
    src = outlier_mlp(tmp_path / "mlp.onnx", layers=2)
    _, x = _calibration(src)
    dyn = q.quantize_dynamic_int8(src, tmp_path / "dyn.onnx")
    assert dyn["coverage"]["quantized_compute_ops"] == 2
    fp16 = tiny_cnn(tmp_path / "cnn.onnx")
    q.convert_fp16(fp16, tmp_path / "fp16.onnx")
    _, xc = _calibration(fp16)
    for ref, out in (
        (_outputs(src, x), _outputs(tmp_path / "dyn.onnx", x)),
        (_outputs(fp16, xc), _outputs(tmp_path / "fp16.onnx", xc)),
    ):
        assert evaluate(Metric("cosine"), ref, out, None)["cosine_min"] > 0.98


def test_zero_op_quantization_inside_if_is_never_labelled_int8(tmp_path):
    src = matmul_in_if(tmp_path / "if.onnx")
    plan = CandidatePlan("int8-dynamic", "int8-dynamic", lambda s, d: q.quantize_dynamic_int8(s, d))
    candidate = build_candidate(plan, src, tmp_path)
    assert (
        candidate.metrics["coverage"]["quantized_compute_ops"] == 0
        and candidate.metrics["coverage"]["compute_ops"] == 2
    )
    assert not candidate.usable and "0 compute ops" in candidate.error


def test_partial_coverage_is_recorded_as_mixed(tmp_path):
    src = tiny_cnn(tmp_path / "cnn.onnx")
    calibration, _ = _calibration(src)
    config = q.StaticInt8Config(nodes_to_exclude=["fc"])
    candidate = build_candidate(
        CandidatePlan("int8-x", "int8", lambda s, d: q.quantize_static_int8(s, d, calibration, config)), src, tmp_path
    )
    assert candidate.usable and candidate.precision == "mixed" and candidate.row()["quantized_fraction"] == 0.5
    assert "1 nodes float" in candidate.recipe


def test_auto_variants_and_dynamic_only_for_matmul_heavy_models(tmp_path):
    x86 = load_target("x86")
    quick = [c.describe() for c in static_variants(SearchConfig(), x86)]
    assert quick == [
        "QDQ U8S8 per-channel",
        "QDQ U8S8 per-channel reduce-range",
        "QOPERATOR U8S8 per-channel",
        "QOPERATOR U8S8 per-channel reduce-range",
    ]
    assert len(static_variants(SearchConfig(int8_search="full"), x86)) == 2 * 2 * 2 * 3
    forced = static_variants(SearchConfig(quantize="int8", calib_method="entropy", per_channel=False), x86)
    assert [c.describe() for c in forced] == ["QDQ U8S8 per-tensor entropy"]
    cnn, mlp = tiny_cnn(tmp_path / "cnn.onnx"), outlier_mlp(tmp_path / "mlp.onnx")
    assert matmul_heavy(mlp) and not matmul_heavy(cnn)
    calibration, _ = _calibration(cnn)
    assert "int8-dynamic" in [p.precision for p in plan_candidates(SearchConfig(), x86, calibration, mlp)]
    assert "int8-dynamic" not in [p.precision for p in plan_candidates(SearchConfig(), x86, calibration, cnn)]
    assert [p.precision for p in plan_candidates(SearchConfig(quantize="int8-dynamic"), x86, None, cnn)] == [
        "int8-dynamic"
    ]


def test_partial_quantization_keeps_the_outlier_nodes_float_until_the_budget_holds(tmp_path):
    src = outlier_mlp(tmp_path / "mlp.onnx")
    calibration, x = _calibration(src, 64)
    ref = _outputs(src, x)

    def validate(path):
        return evaluate(Metric("cosine"), ref, _outputs(path, x), None)

    full = tmp_path / "full.onnx"
    q.quantize_static_int8(src, full, calibration, q.StaticInt8Config())
    budget = 0.002
    assert validate(full)["drop"] > budget  # full INT8 breaks it
    prepared = tmp_path / "prepared.onnx"
    q.preprocess(src, prepared)
    ranking = rank_nodes(full, prepared, {"x": x[:16]}, tmp_path)
    assert ranking[0][0] == "fc2"  # the layer that needed the channels the outlier pushed out of range
    assert exclusion_order(ranking, prepared)[:2] == ["fc2", "fc1"]  # with the producer of its input
    result = partial_quantize(
        src, tmp_path / "mixed.onnx", calibration, q.StaticInt8Config(), validate, budget, {"x": x[:16]}
    )
    assert result is not None and result.validation["drop"] <= budget
    assert set(result.config.nodes_to_exclude) == {"fc1", "fc2"}
    assert result.metrics["coverage"]["quantized_compute_ops"] == 4 and result.metrics["partial"]["trials"]
    assert validate(tmp_path / "mixed.onnx")["drop"] <= budget
    # A budget nothing short of FP32 can meet: give up instead of shipping a mostly-float "INT8" model.
    assert (
        partial_quantize(src, tmp_path / "none.onnx", calibration, q.StaticInt8Config(), validate, 0.0, {"x": x[:16]})
        is None
    )


def test_partial_dynamic_quantization_keeps_the_layer_reading_the_outlier_float(tmp_path):
    src = outlier_mlp(tmp_path / "mlp.onnx")
    x = RNG.random((64, 16), dtype=np.float32)
    ref = _outputs(src, x)

    def validate(path):
        return evaluate(Metric("cosine"), ref, _outputs(path, x), None)

    full = tmp_path / "full.onnx"
    q.quantize_dynamic_int8(src, full)
    budget = 0.002
    assert validate(full)["drop"] > budget  # run-time per-tensor activation quantization loses the small channels
    result = partial_quantize_dynamic(
        src, tmp_path / "mixed.onnx", q.DynamicInt8Config(), validate, budget, {"x": x[:16]}
    )
    assert result is not None and result.validation["drop"] <= budget
    assert "fc2" in result.config.nodes_to_exclude and len(result.config.nodes_to_exclude) <= 2
    assert result.metrics["partial"]["ranking"][0]["node"] == "fc2"
    coverage = result.metrics["coverage"]
    assert 0 < coverage["quantized_compute_ops"] < coverage["compute_ops"]
    assert result.metrics["recipe"].startswith("dynamic S8 per-channel") and "nodes float" in result.metrics["recipe"]
    assert validate(tmp_path / "mixed.onnx")["drop"] <= budget


def test_forcing_int8_on_a_model_it_cannot_quantize_says_so_instead_of_blaming_the_budget(tmp_path):
    from click.testing import CliRunner

    from edgebuild.cli import main

    src = matmul_in_if(tmp_path / "if.onnx")
    _calibration(src)
    result = CliRunner().invoke(
        main,
        [
            "pack",
            str(src),
            "--quantize",
            "int8",
            "--calib-data",
            str(src.with_suffix(".npz")),
            "-o",
            str(tmp_path / "out"),
            "--bench-seconds",
            "0.05",
        ],
    )
    assert result.exit_code == 2, result.output  # the model cannot take the forced precision: bad input
    assert "no candidate could be built" in result.stderr and "quantized 0 compute ops" in result.stderr
    assert "try --quantize auto" in result.stderr and result.stderr.count("edgebuild: error:") == 1
    assert not (tmp_path / "out" / "if-x86").exists()


def test_quantization_preprocessing_leaves_no_file_in_the_working_directory(tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    def leaky(src, dst, **kwargs):  # what symbolic shape inference does on some models
        Path("sym_shape_infer_temp.onnx").write_bytes(b"")
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(shape_inference, "quant_pre_process", leaky)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    src = tiny_cnn(tmp_path / "cnn.onnx")
    assert q.preprocess(src, tmp_path / "prepared.onnx") == "symbolic"
    assert list(workdir.iterdir()) == [] and (tmp_path / "prepared.onnx").is_file()
