"""edgerun: the on-device runtime. Loads a verified bundle and serves it; never imports torch."""

# First: ONNX Runtime's telemetry opt-out must be in the environment before onnxruntime loads.
from edgerun import _privacy  # noqa: F401

__version__ = "0.1.0"
