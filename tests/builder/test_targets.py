"""Target profiles are validated data: every built-in loads, every bad file is a UsageError."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebuild.errors import UsageError
from edgebuild.targets import TargetProfile, builtin_target_names, load_target

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
name = "board"
description = "a test board"
device = "cpu"
opset = 17
precisions = ["fp32", "int8"]

[[providers]]
name = "CPUExecutionProvider"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "board.toml"
    path.write_text(text)
    return str(path)


def test_builtin_names_match_the_targets_folder():
    on_disk = sorted(p.stem for p in (REPO / "targets").glob("*.toml"))
    assert builtin_target_names() == on_disk
    assert {"x86", "jetson", "arm64"} <= set(on_disk)


@pytest.mark.parametrize("name", builtin_target_names())
def test_every_builtin_profile_loads(name):
    target = load_target(name)
    assert isinstance(target, TargetProfile)
    assert target.name == name
    # Every target must be able to run on the CPU when nothing better is present.
    assert target.providers[-1].name == "CPUExecutionProvider"
    assert target.opset >= 13
    assert target.container is not None
    assert (REPO / target.container.dockerfile).is_file()


def test_jetson_profile_is_tensorrt_first_with_symmetric_int8():
    target = load_target("jetson")
    assert [p.name for p in target.providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert target.device == "gpu"
    assert target.opset == 17
    assert {"fp16", "int8"} <= set(target.precisions)
    q = target.quantization
    assert (q.format, q.activation_type, q.weight_type) == ("qdq", "int8", "int8")
    assert q.activation_symmetric and q.weight_symmetric and q.per_channel and not q.reduce_range
    assert target.notes["quantize_extra_options"]["DedicatedQDQPair"] is True
    assert target.container.runtime == "nvidia"
    assert target.container.platform == "linux/arm64"
    assert "l4t-jetpack" in target.container.base_image


def test_jetson_int8_flag_is_set_only_for_int8_models():
    target = load_target("jetson")
    trt = {p.name: p for p in target.providers_for("fp32")}["TensorrtExecutionProvider"]
    assert trt.options["trt_int8_enable"] is False
    assert trt.options["trt_fp16_enable"] is False
    fp16 = target.providers_for("fp16")[0].options
    assert fp16["trt_fp16_enable"] is True and fp16["trt_int8_enable"] is False
    int8 = target.providers_for("int8")[0].options
    assert int8["trt_int8_enable"] is True
    for key in (
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_max_workspace_size",
    ):
        assert key in int8, key
    # The merged lists carry plain options only (that is what the manifest holds).
    assert all(not p.precision_options for p in target.providers_for("int8"))
    cuda = target.providers_for("fp16")[1].options
    assert cuda["device_id"] == 0 and "arena_extend_strategy" in cuda


def test_arm64_profile_uses_signed_int8_activations():
    target = load_target("arm64")
    assert [p.name for p in target.providers] == ["CPUExecutionProvider"]
    q = target.quantization
    assert (q.activation_type, q.weight_type, q.reduce_range) == ("int8", "int8", False)
    assert target.container.platform == "linux/arm64"


def test_a_user_profile_file_loads(tmp_path):
    target = load_target(write(tmp_path, MINIMAL))
    assert target.name == "board"
    assert target.providers_for("int8")[0].options == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('colour = "red"\n' + MINIMAL, "colour"),
        (MINIMAL + "devcie_id = 0\n", "providers.0.devcie_id"),
        (MINIMAL + '\n[quantization]\nactivation_kind = "int8"\n', "quantization.activation_kind"),
        (
            MINIMAL + '\n[container]\ndockerfile = "D"\nbase_image = "b"\nplatfrom = "linux/arm64"\n',
            "container.platfrom",
        ),
    ],
)
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(UsageError, match=rf"'{key}': unknown key"):
        load_target(write(tmp_path, text))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('device = "cpu"', 'device = "tpu"', "device"),
        ("opset = 17", "opset = 11", "opset"),
        ('precisions = ["fp32", "int8"]', 'precisions = ["int4"]', "precisions.0"),
        ('precisions = ["fp32", "int8"]', "precisions = []", "precisions"),
    ],
)
def test_bad_value_is_named_with_what_was_seen(tmp_path, old, new, key):
    with pytest.raises(UsageError, match=rf"'{key}':.*got") as info:
        load_target(write(tmp_path, MINIMAL.replace(old, new)))
    assert "board.toml" in str(info.value)


def test_bad_quantization_value_is_named(tmp_path):
    text = MINIMAL + '\n[quantization]\nactivation_type = "int4"\n'
    with pytest.raises(UsageError, match=r"'quantization.activation_type':.*'int4'"):
        load_target(write(tmp_path, text))


def test_precision_options_for_an_unlisted_precision_is_refused(tmp_path):
    text = MINIMAL + "\n[providers.precision_options.fp16]\nx = 1\n"
    with pytest.raises(UsageError, match=r"precision_options for 'fp16'.*not in precisions"):
        load_target(write(tmp_path, text))


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"'opset': Field required"):
        load_target(write(tmp_path, MINIMAL.replace("opset = 17\n", "")))


def test_bad_toml_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"not valid TOML"):
        load_target(write(tmp_path, MINIMAL + "\n[[providers]\n"))


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"does not exist"):
        load_target(str(tmp_path / "nope.toml"))


def test_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown target 'tpu'.*arm64.*jetson.*x86"):
        load_target("tpu")


def test_pack_with_a_bad_profile_file_exits_2_with_one_line_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from edgebuild.cli import main

    profile = write(tmp_path, MINIMAL.replace("opset = 17", "opset = 11"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["pack", "tinymodels:tiny_cnn", "--target", profile, "-o", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("edgebuild: error: ") and "'opset'" in line and "board.toml" in line
    assert not out.exists()


def test_short_provider_names_become_the_runtimes_names(tmp_path):
    text = MINIMAL.replace('name = "CPUExecutionProvider"', 'name = "cuda"') + '\n[[providers]]\nname = "cpu"\n'
    target = load_target(write(tmp_path, text))
    assert [p.name for p in target.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_session_section_is_the_manifest_schema_with_unknown_keys_refused(tmp_path):
    from edgerun.manifest import SessionOptionsSpec

    text = MINIMAL + '\n[session]\ngraph_optimization_level = "basic"\n'
    session = load_target(write(tmp_path, text)).session
    assert isinstance(session, SessionOptionsSpec) and session.graph_optimization_level == "basic"
    with pytest.raises(UsageError, match=r"'session.graph_optimisation_level': unknown key"):
        load_target(write(tmp_path, MINIMAL + '\n[session]\ngraph_optimisation_level = "basic"\n'))
