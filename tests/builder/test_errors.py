"""The builder reports its own errors and the runtime's through the same one-line mechanism."""

from click.testing import CliRunner

from edgebuild.cli import main


def test_a_runtime_bundle_error_in_a_builder_command_is_one_edgebuild_line_exit_2(tmp_path):
    (tmp_path / "manifest.json").write_text("{ not json")
    result = CliRunner().invoke(main, ["bench", str(tmp_path)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("edgebuild: error: ") and "not valid JSON" in line


def test_a_builder_usage_error_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    from edgebuild.errors import UsageError

    args = ["inspect", str(tmp_path / "missing.onnx")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("edgebuild: error: ") and "does not exist" in line
    debug = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(debug.exception, UsageError)
