"""Library chatter captured and summarised instead of dumped on the user.

ONNX Runtime's calibrators print progress to stdout (where ``pack`` prints only the bundle
path), onnxconverter-common warns once per truncated fp16 weight, and ORT's C++ logger
reports graph clean-ups at WARNING. None of it needs the user's attention line by line: the
count and the first message are kept, recorded and shown in one line.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

# onnxruntime's default logger severity (WARNING); there is no getter to save and restore it.
_ORT_DEFAULT_SEVERITY = 2
_ORT_ERROR = 3


@dataclass
class Captured:
    """What the libraries said while a step ran."""

    messages: list[str] = field(default_factory=list)

    def summary(self) -> dict | None:
        if not self.messages:
            return None
        return {"count": len(self.messages), "first": self.messages[0][:200]}

    def line(self, what: str) -> str | None:
        """One progress line, or None when nothing was said."""
        if not self.messages:
            return None
        return f"{what}: {len(self.messages)} library message(s) captured (first: {self.messages[0][:160]})"


@contextlib.contextmanager
def captured_library_output() -> Iterator[Captured]:
    """Collect Python warnings and stdout prints of the libraries called inside; quiet ORT's
    C++ logger to errors (its warnings cannot be collected from Python)."""
    import onnxruntime as ort

    captured = Captured()
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        ort.set_default_logger_severity(_ORT_ERROR)
        try:
            yield captured
        finally:
            ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
            captured.messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
            captured.messages.extend(line.strip() for line in stdout.getvalue().splitlines() if line.strip())
