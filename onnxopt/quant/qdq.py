"""Q/DQ insertion: activations per tensor (QuantizeLinear -> DequantizeLinear), weights per output
channel stored pre-quantized behind a DequantizeLinear."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from .. import io
from . import fp8, int8

FORMATS = {"int8": int8, "fp8": fp8}
_FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal FP16: scales below it lose precision
_FP16_MAX = float(np.finfo(np.float16).max)


def round_scale(scale: np.ndarray, high_precision: str) -> np.ndarray:
    """Scales as the engine will hold them: FP16 graphs keep FP16 scales, so quantize with exactly those."""
    scale = np.asarray(scale, dtype=np.float32)
    if high_precision == "fp16":
        # A scale beyond FP16's range (amax > 448 x 65504) stays FP32, as does the island autocast keeps around it
        # (precision.plan_fp32: such a Q/DQ pair's range exceeds FP16); rounding it would give inf (issue 22).
        fits = scale <= _FP16_MAX
        low = np.clip(np.maximum(scale, _FP16_TINY), 0, _FP16_MAX).astype(np.float16).astype(np.float32)
        scale = np.where(fits, low, scale).astype(np.float32)
    return scale


def activation_scale(amax: float, fmt: str, high_precision: str) -> np.ndarray:
    qmax = FORMATS[fmt].QMAX
    amax = float(amax) if amax and np.isfinite(amax) and amax > 0 else 1.0
    return round_scale(np.array(amax / qmax, dtype=np.float32), high_precision)


def insert_activation_qdq(graph: gs.Graph, tensor: gs.Tensor, uses, scale: np.ndarray, fmt: str,
                          base: str | None = None) -> gs.Variable:
    """Q -> DQ on `tensor`, rewiring only the listed (node, input index) uses. Returns the DQ output.
    `base` names the new tensors (default: the tensor's name; a mixed graph may Q/DQ one tensor twice)."""
    f = FORMATS[fmt]
    base = base or tensor.name
    s = gs.Constant(f"{base}_scale", np.asarray(scale, dtype=np.float32))
    zp = gs.Constant(f"{base}_zero_point", f.zero_point())
    q = gs.Variable(f"{base}_quantized", dtype=f.NP_TYPE, shape=tensor.shape)
    dq = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", name=f"{base}_QuantizeLinear", inputs=[tensor, s, zp], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{base}_DequantizeLinear", inputs=[q, s, zp], outputs=[dq]))
    for node, idx in uses:
        node.inputs[idx] = dq
    return dq


def quantize_weight(graph: gs.Graph, const: gs.Constant, axis: int, fmt: str, high_precision: str,
                    values: np.ndarray | None = None, on_error=None) -> tuple[gs.Variable, dict]:
    """Per-output-channel symmetric weights: a quantized initializer feeding a DequantizeLinear.
    `values` replaces the constant's own values (e.g. a weight folded through a Transpose);
    `on_error(w, w_dequantized)` sees both arrays before they are released (bias correction)."""
    f = FORMATS[fmt]
    w = np.asarray(G.read_values(const) if values is None else values, dtype=np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce_axes) if w.ndim > 1 else np.abs(w)
    raw = np.where(amax > 0, amax / f.QMAX, 1.0)
    # Scales below FP16's normal range clamp (weights to ~0). Where that holds most of the weight energy
    # (most of the layer, not a few weak channels), the scales stay FP32 and so does the layer (issue 10).
    energy = np.square(amax.astype(np.float64))
    underflow = high_precision == "fp16" and float(energy[raw < _FP16_TINY].sum()) > 0.5 * float(energy.sum())
    scale = round_scale(raw, "fp32" if underflow else high_precision)
    bshape = [1] * w.ndim
    bshape[axis] = -1
    q = f.cast(w / scale.reshape(bshape))
    if on_error is not None:
        on_error(w, f.to_float(q) * scale.reshape(bshape))
    name = const.name
    qc = io.constant(f"{name}_quantized", q)  # spilled inside quantize(): no second copy at export
    sc = gs.Constant(f"{name}_scale", scale)
    zp = gs.Constant(f"{name}_zero_point", f.zero_point(scale.shape))
    out = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=list(w.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}_DequantizeLinear", inputs=[qc, sc, zp],
                               outputs=[out], attrs={"axis": int(axis)}))
    info = {"axis": int(axis), "channels": int(scale.size), "params": int(w.size)}
    if underflow:
        info["fp32_scale"] = float(raw.min())
    return out, info
