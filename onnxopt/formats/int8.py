"""INT8: symmetric, zero point 0, codes in [-127, 127] (TensorRT's INT8 range; -128 unused); per-channel
weights, per-tensor static activations. Also "int8-sq": INT8 after SmoothQuant, a candidate of --auto."""
from dataclasses import replace

import numpy as np
from onnx import TensorProto

from .base import Format

INT8 = Format(
    name="int8", bits=8, qmax=127.0, qmin=-127.0, np_dtype=np.dtype(np.int8), onnx_type=TensorProto.INT8,
    description="INT8 W8A8", calib_method="mse", smoothquant=True, mode=True, auto=True, auto_default=True, planned=True,
    # SmoothQuant auto with the channel shift on MatMuls by default (BENCHMARKS.md "Uniform INT8 on ALBERT-style
    # sharing"): ALBERT stand-in 0.935 -> 0.991, MiniLM 0.988 -> 0.997; not on Conv (EfficientNet-Lite0 lost top-1
    # agreement with --smoothquant auto) nor Gemm (measured nowhere to help; EfficientNet's head: unchanged)
    smoothquant_default=("MatMul",), storage_names=("int8", "uint8"), engine_precisions=("Int8", "UInt8"))

# SmoothQuant, then INT8 W8A8 (onnxopt.autoquant.smooth): INT8's numbers and plan, its own --auto candidate.
INT8_SQ = replace(INT8, name="int8-sq", smoothquant_default=(), description="SmoothQuant then INT8 W8A8", mode=False, auto_default=False,
                  planned=False, base="int8", storage_names=(), engine_precisions=(),
                  auto_with_base=True)
