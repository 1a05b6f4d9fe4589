"""One error mechanism: each class carries its exit code; the CLI prints one line, or the traceback with --debug."""

import click
import pytest
from click.testing import CliRunner

from edgerun.cli import main
from edgerun.errors import BundleError, EdgerunError, RequestError, SessionError, report_errors


class QuotaError(EdgerunError):
    """A subclass added later chooses its own code; nothing else needs to know it."""

    exit_code = 7


def demo_cli(exc: Exception) -> click.Group:
    @click.group()
    @click.option("--debug", is_flag=True)
    def root(debug):
        pass

    @root.command()
    @report_errors("demo", (EdgerunError,))
    def fail():
        raise exc

    return root


@pytest.mark.parametrize(
    ("exc", "code"),
    [(QuotaError("over quota"), 7), (BundleError("bad bundle"), 2), (SessionError("no session"), 3)],
)
def test_an_error_exits_with_its_class_code_and_one_line(exc, code):
    result = CliRunner().invoke(demo_cli(exc), ["fail"])
    assert result.exit_code == code
    assert result.stderr == f"demo: error: {exc}\n"


def test_a_multi_line_message_is_still_one_line():
    result = CliRunner().invoke(demo_cli(RequestError("first\n  second")), ["fail"])
    assert result.exit_code == 1 and result.stderr == "demo: error: first second\n"


def test_an_unexpected_error_is_one_line_naming_its_type_and_the_debug_flag():
    result = CliRunner().invoke(demo_cli(ZeroDivisionError("division by zero\nmore")), ["fail"])
    assert result.exit_code == 1
    assert result.stderr == (
        "demo: error: unexpected ZeroDivisionError: division by zero (rerun with --debug for the traceback)\n"
    )


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(demo_cli(BundleError("bad bundle")), ["--debug", "fail"])
    assert isinstance(result.exception, BundleError) and result.exit_code != 2


def test_click_usage_errors_are_left_to_click():
    result = CliRunner().invoke(demo_cli(click.UsageError("give a BUNDLE")), ["fail"])
    assert result.exit_code == 2 and "Error: give a BUNDLE" in result.stderr and "demo: error" not in result.stderr


def test_edgerun_reports_a_missing_provider_as_session_error_exit_3(bundles, cache_dir):
    bundle, cache = str(bundles["classifier"]), str(cache_dir)
    result = CliRunner().invoke(
        main, ["verify", bundle, "--providers", "NoSuchExecutionProvider", "--cache-dir", cache]
    )
    assert result.exit_code == SessionError.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("edgerun: error: none of the providers ['NoSuchExecutionProvider']")
