"""Blockwise symmetric INT4 (and per-channel INT8) weight numerics in the [K, N] layout (K = reduction axis).

Shared by the INT4 writer (`quant.int4`) and AWQ's searches (`awq`), which import it instead of each other.
"""
from __future__ import annotations

import numpy as np

from . import qdq

QMIN, QMAX = -8, 7
INT8_MAX = 127.0

# ---------------------------------------------------------------- numerics, [K, N] layout
def blocks_of(k: int, block_size: int) -> int:
    return block_size if block_size > 0 else k


def block_scales(w_kn: np.ndarray, block_size: int, clip: np.ndarray | float | None = None,
                 high_precision: str = "fp32") -> np.ndarray:
    """Per (block along K, output column) scale [ceil(K/B), N]: max|W| in the block (times its clip ratio) / 7."""
    k, n = w_kn.shape
    b = blocks_of(k, block_size)
    nb = -(-k // b)
    a = np.abs(w_kn)
    if nb * b != k:
        a = np.concatenate([a, np.zeros((nb * b - k, n), a.dtype)])
    amax = a.reshape(nb, b, n).max(axis=1)
    if clip is not None:
        amax = amax * clip
    return qdq.round_scale(np.where(amax > 0, amax / QMAX, 1.0), high_precision)


def expand(scale: np.ndarray, k: int, block_size: int) -> np.ndarray:
    return np.repeat(scale, blocks_of(k, block_size), axis=0)[:k]


def quantize_blocks(w_kn: np.ndarray, block_size: int, clip=None, high_precision: str = "fp32"):
    """(INT4 values as int8 [K, N], scales [ceil(K/B), N])."""
    scale = block_scales(w_kn, block_size, clip, high_precision)
    q = np.clip(np.rint(w_kn / expand(scale, w_kn.shape[0], block_size)), QMIN, QMAX).astype(np.int8)
    return q, scale


def fake_quant(w_kn: np.ndarray, block_size: int, clip=None, high_precision: str = "fp32") -> np.ndarray:
    """Quantize-dequantize (what the DequantizeLinear will give back)."""
    q, scale = quantize_blocks(w_kn, block_size, clip, high_precision)
    return q.astype(np.float32) * expand(scale, w_kn.shape[0], block_size)


def fake_quant_int8(w_kn: np.ndarray, high_precision: str = "fp32") -> np.ndarray:
    """Per-output-channel symmetric INT8 quantize-dequantize."""
    amax = np.abs(w_kn).max(axis=0)
    scale = qdq.round_scale(np.where(amax > 0, amax / INT8_MAX, 1.0), high_precision)
    return np.clip(np.rint(w_kn / scale), -INT8_MAX, INT8_MAX) * scale


def to_kn(node, w: np.ndarray) -> np.ndarray:
    """The weight as [K, N] (reduction axis first)."""
    return w.T if node.op == "Gemm" and node.attrs.get("transB", 0) else w
