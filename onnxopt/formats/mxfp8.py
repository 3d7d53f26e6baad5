"""MXFP8 (OCP microscaling): FP8 E4M3 values in blocks of 32 along the reduction axis, one power-of-two
E8M0 scale per block (stored as its biased exponent, uint8), no per-tensor scale. TensorRT's form:

    weights:     FLOAT8E4M3FN codes [K, N] + uint8 E8M0 codes [K/32, N]
                 trt::TRT_MXFP8DequantizeLinear(codes, scales; axis=K, block_size=32, output_dtype=FLOAT16)
    activations: trt::TRT_MXFP8DynamicQuantize(x; axis=-1, block_size=32, output_dtype=FLOAT8E4M3FN) -> (x8, e8)
                 trt::TRT_MXFP8DequantizeLinear(x8, e8; axis=-1, block_size=32, output_dtype=FLOAT16)

Block scale 2^ceil(log2(amax / 448)) (the smallest power of two that keeps the block within ±448: cuDNN's
"round up" and ModelOpt's export), codes castToFp8(x / scale). An all-zero block gets code 0 (2^-127).
Measured with TensorRT-RTX 1.7.1 for SM 12.0 (tools/probe_fp4_rtx.py): every form parses, but no GEMM reads
MXFP8: the quantize and dequantize run as elementwise kernels and the GEMM in FP16 (the library's block-scaled
E8M0xE4M3 GEMMs are SM 10.0 CUTLASS kernels, a target TensorRT-RTX does not build for). A standard
DequantizeLinear with FLOAT8E8M0 scales (opset 24) does not parse ("initializer cannot be imported").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .base import Format, emitters, reshape_back
from .fp8 import FP8_E4M3

BLOCK = 32
BIAS = 127
TRT_DOMAIN = "trt"
DYNAMIC_OP = "TRT_MXFP8DynamicQuantize"
DQ_OP = "TRT_MXFP8DequantizeLinear"


def e8m0_codes(block_amax: np.ndarray) -> np.ndarray:
    """uint8 biased exponents of 2^ceil(log2(amax / 448)), clamped to [2^-127, 2^127]."""
    r = (np.asarray(block_amax, np.float32) / np.float32(FP8_E4M3.qmax)).astype(np.float32)
    m, e = np.frexp(np.maximum(r, np.float32(2.0 ** -127)))
    e = np.where(m == 0.5, e - 1, e)  # r = m * 2^e with m in [0.5, 1): ceil(log2 r) = e, or e-1 at a power of two
    return np.clip(e + BIAS, 0, 254).astype(np.uint8)


def scale_of_codes(codes: np.ndarray) -> np.ndarray:
    """float32 2^(code - 127) (E8M0 decoding; code 255, NaN, is never written)."""
    return np.ldexp(np.float32(1.0), np.asarray(codes, np.int32) - BIAS).astype(np.float32)


def fake_quant_blocks(xb: np.ndarray) -> np.ndarray:
    """Dynamic MXFP8 quantize-dequantize of float32 blocks xb [..., 32] (the numpy reference)."""
    xb = np.asarray(xb, np.float32)
    scale = scale_of_codes(e8m0_codes(np.abs(xb).max(-1, keepdims=True)))
    return (FP8_E4M3.to_float(FP8_E4M3.cast(xb / scale)) * scale).astype(np.float32)


def fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """MXFP8's view of an activation (blocks of 32 along its last axis)."""
    x = np.asarray(x, np.float32)
    return fake_quant_blocks(x.reshape(-1, BLOCK)).reshape(x.shape)


