"""FP16: the default high precision of everything not quantized (cast, not scaled)."""
import numpy as np
from onnx import TensorProto

from .base import Format

FP16 = Format(
    name="fp16", bits=16, qmax=float(np.finfo(np.float16).max), qmin=-float(np.finfo(np.float16).max),
    np_dtype=np.dtype(np.float16), onnx_type=TensorProto.FLOAT16, description="FP16", quantized=False,
    weights="none", activations="none", calib_method="", bias_correction=False, engine_precisions=("Half",),
    min_opset=0, extra={"unit": 2.0 ** -11})  # unit roundoff
