"""edgebuild: the host-side builder. Turns a trained model into a validated ONNX bundle for a target."""

__version__ = "0.1.0"