@dataclass(frozen=True)
class MXFP8(Format):
    """E4M3 codes with E8M0 block scales; weights in [K, N] (K first)."""

    def cast(self, x_over_scale):
        """castToFp8 (round half to even, saturating)."""
        return FP8_E4M3.cast(x_over_scale)

    def to_float(self, codes):
        """E4M3 codes as float32."""
        return FP8_E4M3.to_float(codes)

    def quantize_weight(self, w, axis=1, high_precision="fp32", *, block_size=None, clip=None):
        """(E4M3 codes, uint8 E8M0 codes [K/32, N]) of a 2-D w whose output channels run along `axis` (1: [K, N];
        0: [N, K], both results transposed)."""
        if not axis % 2:
            q, e = self.quantize_weight(np.asarray(w).T, clip=clip)
            return q.T, e.T
        w = np.asarray(w, np.float32)
        k, n = w.shape
        amax = np.abs(w).reshape(k // BLOCK, BLOCK, n).max(axis=1)
        if clip is not None:
            amax = amax * clip
        e = e8m0_codes(amax)
        return self.cast(w / np.repeat(scale_of_codes(e), BLOCK, axis=0)), e

    def dequantize(self, codes, scales, axis=1, *, block_size=None):
        """float32 weights from E4M3 codes and E8M0 codes as `quantize_weight(w, axis)` returned them."""
        return (self.to_float(codes) * np.repeat(scale_of_codes(scales), BLOCK, axis=1 - axis % 2)).astype(np.float32)

    def fake_quant(self, w, axis=1, high_precision="fp32", *, block_size=None, clip=None):
        """What the layer computes with instead of w (output channels along `axis`)."""
        q, e = self.quantize_weight(w, axis, clip=clip)
        return self.dequantize(q, e, axis)

    def write_block_weight(self, graph: gs.Graph, base: str, w_kn: np.ndarray, transposed: bool, name, clip=None,
                           dtype=None) -> tuple[gs.Variable, dict]:
        """TRT_MXFP8DequantizeLinear of the weight in the layer's layout, output FP16 (FP32 where a dequantized
        weight exceeds FP16's range: info "fp32_node" names the node that must stay FP32). `dtype` float32: the
        graph is still FP32 (--auto's write, before Autocast): a Cast to it follows (Autocast relabels it)."""
        q, e = self.quantize_weight(w_kn, clip=clip)
        wide = float(np.abs(self.dequantize(q, e)).max(initial=0.0)) > float(np.finfo(np.float16).max)
        axis = 1 if transposed else 0
        if transposed:
            q, e = q.T, e.T
        qc = gs.Constant(name(f"{base}_mxfp8"), np.ascontiguousarray(q))
        ec = gs.Constant(name(f"{base}_e8m0"), np.ascontiguousarray(e))
        out = gs.Variable(name(f"{base}_dequantized"), dtype=np.float32 if wide else np.float16, shape=list(q.shape))
        node = name(f"{base}_{DQ_OP}")
        graph.nodes.append(gs.Node(DQ_OP, name=node, domain=TRT_DOMAIN, inputs=[qc, ec], outputs=[out],
                                   attrs={"axis": axis, "block_size": BLOCK,
                                          "output_dtype": int(TensorProto.FLOAT if wide else TensorProto.FLOAT16)}))
        info = {"format": self.name, "block_size": BLOCK, "bytes": int(q.size + e.size)}
        if wide:
            info["fp32_node"] = node
        return _cast_to(graph, out, dtype, name, base), info

    def write_dynamic_activation(self, graph, tensor, uses, *, axis=-1, base=None, amax=None, name=None, k=None,
                                 dtype=None):
        """TRT_MXFP8DynamicQuantize + TRT_MXFP8DequantizeLinear on `tensor` (last axis), output FP16 (then a Cast to
        `dtype` float32 in a graph that is still FP32); inputs other than 2-D are reshaped to [-1, K] around them
        (K known when the engine is built, `k` where inference lost it)."""
        name = name or (lambda n: n)
        base = base or tensor.name
        rank = len(tensor.shape) if tensor.shape is not None else 0
        k = int(k) if k is not None else int(tensor.shape[-1])
        x = tensor
        if rank != 2:
            x = gs.Variable(name(f"{base}_mxfp8_2d"), dtype=tensor.dtype, shape=[None, k])
            graph.nodes.append(gs.Node("Reshape", name=name(f"{base}_mxfp8_Reshape"), outputs=[x],
                                       inputs=[tensor, gs.Constant(name(f"{base}_mxfp8_2d_shape"), np.array([-1, k], np.int64))]))
        x8 = gs.Variable(name(f"{base}_mxfp8"), dtype=FP8_E4M3.np_dtype, shape=x.shape)
        e8 = gs.Variable(name(f"{base}_mxfp8_e8m0"), dtype=np.uint8)
        y = gs.Variable(name(f"{base}_mxfp8_dequantized"), dtype=np.float16, shape=x.shape)
        graph.nodes.append(gs.Node(DYNAMIC_OP, name=name(f"{base}_{DYNAMIC_OP}"), domain=TRT_DOMAIN, inputs=[x],
                                   outputs=[x8, e8], attrs={"axis": -1, "block_size": BLOCK,
                                                            "output_dtype": int(TensorProto.FLOAT8E4M3FN)}))
        graph.nodes.append(gs.Node(DQ_OP, name=name(f"{base}_{DQ_OP}"), domain=TRT_DOMAIN, inputs=[x8, e8], outputs=[y],
                                   attrs={"axis": -1, "block_size": BLOCK, "output_dtype": int(TensorProto.FLOAT16)}))
        if rank != 2:
            y = reshape_back(graph, y, tensor, name, f"{base}_mxfp8", np.float16)
        y = _cast_to(graph, y, dtype, name, f"{base}_mxfp8")
        for node, idx in uses:
            node.inputs[idx] = y
        return y


def _cast_to(graph: gs.Graph, y: gs.Variable, dtype, name, base: str) -> gs.Variable:
    """`y` (FP16, or FP32 for a wide weight) cast to `dtype` where it differs (None: as it is)."""
    if dtype is None or np.dtype(dtype) == np.dtype(y.dtype):
        return y
    out = gs.Variable(name(f"{base}_as_{np.dtype(dtype).name}"), dtype=np.dtype(dtype), shape=y.shape)
    graph.nodes.append(gs.Node("Cast", name=name(f"{base}_Cast_{np.dtype(dtype).name}"), inputs=[y], outputs=[out],
                               attrs={"to": int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))}))
    return out


