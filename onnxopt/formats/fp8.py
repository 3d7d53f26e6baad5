"""FP8 E4M3 (float8e4m3fn): symmetric, zero point 0, saturating at ±448; per-channel weights, per-tensor
static activations. SmoothQuant is opt-in at a given alpha (its auto search simulates INT8); on the terrain UNet
alpha 1.0 with the low-rank branch is what reaches 30 dB (BENCHMARKS.md "SmoothQuant for FP8")."""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from .base import Format

CHUNK = 1 << 20  # elements per thread task (a few MB of temporaries each)
_TO_FLOAT = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


@dataclass(frozen=True)
class FP8(Format):
    """E4M3 numerics: round-to-nearest-even by ml_dtypes, in threads; dequantization by table lookup."""

    def cast(self, x_over_scale: np.ndarray) -> np.ndarray:
        """Round to nearest even and saturate (QuantizeLinear's saturate=1 default). ml_dtypes converts one
        element at a time (~10 ns each: 30 s for SDXL's 2.6 B weights) but releases the GIL, so big tensors
        are cast in chunks on several threads; the result is the same array."""
        x = np.ascontiguousarray(x_over_scale).reshape(-1)
        out = np.empty(x.shape, dtype=self.np_dtype)
        qmax = self.qmax

        def part(i: int) -> None:
            out[i:i + CHUNK] = np.clip(x[i:i + CHUNK], -qmax, qmax).astype(self.np_dtype)
        starts = range(0, x.size, CHUNK)
        workers = min(len(starts), os.cpu_count() or 1, 8)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(part, starts))
        else:
            for i in starts:
                part(i)
        return out.reshape(np.shape(x_over_scale))

    def to_float(self, codes: np.ndarray) -> np.ndarray:
        """`codes.astype(float32)` by table lookup: the same values, without ml_dtypes' element loop."""
        return _TO_FLOAT[np.asarray(codes).view(np.uint8)]


_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
FP8_E4M3 = FP8(
    name="fp8", bits=8, qmax=_MAX, qmin=-_MAX, np_dtype=np.dtype(ml_dtypes.float8_e4m3fn),
    onnx_type=TensorProto.FLOAT8E4M3FN, description="FP8 E4M3 W8A8", calib_method="max", smoothquant=True, denoiser_recipe=True, mode=True, auto=True,
    auto_default=True, planned=True,
    storage_names=("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"),
    scale_names=("float32", "float16", "bfloat16"), engine_precisions=("FP8",))
