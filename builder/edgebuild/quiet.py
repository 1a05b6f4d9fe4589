"""Library chatter captured and summarised instead of dumped on the user.

ONNX Runtime's calibrators print progress to stdout (where ``pack`` prints only the bundle
path), its quantization tools log a warning per tensor they skip through Python's root logger
(with the tensor's type as a multi-line protobuf dump), torch's exporter logs symbolic-shape
notes, onnxconverter-common warns once per truncated fp16 weight, and ORT's C++ logger reports
graph clean-ups at WARNING. None of it needs the user's attention line by line: the count and
the first message are kept, recorded and shown in one line.

Captures nest: a record goes to the innermost one (the candidate being built); what is said
outside every per-step capture goes to the command's own (see :func:`library_log_lines`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

# onnxruntime's default logger severity (WARNING); there is no getter to save and restore it.
_ORT_DEFAULT_SEVERITY = 2
_ORT_ERROR = 3
# Our own loggers (edgebuild.*) still speak; everything else is a library.
_OWN = ("edgebuild", "edgerun")


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


def _first_line(text: str) -> str:
    # A protobuf dump follows the message on the next lines; the first line names the tensor.
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].rstrip(" {") if lines else ""


_active: list[Captured] = []
_ort_quieted = 0  # how many captures hold ORT's C++ logger at ERROR


def _is_library(record: logging.LogRecord) -> bool:
    return not record.name.startswith(_OWN)


class _Collector(logging.Handler):
    """Root-logger handler that hands library records to the innermost capture."""

    def emit(self, record: logging.LogRecord) -> None:
        if _active and _is_library(record) and record.levelno >= logging.WARNING:
            _active[-1].messages.append(f"{record.levelname}: {_first_line(record.getMessage())}")


class _HideLibraries(logging.Filter):
    """On the root logger's other handlers while capturing: library records are not printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        # ``--debug`` (a DEBUG root logger) shows everything, as the libraries said it.
        debugging = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        return debugging or not (_active and _is_library(record))


_COLLECTOR = _Collector()
_HIDE = _HideLibraries()


@contextlib.contextmanager
def _logging_captured(captured: Captured) -> Iterator[None]:
    root = logging.getLogger()
    outermost = not _active
    if outermost:
        root.addHandler(_COLLECTOR)
        for handler in root.handlers:
            if handler is not _COLLECTOR:
                handler.addFilter(_HIDE)
    _active.append(captured)
    try:
        yield
    finally:
        _active.pop()
        if outermost:
            root.removeHandler(_COLLECTOR)
            for handler in root.handlers:
                handler.removeFilter(_HIDE)


@contextlib.contextmanager
def captured_library_output() -> Iterator[Captured]:
    """Collect Python warnings, library log records and stdout prints of the libraries called
    inside; quiet ORT's C++ logger to errors (its warnings cannot be collected from Python)."""
    import onnxruntime as ort

    global _ort_quieted
    captured = Captured()
    stdout = io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(stdout),
        _logging_captured(captured),
    ):
        warnings.simplefilter("always")
        ort.set_default_logger_severity(_ORT_ERROR)
        _ort_quieted += 1
        try:
            yield captured
        finally:
            _ort_quieted -= 1
            if not _ort_quieted:  # an enclosing capture keeps ORT quiet until it ends
                ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
            captured.messages.extend(f"{w.category.__name__}: {_first_line(str(w.message))}" for w in caught)
            captured.messages.extend(line.strip() for line in stdout.getvalue().splitlines() if line.strip())


@contextlib.contextmanager
def library_log_lines() -> Iterator[Captured]:
    """For a whole command: library log records said outside any per-step capture (export,
    validation, the serve check) are collected here instead of printed; the command shows them as
    one line at the end. Python warnings and stdout are left alone (the steps capture their own)."""
    captured = Captured()
    with _logging_captured(captured):
        yield captured
