"""Peak resident memory of a step of the build (Linux: the kernel's high-water mark, reset first).

Calibration is the builder's memory-hungry step: ONNX Runtime's histogram calibrators hold every
intermediate output of a collection call. Each static INT8 candidate records the peak it reached.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _high_water_kib() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Started on creation: ``read()`` gives the peak RSS since then (``scope: "step"``) where the
    kernel lets the high-water mark be reset, else the process's lifetime peak (``scope: "process"``)."""

    def __init__(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            self.scope = "step" if _high_water_kib() is not None else "process"
        except OSError:
            self.scope = "process"

    def read(self) -> dict:
        kib = _high_water_kib() if self.scope == "step" else None
        if kib is None:
            usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kib = usage // 1024 if sys.platform == "darwin" else usage  # bytes on macOS, KiB on Linux
        return {"peak_rss_mb": round(kib / 1024, 1), "peak_rss_scope": self.scope}
