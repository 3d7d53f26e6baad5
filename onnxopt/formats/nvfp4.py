"""NVFP4: FP4 E2M1 values in blocks of 16 along the reduction axis, an FP8 E4M3 scale per block and an FP32
scale per tensor. W4A4 (weights and dynamically quantized activations) on Blackwell; TensorRT's own form:

    weights:     FLOAT4E2M1 codes [K, N] (two a byte), FLOAT8E4M3FN block scales [K/16, N], FP32 tensor scale
                 DequantizeLinear(block scales, tensor scale) -> DequantizeLinear(codes, ., axis=K, block_size=16)
    activations: trt::TRT_FP4DynamicQuantize(x, s; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN) -> (x4, s8)
                 DequantizeLinear(s8, s) -> DequantizeLinear(x4, ., axis=-1, block_size=16)   (x 2-D or 3-D)

Scales: tensor scale s = amax / 6 / 448 (weights: max |W|; activations: calibrated), block scale
castToFp8(block amax / 6 / s) (round half to even, saturating at 448), codes castToFp4(x / (block scale * s))
(round half to even onto {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at 6). Measured with TensorRT-RTX 1.7.1 for
SM 12.0 (tools/probe_fp4_rtx.py): MatMul [M,K]x[K,N], 3-D and reshaped 4-D activations and Gemm(transB) become
FP4 GEMM kernels (FP4E2M1 + FP8 scale inputs); weight-only FP4 (FP16 activations) and FP4 attention BMMs run
as FP16 GEMMs after a dequantizing kernel; a Conv's FP4 weights are refused (blocks must run along one of
the last two axes).

ONNX Runtime has neither FP4 DequantizeLinear nor the trt ops: `lower_for_ort` rewrites the real form into
standard ops that reproduce the same rounding bit for bit (`emulate_dynamic` below; weights as constants).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .base import Format, emitters, reshape_back
from .fp8 import FP8_E4M3

E2M1_MAX = 6.0
BLOCK = 16
# Candidate block ranges (fractions of the block's max |w|) for weights: FP4 has 7 levels, so clipping the largest
# value of a block often lowers its squared error; each block keeps the best (weights only, no data needed).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
TRT_DOMAIN = "trt"
DYNAMIC_OP = "TRT_FP4DynamicQuantize"
# Activations' tensor scale covers HEADROOM x the calibrated max: a value beyond the calibrated range (MiniLM's
# held-out sentences exceed it by up to 17% at some inputs) would saturate its block's FP8 scale and be clipped.
# A power of two leaves every block scale of data within the calibrated range the same up to its exponent, so
# the rounding of such data is unchanged (only blocks below E4M3's normal range, amax/6/448·2^-6·2, change).
HEADROOM = 2.0
_FP4 = np.dtype(ml_dtypes.float4_e2m1fn)
_TO_FLOAT = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


# ---------------------------------------------------------------- numpy reference
def round_e2m1(y: np.ndarray) -> np.ndarray:
    """float32 y rounded half-to-even onto the E2M1 grid, saturating at ±6 (castToFp4). Within [0,2), [2,4) and
    [4,6] the grid is evenly spaced (0.5, 1, 2), and the even code there is the even multiple of the step."""
    y = np.asarray(y, dtype=np.float32)
    a = np.abs(y)
    step = np.where(a < 2, np.float32(0.5), np.where(a < 4, np.float32(1.0), np.float32(2.0))).astype(np.float32)
    q = np.minimum(np.rint(a / step) * step, np.float32(E2M1_MAX))
    return (np.sign(y) * q).astype(np.float32)


def tensor_scale(amax: float) -> np.float32:
    """FP32 per-tensor scale amax / 6 / 448 (1 where the range is 0 or not finite)."""
    amax = float(amax) if amax is not None and np.isfinite(amax) and amax > 0 else 0.0
    if amax == 0.0:
        return np.float32(1.0)
    return np.float32(np.float32(amax) / np.float32(E2M1_MAX) / np.float32(FP8_E4M3.qmax))


def activation_scale(amax: float) -> np.float32:
    """FP32 tensor scale of a dynamically quantized activation with calibrated range amax (HEADROOM above it)."""
    given = amax is not None and np.isfinite(amax) and amax > 0
    return np.float32(tensor_scale(amax) * np.float32(HEADROOM)) if given else np.float32(1.0)


def block_scale_codes(block_amax: np.ndarray, s: np.float32) -> np.ndarray:
    """FP8 E4M3 block scales castToFp8(amax / 6 / s), saturating at 448."""
    r = (np.asarray(block_amax, np.float32) / np.float32(E2M1_MAX) / np.float32(s)).astype(np.float32)
    return FP8_E4M3.cast(np.minimum(r, np.float32(FP8_E4M3.qmax)))


def fake_quant_blocks(xb: np.ndarray, s: np.float32) -> np.ndarray:
    """Dynamic NVFP4 quantize-dequantize of float32 blocks xb [..., 16] with tensor scale s (the numpy
    reference of TRT_FP4DynamicQuantize + two DequantizeLinears, and of `emulate_dynamic`)."""
    xb = np.asarray(xb, np.float32)
    sx = (FP8_E4M3.to_float(block_scale_codes(np.abs(xb).max(-1, keepdims=True), s)) * np.float32(s)).astype(np.float32)
    div = np.where(sx > 0, sx, np.float32(1.0))
    return (round_e2m1(xb / div) * sx).astype(np.float32)


def fake_quant_activation(x: np.ndarray, amax: float) -> np.ndarray:
    """NVFP4 W4A4's view of an activation x (blocks of 16 along its last axis) with calibrated range amax."""
    x = np.asarray(x, np.float32)
    return fake_quant_blocks(x.reshape(-1, BLOCK), activation_scale(amax)).reshape(x.shape)


