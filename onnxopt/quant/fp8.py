"""FP8 E4M3 (float8e4m3fn): symmetric, zero point 0, saturating at ±448."""
import ml_dtypes
import numpy as np
from onnx import TensorProto

QMAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
ONNX_TYPE = TensorProto.FLOAT8E4M3FN
NP_TYPE = np.dtype(ml_dtypes.float8_e4m3fn)


def cast(x_over_scale: np.ndarray) -> np.ndarray:
    """Round to nearest even and saturate (QuantizeLinear's saturate=1 default)."""
    return np.clip(x_over_scale, -QMAX, QMAX).astype(ml_dtypes.float8_e4m3fn)


def zero_point(shape=()) -> np.ndarray:
    return np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn)
