"""W8A16: INT8 weight-only. Symmetric INT8 codes in [-127, 127], one scale per output channel, behind a
DequantizeLinear (no block_size: per-axis, opset 13+; FP16 scales need 19); activations stay in high precision.

TensorRT documents weight-only quantization of MatMul/Gemm for INT4 and INT8; TensorRT-RTX 1.7.1 fuses the
per-channel INT8 DequantizeLinear into the GEMM (one `CastMulCastFc` kernel with an Int8 weight constant and
Half activations, at compute capability 8.9 and 12.0; BENCHMARKS.md "W8A16"). A blocked INT8 weight does not
fuse there (a dequantize kernel of its own, then an FP16 GEMM), so this format is per-channel only.
The numbers are INT8's (`formats.int8`); only the placement (MatMul/Gemm weights, no activation Q/DQ) differs."""
from dataclasses import replace

from .int8 import INT8

W8A16 = replace(
    INT8, name="w8a16", description="INT8 per-channel weight-only (W8A16)", activations="none", calib_method="",
    smoothquant=False, smoothquant_default=(), bias_correction=False, mode=True, auto=True, auto_default=False, planned=False,
    activation_bits=16.0, storage_names=("int8",), engine_precisions=("Int8",))
