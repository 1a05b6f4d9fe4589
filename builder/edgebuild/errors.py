"""One exception family for the builder; each carries the CLI exit code it maps to."""


class EdgebuildError(Exception):
    """Base class of every error the builder reports to a user (exit code 1)."""

    exit_code = 1


class UsageError(EdgebuildError):
    """Bad usage or input: a clear message, nothing written (exit code 2)."""

    exit_code = 2


class AccuracyBudgetError(EdgebuildError):
    """The packed model left the accuracy budget; a report was written, no bundle (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, report_path=None):
        super().__init__(message)
        self.report_path = report_path


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` for one-line error messages (many library errors span pages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def handle_cli_errors(fn):
    """Click command decorator: our errors become one line on stderr and their exit code.

    ``--debug`` on the root command shows the traceback instead.
    """
    import functools
    import sys

    import click

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgebuildError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"edgebuild: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper
