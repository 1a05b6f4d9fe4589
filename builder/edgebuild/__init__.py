"""edgebuild: the host-side builder. Turns a trained model into a validated ONNX bundle for a target."""

# First: ONNX Runtime's telemetry opt-out must be in the environment before onnxruntime loads.
from edgerun import _privacy  # noqa: F401

__version__ = "0.1.0"