def emulate_dynamic(graph: gs.Graph, x: gs.Tensor, out: gs.Variable, base: str) -> None:
    """Standard-ONNX nodes computing `out` = MXFP8 quantize-dequantize of x as `fake_quant_blocks` does. ceil(log2 r)
    is taken from Log and corrected to the exact power of two by comparing 2^e with r (opset 19: FP8 Cast)."""
    v, c, node = emitters(graph, base)
    f = np.float32
    f32 = node("Cast", [x], [v("f32")], to=int(TensorProto.FLOAT))
    shp = node("Shape", [x], [v("shape", np.int64)])
    xb = node("Reshape", [f32, c("blocks", np.array([-1, BLOCK], np.int64))], [v("xb")])
    amax = node("ReduceMax", [node("Abs", [xb], [v("abs")]), c("axes", np.array([1], np.int64))], [v("amax")], keepdims=1)
    r = node("Max", [node("Div", [amax, c("fp8max", f(FP8_E4M3.qmax))], [v("r0")]), c("rmin", f(2.0 ** -127))], [v("r")])
    e0 = node("Ceil", [node("Div", [node("Log", [r], [v("ln")]), c("ln2", f(np.log(2.0)))], [v("log2")])], [v("e0")])
    p = node("Pow", [c("two", f(2)), e0], [v("p0")])
    down = node("Cast", [node("GreaterOrEqual", [node("Mul", [p, c("half", f(0.5))], [v("p_half")]), r], [v("too_big", np.bool_)])],
                [v("down")], to=int(TensorProto.FLOAT))
    up = node("Cast", [node("Less", [p, r], [v("too_small", np.bool_)])], [v("up")], to=int(TensorProto.FLOAT))
    e = node("Add", [node("Sub", [e0, down], [v("e1")]), up], [v("e2")])
    e = node("Clip", [e, c("emin", f(-BIAS)), c("emax", f(BIAS))], [v("e")])
    scale = node("Pow", [c("two2", f(2)), e], [v("scale")])
    y = node("Div", [xb, scale], [v("y")])
    y = node("Clip", [y, c("lo", f(-FP8_E4M3.qmax)), c("hi", f(FP8_E4M3.qmax))], [v("y_sat")])
    q = node("Cast", [node("Cast", [y], [v("q8", FP8_E4M3.np_dtype)], to=int(TensorProto.FLOAT8E4M3FN), saturate=1)],
             [v("qf")], to=int(TensorProto.FLOAT))
    deq = node("Mul", [q, scale], [v("deq")])
    node("Reshape", [deq, shp], [out])


MXFP8_FORMAT = MXFP8(
    name="mxfp8", bits=8, qmax=FP8_E4M3.qmax, qmin=-FP8_E4M3.qmax, np_dtype=FP8_E4M3.np_dtype,
    onnx_type=TensorProto.FLOAT8E4M3FN, description="MXFP8 (E4M3, E8M0 scale per 32)", weights="per-block",
    activations="dynamic", block_size=BLOCK, calib_method="", bias_correction=False, mode=True, auto=True, min_opset=23,
    weight_bits=8.25, activation_bits=8.25, storage_names=(), engine_precisions=("FP8UE8M0",),
    dequantize_op=DQ_OP, dynamic_op=DYNAMIC_OP, extra={"scale_format": "e8m0"})