def expand(scales: np.ndarray, k: int, block: int = BLOCK) -> np.ndarray:
    """Per-block scales [K/B, N] repeated to one per row [K, N]."""
    return np.repeat(scales, block, axis=0)[:k]


_CHUNK = 1 << 18                    # elements per chunk of the clip search (about 1 MiB of float32)
# floor(4 y) -> E2M1 value of y in [0, 6.25): every rounding threshold (0.25, 0.75, ..., 5) starts a quarter, so
# the table is exact except at an exact tie, which only the search's error estimate sees (the codes are exact).
_QUARTERS = np.array([0, .5, .5, 1, 1, 1.5, 1.5, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6], np.float32)
_CODES = np.array([0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7], np.uint8)  # same, as codes
_DOWN_TIE = np.isin(np.arange(len(_CODES)), (1, 5, 10, 20)).astype(np.uint8)  # 4y exactly 1, 5, 10, 20: ties to the even code below


def _search_blocks(wb: np.ndarray, s: np.float32) -> np.ndarray:
    """FP8 block scales [nb, N] of blocks wb [nb, 16, N]: per block the CLIP_RATIOS candidate with the smallest
    squared error (E2M1 magnitudes by table lookup: the error is sign-symmetric)."""
    a = np.abs(wb)
    amax = a.max(axis=1)
    y = np.empty_like(a)
    best_err = best_bs = None
    for r in CLIP_RATIOS:
        bs = block_scale_codes((amax * np.float32(r)).astype(np.float32), s)
        eff = (FP8_E4M3.to_float(bs) * s).astype(np.float32)
        np.multiply(a, np.where(eff > 0, np.float32(4) / np.where(eff > 0, eff, np.float32(1)), np.float32(0))[:, None, :], out=y)
        q = _QUARTERS.take(np.minimum(y, np.float32(len(_QUARTERS) - 1), out=y).astype(np.int32))
        q *= eff[:, None, :]
        q -= a
        err = np.square(q, out=q).sum(axis=1)
        if best_err is None:
            best_err, best_bs = err, bs
        else:
            better = err < best_err
            best_err, best_bs = np.where(better, err, best_err), np.where(better, bs, best_bs)
    return best_bs


def _map(fn, items: list, size: int) -> list:
    """fn over items, on up to 8 threads for weights of a million elements or more (numpy releases the GIL)."""
    workers = min(len(items), os.cpu_count() or 1, 8)  # as FP8.cast
    if size < 1 << 20 or workers < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


