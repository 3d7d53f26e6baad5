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

CHUNK = 1 << 20  # elements per thread task
BLOCK = 1 << 16  # elements per vectorized step (at most 1 << 16): its int32 buffers stay in L2 (the passes are
# bound by cache bandwidth; smaller blocks pay numpy's per-call overhead)
_TO_FLOAT = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_E4M3_MAX = float(ml_dtypes.finfo(_E4M3).max)
_INF_BITS = 0x7F800000
# The rounding is one float add: C = 2^(E+20) * (1 + m / 2^23) for |x| in [2^E, 2^(E+1)) (E clamped to >= -6:
# E4M3's subnormals share 2^-6's step) has float32's step 2^(E-3), E4M3's step at |x|, so |x| + C rounds |x| half to
# even (m is even) onto E4M3's grid, the carry into the next binade included, and bits(|x| + C) = bits(C) + k with k
# = |x| / 2^(E-3) rounded (k <= 16: same binade). m = 152 + (bits(2^(E+20)) >> 20) = 8E + 1328 is 8E + 48 mod 256,
# so the sum's low byte is the code but its sign: exponent field E + 7, mantissa k - 8 (8 is the implicit bit).
_MAGIC = (20 << 23) + 152
_QMAX = np.full(BLOCK, _E4M3_MAX, np.float32)
_MIN_NORMAL = np.full(BLOCK, 2.0 ** -6, np.float32)


def e4m3_codes(x: np.ndarray, out: np.ndarray) -> None:
    """float32 -> E4M3FN codes (uint8) in `out`: exactly `np.clip(x, -448, 448).astype(float8_e4m3fn)` (round
    half to even, saturating, NaN to 0x7F with its sign), in a dozen in-place ufunc passes per BLOCK instead of
    ml_dtypes' per-element conversion (about 2x less CPU: BENCHMARKS.md). Both 1-D and contiguous."""
    n = min(BLOCK, x.size)
    f, c, d = (np.empty(n, np.int32) for _ in range(3))
    neg = np.empty(n, np.bool_)
    for i in range(0, x.size, BLOCK):
        xb, o = x[i:i + BLOCK], out[i:i + BLOCK]
        if xb.size != f.size:  # the last block
            f, c, d, neg = f[:xb.size], c[:xb.size], d[:xb.size], neg[:xb.size]
        ff, cf = f.view(np.float32), c.view(np.float32)
        np.bitwise_and(xb.view(np.int32), 0x7FFFFFFF, out=f)      # |x|
        if f.max() > _INF_BITS:                                    # NaN: rare, left to ml_dtypes
            o[:] = np.clip(xb, -_E4M3_MAX, _E4M3_MAX).astype(_E4M3).view(np.uint8)
            continue
        np.minimum(ff, _QMAX[:f.size], out=ff)                     # saturate (inf too)
        np.maximum(ff, _MIN_NORMAL[:f.size], out=cf)               # E >= -6
        np.bitwise_and(c, _INF_BITS, out=c)                        # 2^E
        np.add(c, _MAGIC, out=c)
        np.right_shift(c, 20, out=d)                               # 8E + 1176, added into the low byte
        np.add(c, d, out=c)
        np.add(ff, cf, out=ff)                                     # the rounding
        np.copyto(o, f, casting="unsafe")                          # the low byte: the code, but its sign
        np.signbit(xb, out=neg)
        u = neg.view(np.uint8)
        np.multiply(u, 0x80, out=u)
        np.bitwise_or(o, u, out=o)


@dataclass(frozen=True)
class FP8(Format):
    """E4M3 numerics: round-to-nearest-even by numpy ufuncs (float32 input) or ml_dtypes, in threads;
    dequantization by table lookup."""

    def cast(self, x_over_scale: np.ndarray) -> np.ndarray:
        """Round to nearest even and saturate (QuantizeLinear's saturate=1 default). float32 input by
        e4m3_codes; any other by ml_dtypes, which converts one element at a time (~10 ns each; float64 through
        float32 would round twice). Big tensors are cast in chunks on several threads (both release the GIL
        inside each numpy call); the result is the same array."""
        x = np.ascontiguousarray(x_over_scale).reshape(-1)
        out = np.empty(x.shape, dtype=self.np_dtype)
        qmax = self.qmax
        fast = x.dtype == np.float32 and self.np_dtype == _E4M3 and qmax == _E4M3_MAX

        def part(i: int) -> None:
            if fast:
                e4m3_codes(x[i:i + CHUNK], out[i:i + CHUNK].view(np.uint8))
            else:
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


FP8_E4M3 = FP8(
    name="fp8", bits=8, qmax=_E4M3_MAX, qmin=-_E4M3_MAX, np_dtype=np.dtype(ml_dtypes.float8_e4m3fn),
    onnx_type=TensorProto.FLOAT8E4M3FN, description="FP8 E4M3 W8A8", calib_method="max", smoothquant=True, denoiser_recipe=True, mode=True, auto=True,
    auto_default=True, planned=True,
    storage_names=("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"),
    scale_names=("float32", "float16", "bfloat16"), engine_precisions=("FP8",))
