"""onnxopt: ONNX graph rewriting for TensorRT deployment."""
import logging as _logging

from .errors import OnnxoptError

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = ["OnnxoptError"]
