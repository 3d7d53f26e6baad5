"""INT4 weight-only: symmetric codes in [-8, 7], one scale per block of `block_size` along K (the reduction
axis) per output column, stored packed (onnx INT4) behind a blocked DequantizeLinear (opset 21); activations
stay in high precision (W4A16). Weights are handled in the [K, N] layout (K first)."""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .base import Format, round_scale


def blocks_of(k: int, block_size: int) -> int:
    """Rows per block along K (block_size 0: one block of all K)."""
    return block_size if block_size > 0 else k


def expand(scale: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Per-block scales [ceil(K/B), N] repeated to one per row [K, N]."""
    return np.repeat(scale, blocks_of(k, block_size), axis=0)[:k]


@dataclass(frozen=True)
class Int4(Format):
    """Blockwise numerics in [K, N]."""

    def block_scales(self, w_kn: np.ndarray, block_size: int, clip=None, high_precision: str = "fp32") -> np.ndarray:
        """Per (block along K, output column) scale [ceil(K/B), N]: max|W| in the block (times its clip ratio) / qmax."""
        k, n = w_kn.shape
        b = blocks_of(k, block_size)
        nb = -(-k // b)
        a = np.abs(w_kn)
        if nb * b != k:
            a = np.concatenate([a, np.zeros((nb * b - k, n), a.dtype)])
        amax = a.reshape(nb, b, n).max(axis=1)
        if clip is not None:
            amax = amax * clip
        return round_scale(np.where(amax > 0, amax / self.qmax, 1.0), high_precision)

    def block_candidates(self, w_kn: np.ndarray, rows: slice, ratios, high_precision: str = "fp32",
                         block_size: int = 0, tensor_amax=None) -> np.ndarray:
        """Quantize-dequantize of the block of rows `rows` of w [K, N] at every clip ratio: [R, B, N] (AWQ's clip search)."""
        wb = w_kn[rows]
        amax = np.abs(wb).max(axis=0)
        r = np.asarray(ratios, np.float32)[:, None]
        scale = round_scale(np.where(amax > 0, amax * r / self.qmax, 1.0), high_precision)[:, None, :]
        return np.clip(np.rint(wb[None] / scale), self.qmin, self.qmax) * scale

    def quantize_weight(self, w, axis=1, high_precision="fp32", *, block_size=None, clip=None):
        """(codes as int8, scales) of 2-D `w` whose output channels run along `axis`: 1 for [K, N] (codes [K, N],
        scales [ceil(K/B), N]), 0 for [N, K] as a Gemm with transB stores it (both transposed). Blocks run along
        K; `clip` holds per-block clip ratios in the [ceil(K/B), N] layout (or one ratio)."""
        block_size = self.block_size if block_size is None else block_size
        if axis % 2 == 0:
            q, scale = self.quantize_weight(w.T, 1, high_precision, block_size=block_size, clip=clip)
            return q.T, scale.T
        scale = self.block_scales(w, block_size, clip, high_precision)
        return self.cast(w / expand(scale, w.shape[0], block_size)), scale

    def dequantize(self, codes, scales, axis=1, *, block_size=None):
        """float32 weights from codes and block scales in the layout `quantize_weight` gave for `axis`."""
        block_size = self.block_size if block_size is None else block_size
        if axis % 2 == 0:
            return self.dequantize(codes.T, scales.T, 1, block_size=block_size).T
        return codes.astype(np.float32) * expand(scales, codes.shape[0], block_size)

    def fake_quant(self, w, axis=1, high_precision="fp32", *, block_size=None, clip=None):
        """Quantize-dequantize (what the DequantizeLinear will give back), in w's layout."""
        q, s = self.quantize_weight(w, axis, high_precision, block_size=block_size, clip=clip)
        return self.dequantize(q, s, axis, block_size=block_size)

    def weight_constant(self, name: str, codes: np.ndarray) -> gs.Constant:
        """Packed INT4 initializer (onnx-graphsurgeon cannot serialize ml_dtypes.int4 arrays itself)."""
        from .. import modelfile  # packed, and spilled inside a quantize run (not held until the save)
        return modelfile.constant(name, np.asarray(codes).astype(ml_dtypes.int4))


INT4 = Int4(
    name="int4", bits=4, qmax=7.0, qmin=-8.0, np_dtype=np.dtype(np.int8), onnx_type=TensorProto.INT4,
    description="INT4 blockwise weight-only (W4A16)", weights="per-block", activations="none", block_size=128,
    calib_method="", awq=True, bias_correction=False, mode=True, auto=True, min_opset=21, activation_bits=16.0,
    storage_names=("int4", "uint4"), engine_precisions=("Int4",))
