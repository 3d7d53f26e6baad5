"""INT8: symmetric, zero point 0, values in [-127, 127] (TensorRT's INT8 range)."""
import numpy as np
from onnx import TensorProto

QMAX = 127.0
ONNX_TYPE = TensorProto.INT8
NP_TYPE = np.dtype(np.int8)


def cast(x_over_scale: np.ndarray) -> np.ndarray:
    """Round half to even and saturate, as QuantizeLinear does."""
    return np.clip(np.rint(x_over_scale), -QMAX, QMAX).astype(np.int8)


def to_float(q: np.ndarray) -> np.ndarray:
    return np.asarray(q).astype(np.float32)


def zero_point(shape=()) -> np.ndarray:
    return np.zeros(shape, dtype=np.int8)