@dataclass
class Fp4Weight:
    """A quantized [K, N] weight: E2M1 codes, FP8 block scales [K/16, N], FP32 tensor scale."""
    codes: np.ndarray
    block_scales: np.ndarray
    scale: np.float32

    def dequantize(self) -> np.ndarray:
        """float32 weights as the two DequantizeLinears give them."""
        eff = (FP8_E4M3.to_float(self.block_scales) * self.scale).astype(np.float32)
        return (_TO_FLOAT[self.codes.view(np.uint8)] * expand(eff, self.codes.shape[0])).astype(np.float32)


@dataclass(frozen=True)
class NVFP4(Format):
    """E2M1 numerics with two-level (FP8 block, FP32 tensor) scales; weights in [K, N] (K first)."""

    def cast(self, x_over_scale: np.ndarray) -> np.ndarray:
        """castToFp4: round half to even onto E2M1, saturating at ±6 (codes by table: `round_e2m1`'s result)."""
        y = np.asarray(x_over_scale, np.float32)
        t = np.minimum(np.abs(y) * np.float32(4), np.float32(len(_QUARTERS) - 1))
        i = t.astype(np.uint8)  # floor(4 |y|)
        codes = _CODES.take(i) - (_DOWN_TIE.take(i) & (t == i))
        return (codes | (np.signbit(y).astype(np.uint8) << 3)).view(_FP4)

    def fake_quant_activation(self, x: np.ndarray, amax: float) -> np.ndarray:
        """W4A4's view of activation rows x (blocks along the last axis) with calibrated range amax (numpy)."""
        return fake_quant_activation(x, amax)

    def to_float(self, codes: np.ndarray) -> np.ndarray:
        """E2M1 codes as float32 (table lookup)."""
        return _TO_FLOAT[np.asarray(codes).view(np.uint8) & 0x0F]

    def quantize_parts(self, w: np.ndarray, clip=None) -> Fp4Weight:
        """Codes and both scales of w [K, N] (K divisible by 16). `clip`: per-block ratios [K/16, N] of the block
        ranges (AWQ's clip search), or (codes, effective block scales) already rounded (error feedback); None
        searches CLIP_RATIOS per block for the smallest squared error (in cache-sized chunks of blocks, on
        threads for large weights: numpy releases the GIL)."""
        w = np.asarray(w, np.float32)
        k, n = w.shape
        s = tensor_scale(max(float(w.max()), -float(w.min())) if w.size else 0.0)  # max |w| without a |w| copy
        wb = w.reshape(k // BLOCK, BLOCK, n)
        if isinstance(clip, tuple):  # error-feedback rounding's result: keep its codes, recover the FP8 block scales
            codes, eff = clip
            return Fp4Weight(np.asarray(codes).astype(_FP4), FP8_E4M3.cast(np.asarray(eff, np.float32) / np.float32(s)), s)
        ratios = None if clip is None else np.broadcast_to(np.asarray(clip, np.float32), (k // BLOCK, n))
        rows = max(1, _CHUNK // max(BLOCK * n, 1))  # block rows per chunk: the temporaries stay in cache
        spans = [slice(i, min(i + rows, k // BLOCK)) for i in range(0, k // BLOCK, rows)]

        codes = np.zeros((k, n), _FP4)  # each chunk writes its rows here: no list of parts to concatenate
        blocks = codes.reshape(k // BLOCK, BLOCK, n)
        bs = np.zeros((k // BLOCK, n), FP8_E4M3.np_dtype)

        def part(sl):
            b = _search_blocks(wb[sl], s) if ratios is None else block_scale_codes(np.abs(wb[sl]).max(1) * ratios[sl], s)
            eff = (FP8_E4M3.to_float(b) * s).astype(np.float32)[:, None, :]
            blocks[sl] = self.cast(wb[sl] / np.where(eff > 0, eff, np.float32(1.0)))
            bs[sl] = b
        _map(part, spans, w.size)
        return Fp4Weight(codes, bs, s)

    def block_scales(self, w_kn: np.ndarray, block_size: int = BLOCK, clip=None, high_precision: str = "fp32") -> np.ndarray:
        """Effective block scales [K/16, N] (FP8 block scale x tensor scale) of w with per-block clip ratios `clip`
        (AWQ's error-feedback rounding rounds onto them)."""
        w_kn = np.asarray(w_kn, np.float32)
        p = self.quantize_parts(w_kn, np.ones((w_kn.shape[0] // BLOCK, w_kn.shape[1]), np.float32) if clip is None else clip)
        return (FP8_E4M3.to_float(p.block_scales) * p.scale).astype(np.float32)

    def block_candidates(self, w_kn: np.ndarray, rows: slice, ratios, high_precision: str = "fp32",
                         block_size: int = BLOCK, tensor_amax=None) -> np.ndarray:
        """Quantize-dequantize of the block of rows `rows` of w [K, N] at every clip ratio: [R, B, N] (the tensor
        scale is the whole weight's: max |w|, or `tensor_amax` where the caller has it)."""
        s = tensor_scale(float(np.abs(w_kn).max()) if tensor_amax is None else tensor_amax)
        wb = np.asarray(w_kn[rows], np.float32)
        r = np.asarray(ratios, np.float32)[:, None]
        eff = (FP8_E4M3.to_float(block_scale_codes(np.abs(wb).max(0)[None] * r, s)) * s).astype(np.float32)[:, None, :]
        return round_e2m1(wb[None] / np.where(eff > 0, eff, np.float32(1.0))) * eff

    def quantize_weight(self, w, axis=1, high_precision="fp32", *, block_size=None, clip=None):
        """(E2M1 codes, effective float32 block scales = FP8 block scale * tensor scale) of a 2-D w whose output
        channels run along `axis` (1: w is [K, N], scales [K/16, N]; 0: [N, K], both transposed)."""
        p = self.quantize_parts(w if axis % 2 else np.asarray(w).T, clip)
        eff = (FP8_E4M3.to_float(p.block_scales) * p.scale).astype(np.float32)
        return (p.codes, eff) if axis % 2 else (p.codes.T, eff.T)

    def dequantize(self, codes, scales, axis=1, *, block_size=None):
        """float32 weights from codes and effective block scales as `quantize_weight(w, axis)` returned them."""
        if not axis % 2:
            return self.dequantize(np.asarray(codes).T, np.asarray(scales).T).T
        return (self.to_float(codes) * expand(scales, codes.shape[0])).astype(np.float32)

    def fake_quant(self, w, axis=1, high_precision="fp32", *, block_size=None, clip=None):
        """What the layer computes with instead of w (output channels along `axis`)."""
        d = self.quantize_parts(w if axis % 2 else np.asarray(w).T, clip).dequantize()
        return d if axis % 2 else d.T

    def weight_constant(self, name: str, codes: np.ndarray) -> gs.Constant:
        """FLOAT4E2M1 initializer, two codes a byte (onnx packs ml_dtypes' float4_e2m1fn); spilled inside a
        quantize run, so the written codes of every layer are not held until the save."""
        from .. import modelfile
        return modelfile.constant(name, np.ascontiguousarray(codes, _FP4))

    # ------------------------------------------------------------ ONNX forms
    def write_block_weight(self, graph: gs.Graph, base: str, w_kn: np.ndarray, transposed: bool, name, clip=None,
                           dtype=None) -> tuple[gs.Variable, dict]:
        """The two DequantizeLinears of an NVFP4 weight in the layer's layout ([K, N], or [N, K] for
        Gemm transB), output FP32 whatever `dtype` (Autocast casts around its FP32 scales); `name` makes names
        unique. Returns (output, report info)."""
        p = self.quantize_parts(w_kn, clip)
        codes, bs, axis = (p.codes.T, p.block_scales.T, 1) if transposed else (p.codes, p.block_scales, 0)
        qc = self.weight_constant(name(f"{base}_fp4"), codes)
        from .. import modelfile
        bc = modelfile.constant(name(f"{base}_fp8_scale"), np.ascontiguousarray(bs))  # spilled, as the codes
        sc = gs.Constant(name(f"{base}_scale"), np.asarray(p.scale, np.float32))
        sw = gs.Variable(name(f"{base}_block_scale"), dtype=np.float32, shape=list(bs.shape))
        out = gs.Variable(name(f"{base}_dequantized"), dtype=np.float32, shape=list(codes.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name=name(f"{base}_scale_DequantizeLinear"), inputs=[bc, sc], outputs=[sw]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=name(f"{base}_DequantizeLinear"), inputs=[qc, sw], outputs=[out],
                                   attrs={"axis": axis, "block_size": BLOCK}))
        info = {"format": self.name, "block_size": BLOCK, "tensor_scale": float(p.scale),
                "bytes": int((codes.size + 1) // 2 + bs.size + 4)}
        return out, info

    def write_dynamic_activation(self, graph, tensor, uses, *, axis=-1, base=None, amax=None, name=None, k=None,
                                 dtype=None):
        """TRT_FP4DynamicQuantize + two DequantizeLinears on `tensor` (its last axis blocked), rewiring `uses`.
        Inputs other than 2-D are reshaped to [-1, K] around it (the op takes 2-D or 3-D, with K known when the
        engine is built, which a 3-D input reshaped from dynamic shapes is not; `k` gives it where shape inference
        did not). Returns the FP32 output."""
        name = name or (lambda n: n)
        base = base or tensor.name
        s = gs.Constant(name(f"{base}_fp4_scale"), np.asarray(activation_scale(amax), np.float32))
        rank = len(tensor.shape) if tensor.shape is not None else 0
        x = tensor
        k = int(k) if k is not None else int(tensor.shape[-1])  # the layer's K (its weight's) where inference lost it
        flat = rank != 2  # TensorRT needs a build-time K and a 2-D/3-D input: [-1, K] around the quantizer
        if flat:
            x = gs.Variable(name(f"{base}_fp4_2d"), dtype=tensor.dtype, shape=[None, k])
            graph.nodes.append(gs.Node("Reshape", name=name(f"{base}_fp4_Reshape"), outputs=[x],
                                       inputs=[tensor, gs.Constant(name(f"{base}_fp4_2d_shape"), np.array([-1, k], np.int64))]))
        shape = list(x.shape) if x.shape is not None else None
        x4 = gs.Variable(name(f"{base}_fp4"), dtype=_FP4, shape=shape)
        s8 = gs.Variable(name(f"{base}_fp4_block_scale_fp8"), dtype=FP8_E4M3.np_dtype)
        sx = gs.Variable(name(f"{base}_fp4_block_scale"), dtype=np.float32)
        y = gs.Variable(name(f"{base}_fp4_dequantized"), dtype=np.float32, shape=shape)
        graph.nodes.append(gs.Node(DYNAMIC_OP, name=name(f"{base}_{DYNAMIC_OP}"), domain=TRT_DOMAIN, inputs=[x, s], outputs=[x4, s8],
                                   attrs={"axis": -1, "block_size": BLOCK, "scale_type": int(TensorProto.FLOAT8E4M3FN)}))
        graph.nodes.append(gs.Node("DequantizeLinear", name=name(f"{base}_fp4_scale_DequantizeLinear"), inputs=[s8, s], outputs=[sx]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=name(f"{base}_fp4_DequantizeLinear"), inputs=[x4, sx], outputs=[y],
                                   attrs={"axis": -1, "block_size": BLOCK}))
        if flat:
            y = reshape_back(graph, y, tensor, name, f"{base}_fp4", np.float32)
        for node, idx in uses:
            node.inputs[idx] = y
        return y


def emulate_dynamic(graph: gs.Graph, x: gs.Tensor, s: np.float32, out: gs.Variable, base: str) -> None:
    """Standard-ONNX nodes computing `out` = NVFP4 quantize-dequantize of x (blocks of 16 along the last axis)
    exactly as `fake_quant_blocks` does: FP32 arithmetic, FP8 by Cast(saturate), E2M1 by Round (half to even)
    on the step of x's binade. Needs opset 19 (FP8 Cast)."""
    v, c, node = emitters(graph, base)
    f32 = node("Cast", [x], [v("f32")], to=int(TensorProto.FLOAT))
    shp = node("Shape", [x], [v("shape", np.int64)])
    xb = node("Reshape", [f32, c("blocks", np.array([-1, BLOCK], np.int64))], [v("xb")])
    amax = node("ReduceMax", [node("Abs", [xb], [v("abs")]), c("axes", np.array([1], np.int64))], [v("amax")], keepdims=1)
    r = node("Div", [node("Div", [amax, c("six", np.float32(E2M1_MAX))], [v("amax6")]), c("s", np.float32(s))], [v("ratio")])
    r = node("Min", [r, c("fp8max", np.float32(FP8_E4M3.qmax))], [v("ratio_sat")])
    s8 = node("Cast", [node("Cast", [r], [v("s8", FP8_E4M3.np_dtype)], to=int(TensorProto.FLOAT8E4M3FN), saturate=1)],
              [v("s8f")], to=int(TensorProto.FLOAT))
    sx = node("Mul", [s8, c("s2", np.float32(s))], [v("sx")])
    pos = node("Greater", [sx, c("zero", np.float32(0))], [v("pos", np.bool_)])
    div = node("Where", [pos, sx, c("one", np.float32(1))], [v("div")])
    y = node("Div", [xb, div], [v("y")])
    q = _round_e2m1_nodes(node, v, c, y)
    deq = node("Mul", [q, sx], [v("deq")])
    node("Reshape", [deq, shp], [out])


def _round_e2m1_nodes(node, v, c, y):
    a = node("Abs", [y], [v("a")])
    small = node("Less", [a, c("two", np.float32(2))], [v("lt2", np.bool_)])
    mid = node("Less", [a, c("four", np.float32(4))], [v("lt4", np.bool_)])
    step = node("Where", [small, c("half", np.float32(0.5)), node("Where", [mid, c("onef", np.float32(1)), c("twof", np.float32(2))],
                                                                   [v("step_hi")])], [v("step")])
    q = node("Mul", [node("Round", [node("Div", [a, step], [v("a_steps")])], [v("rounded")]), step], [v("q_abs")])
    q = node("Min", [q, c("e2m1max", np.float32(E2M1_MAX))], [v("q_sat")])
    return node("Mul", [q, node("Sign", [y], [v("sign")])], [v("q")])


NVFP4_FORMAT = NVFP4(
    name="nvfp4", bits=4, qmax=E2M1_MAX, qmin=-E2M1_MAX, np_dtype=_FP4, onnx_type=TensorProto.FLOAT4E2M1,
    description="NVFP4 W4A4 (E2M1, FP8 scale per 16, FP32 per tensor)", weights="per-block", activations="dynamic",
    block_size=BLOCK, calib_method="max", awq=True, bias_correction=False, mode=True, auto=True, min_opset=23,
    weight_bits=4.5, activation_bits=4.5, storage_names=("float4_e2m1fn",), engine_precisions=("FP4E2M1",),
    weight_only_variant=True, dynamic_op=DYNAMIC_OP, awq_ratios_above=(1.1, 1.05),
    extra={"scale_format": "fp8"})

# Weight-only NVFP4 (W4A16) as a per-layer candidate of --auto, offered beside W4A4 (`auto_beside`): the same weight
# nodes (`write_block_weight`, as `--nvfp4 --weight-only` writes them), FP16 activations, so its error is the
# weight's rounding alone (MiniLM's W4A4 error is mostly the activations' FP4 rounding, BENCHMARKS.md "NVFP4
# candidates on more calibration data"). TensorRT-RTX 1.7.1 stores the weights in FP4 and runs an FP16 GEMM after
# a dequantizing kernel (no W4A16 FP4 GEMM): a storage format, costed as 4.5-bit weights and 16-bit activations.
# Its own name, so reports, `inspect` and the engine report tell it from W4A4 (a FP4 weight whose layer input has
# no quantizer: `formats.from_storage(..., weight_only=True)`).
NVFP4_WO = replace(
    NVFP4_FORMAT, name="nvfp4-wo", description="NVFP4 weight-only W4A16 (E2M1 weights, FP8 scale per 16; FP16 activations)",
    activations="none", calib_method="", mode=False, auto=True, auto_default=False, weight_only_variant=False,
    activation_bits=16.0, dynamic_op="", auto_beside="nvfp4")
