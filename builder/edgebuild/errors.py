"""One exception family for the builder; each class carries the CLI exit code it maps to.

The command line reports these, and the runtime's own errors (a bundle that fails its checks
is a ``BundleError``, exit 2, on both sides), through the runtime's one error decorator.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edgerun.errors import EdgerunError, first_line, report_errors

__all__ = ["AccuracyBudgetError", "EdgebuildError", "UsageError", "first_line", "handle_cli_errors"]


class EdgebuildError(Exception):
    """Base class of every error the builder reports to a user.

    Exit codes are the documented ones only: 2 (this class and :class:`UsageError`: the model, the
    data or the options cannot make a bundle; nothing written), 3 (:class:`AccuracyBudgetError`) and
    1 (``edgebuild.golden.ServeCheckError``: edgerun on this host would refuse the bundle). An
    exception outside this family is a bug and exits 1 with ``unexpected`` in its line.
    """

    exit_code: ClassVar[int] = 2


class UsageError(EdgebuildError):
    """Bad usage or input: a clear message, nothing written (exit code 2)."""

    exit_code = 2


class AccuracyBudgetError(EdgebuildError):
    """The packed model left the accuracy budget; a report was written, no bundle (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, report_path: Path | None = None):
        super().__init__(message)
        self.report_path = report_path


# Click command decorator for every `edgebuild` command: one line `edgebuild: error: ...` and the
# error's exit code, a traceback only with `edgebuild --debug`.
handle_cli_errors = report_errors("edgebuild", (EdgebuildError, EdgerunError))
