"""One exception family for the runtime, and the one way both command lines report errors.

Each class carries what it means at each boundary: ``exit_code`` for the command line and
``http_status`` for the server, so neither guesses from a class name. ``report_errors`` is the
click decorator both CLIs use (the builder imports it): any error of the given families
becomes one line ``<prog>: error: ...`` and its class's exit code; anything else is a bug and
says so in one line (exit 1); ``--debug`` on the root command shows the traceback instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class EdgerunError(Exception):
    """Base class of every error the runtime reports to a user (exit code 1, HTTP 500)."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500


class BundleError(EdgerunError):
    """The bundle is missing, malformed, tampered with or not trusted (exit code 2, HTTP 400)."""

    exit_code = 2
    http_status = 400


class RequestError(EdgerunError):
    """An inference request does not match the model (HTTP 400)."""

    http_status = 400


class RequestTimeoutError(RequestError):
    """The client did not send its body in time (HTTP 408)."""

    http_status = 408


class UnsupportedMediaTypeError(RequestError):
    """The body's Content-Type is not one the route reads (HTTP 415)."""

    http_status = 415


class ForbiddenError(RequestError):
    """The request is understood and refused by a rule (HTTP 403); the message names the rule."""

    http_status = 403


class SessionError(EdgerunError):
    """No variant/provider produced a working, golden-checked session (exit code 3, HTTP 503)."""

    exit_code = 3
    http_status = 503


class ModelNotFoundError(EdgerunError):
    """The request names a model this server does not serve (HTTP 404)."""

    http_status = 404


class UnauthorizedError(EdgerunError):
    """Missing or wrong bearer token (HTTP 401)."""

    http_status = 401


class PayloadTooLargeError(EdgerunError):
    """The request body is over the configured limit (HTTP 413)."""

    http_status = 413


class OverloadedError(EdgerunError):
    """The inference queue is full or the server is draining (HTTP 503 + Retry-After)."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceTimeoutError(EdgerunError):
    """A request waited longer than its timeout for an inference slot (HTTP 504)."""

    http_status = 504


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, for library errors whose messages span pages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def one_line(exc: BaseException) -> str:
    """Our own message on one line: a stray newline must not split the ``prog: error:`` line."""
    return " ".join(str(exc).split()) or type(exc).__name__


class DebugAnywhereGroup(click.Group):
    """A command group whose ``--debug`` may also follow the subcommand (``edgebuild pack ... --debug``):
    it is moved in front of the subcommand, where the group's own option reads it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        stop = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:stop]:
            args = ["--debug", *(a for i, a in enumerate(args) if not (i < stop and a == "--debug"))]
        return super().parse_args(ctx, args)


def report_errors(prog: str, families: tuple[type[Exception], ...]) -> Callable[[F], F]:
    """Click command decorator: errors of ``families`` become one line and their ``exit_code``.

    Any other exception is reported as unexpected (one line, exit 1, a hint to rerun with
    ``--debug``). click's own exceptions pass through: click reports usage errors itself.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except Exception as exc:
                if click.get_current_context().find_root().params.get("debug"):
                    raise
                if isinstance(exc, families):
                    click.echo(f"{prog}: error: {one_line(exc)}", err=True)
                    raise click.exceptions.Exit(getattr(exc, "exit_code", 1)) from None
                click.echo(
                    f"{prog}: error: unexpected {first_line(exc)} (rerun with --debug for the traceback)", err=True
                )
                raise click.exceptions.Exit(1) from None

        return wrapper  # type: ignore[return-value]

    return decorate
