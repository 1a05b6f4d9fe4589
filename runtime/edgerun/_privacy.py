"""ONNX Runtime's telemetry and pydantic's plugins off, before either library loads.

onnxruntime 1.29+ on Linux starts a telemetry uploader when the library is imported: it writes
a device-id file ``$TMPDIR/.ses`` (a timestamp and a UUID) at import and, within 90 s of a
session existing, sends DNS queries for its telemetry collector. An edge device on a private
network must make no connection its owner did not ask for. ``ORT_DISABLE_TELEMETRY=1`` is the
opt-out 1.32 honours (no file, no queries); ``ORT_TELEMETRY_DISABLED=1`` is the name newer
ONNX Runtime docs use (1.32 ignores it), so both are set. A value the user set is kept.

pydantic loads every plugin an installed package declares (the ``pydantic`` entry-point group) the
first time it builds a model, and hands each one every value it validates: a plugin such as an
observability exporter would see every manifest and request body and may send it on. Neither
package uses one, so ``PYDANTIC_DISABLE_PLUGINS=__all__`` is set (a value the user set is kept, so
``PYDANTIC_DISABLE_PLUGINS=`` turns them back on). That also skips the scan of every installed
package's entry points at start-up (measured: 9 ms with 213 distributions installed).

Imported first thing by the ``edgerun`` and ``edgebuild`` packages, so it runs before any
module of either can import onnxruntime, also when they are used as libraries.
"""

import os

TELEMETRY_OPT_OUT = ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED")


PLUGINS_OFF = ("PYDANTIC_DISABLE_PLUGINS", "__all__")


def disable_onnxruntime_telemetry() -> None:
    for name in TELEMETRY_OPT_OUT:
        os.environ.setdefault(name, "1")


def disable_pydantic_plugins() -> None:
    os.environ.setdefault(*PLUGINS_OFF)


disable_onnxruntime_telemetry()
disable_pydantic_plugins()
