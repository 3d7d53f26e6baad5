"""BF16: FP32's range at 8 bits of mantissa, for everything not quantized (cast, not scaled)."""
import ml_dtypes
import numpy as np
from onnx import TensorProto

from .base import Format

_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
BF16 = Format(
    name="bf16", bits=16, qmax=_MAX, qmin=-_MAX, np_dtype=np.dtype(ml_dtypes.bfloat16), onnx_type=TensorProto.BFLOAT16,
    description="BF16", quantized=False, weights="none", activations="none", calib_method="", bias_correction=False,
    engine_precisions=("BFloat16",),
    min_opset=22,  # Conv, ConvTranspose and pooling take bfloat16 only from opset 22
    extra={"unit": 2.0 ** -8})  # unit roundoff
