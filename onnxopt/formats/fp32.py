"""FP32: the reference precision (`--high-precision fp32` leaves everything in it)."""
import numpy as np
from onnx import TensorProto

from .base import Format

_MAX = float(np.finfo(np.float32).max)
FP32 = Format(
    name="fp32", bits=32, qmax=_MAX, qmin=-_MAX, np_dtype=np.dtype(np.float32), onnx_type=TensorProto.FLOAT,
    description="FP32", quantized=False, weights="none", activations="none", calib_method="", bias_correction=False,
    engine_precisions=("Float",), min_opset=0, extra={"unit": 2.0 ** -24})
