"""onnxopt: ONNX graph rewriting for TensorRT deployment."""
import logging as _logging

from onnx_graphsurgeon.logger import G_LOGGER as _GS_LOGGER

from . import presets  # noqa: F401  (onnxopt.presets.recipe, as the README shows)
from .compare import compare
from .errors import OnnxoptError
from .passes import AWQ, QDQ, Autocast, Int4, SmoothQuant, Sparsify
from .pipeline import Recipe, Result, Runner, run
from .api import QuantConfig, QuantResult, convert, quantize, sparsify_model

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
_GS_LOGGER.severity = _GS_LOGGER.ERROR  # its INFO/WARNING chatter is not for our users

__all__ = ["OnnxoptError", "run", "Runner", "Recipe", "Result", "Sparsify", "SmoothQuant", "AWQ", "QDQ", "Int4",
           "Autocast", "QuantConfig", "QuantResult", "quantize", "convert", "sparsify_model", "compare"]
