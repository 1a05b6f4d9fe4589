"""ONNX Runtime's telemetry off, before ONNX Runtime loads.

onnxruntime 1.29+ on Linux starts a telemetry uploader when the library is imported: it writes
a device-id file ``$TMPDIR/.ses`` (a timestamp and a UUID) at import and, within 90 s of a
session existing, sends DNS queries for its telemetry collector. An edge device on a private
network must make no connection its owner did not ask for. ``ORT_DISABLE_TELEMETRY=1`` is the
opt-out 1.32 honours (no file, no queries); ``ORT_TELEMETRY_DISABLED=1`` is the name newer
ONNX Runtime docs use (1.32 ignores it), so both are set. A value the user set is kept.

Imported first thing by the ``edgerun`` and ``edgebuild`` packages, so it runs before any
module of either can import onnxruntime, also when they are used as libraries.
"""

import os

TELEMETRY_OPT_OUT = ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED")


def disable_onnxruntime_telemetry() -> None:
    for name in TELEMETRY_OPT_OUT:
        os.environ.setdefault(name, "1")


disable_onnxruntime_telemetry()
