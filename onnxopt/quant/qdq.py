"""Q/DQ insertion: activations per tensor (QuantizeLinear -> DequantizeLinear), weights per output
channel stored pre-quantized behind a DequantizeLinear; the numbers and node forms are each format's
(onnxopt.formats)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import formats
from .. import graph as G
from ..formats import round_scale
from ..formats.base import Format, scales_underflow

__all__ = ["round_scale", "activation_scale", "insert_activation_qdq", "quantize_weight", "write_weight_codes", "weight_codes"]


def activation_scale(amax: float, fmt: str, high_precision: str) -> np.ndarray:
    """Per-tensor scale of `fmt` for a calibrated range."""
    return formats.get(fmt).activation_scale(amax, high_precision)


def insert_activation_qdq(graph: gs.Graph, tensor: gs.Tensor, uses, scale: np.ndarray, fmt: str,
                          base: str | None = None) -> gs.Variable:
    """Q -> DQ on `tensor`, rewiring only the listed (node, input index) uses. Returns the DQ output.
    `base` names the new tensors (default: the tensor's name; a mixed graph may Q/DQ one tensor twice)."""
    return formats.get(fmt).write_activation(graph, tensor, uses, scale, base)


def quantize_weight(graph: gs.Graph, const: gs.Constant, axis: int, fmt: str, high_precision: str,
                    values: np.ndarray | None = None, on_error=None) -> tuple[gs.Variable, dict]:
    """Per-output-channel symmetric weights: a quantized initializer feeding a DequantizeLinear.
    `values` replaces the constant's own values (e.g. a weight folded through a Transpose);
    `on_error(w, w_dequantized)` sees both arrays before they are released (bias correction)."""
    f = formats.get(fmt)
    w = np.asarray(G.read_values(const) if values is None else values, dtype=np.float32)
    q, scale, fp32_scale = weight_codes(f, w, axis, high_precision)
    if on_error is not None:
        on_error(w, f.dequantize(q, scale))
    return write_weight_codes(graph, const, axis, fmt, q, scale, fp32_scale)


def write_weight_codes(graph: gs.Graph, const: gs.Constant, axis: int, fmt: str, q: np.ndarray, scale: np.ndarray,
                       fp32_scale: float | None = None) -> tuple[gs.Variable, dict]:
    """`quantize_weight`'s graph half: codes and scales from `weight_codes` behind a DequantizeLinear named after
    `const`. Returns (DQ output, info)."""
    scale = scale.reshape(-1)
    out = formats.get(fmt).write_weight(graph, const.name, q, scale, {"axis": int(axis)})
    info = {"axis": int(axis), "channels": int(scale.size), "params": int(np.prod(q.shape))}  # q: an array or spilled (lazy) values
    if fp32_scale is not None:
        info["fp32_scale"] = fp32_scale
    return out, info


def weight_codes(f, w: np.ndarray, axis: int, high_precision: str):
    """(codes, scales broadcast over w, smallest FP32 scale or None) of a per-channel weight: the one effective
    weight of the written graph and of --auto's gated graph. Where scales below FP16's normal range would hold
    most of the weight energy, the scales stay FP32 (and autocast keeps the layer FP32)."""
    amax = f.weight_amax(w, axis)
    raw = f.scale_of(amax, formats.FP32.name)
    underflow = scales_underflow(amax, raw, high_precision)  # FP16 scales would clamp those weights to ~0
    hp = formats.FP32.name if underflow else high_precision
    if type(f).quantize_weight is Format.quantize_weight:  # its numbers, from the amax found above (not twice)
        scale = raw if hp == formats.FP32.name else f.scale_of(amax, hp)
        q = cast_over(f, w, scale)
    else:
        q, scale = f.quantize_weight(w, axis, hp)
    return q, scale, float(raw.min()) if underflow else None


CAST_PART_BYTES = 16 << 20  # weights above this are cast in parts of rows: a writer job's temporaries are one part's


def cast_over(f, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """f.cast(w / scale) (scale broadcast over w), in parts of rows: elementwise, so the same codes, without a
    w / scale copy and the cast's temporaries of the whole weight (quant.writer counts a job's memory by them)."""
    rows = w.shape[0] if w.ndim else 0
    if rows < 2 or w.nbytes <= CAST_PART_BYTES or np.ndim(scale) != w.ndim:
        return f.cast(w / scale)
    step = max(1, CAST_PART_BYTES // (w.nbytes // rows))
    out = np.empty(w.shape, dtype=f.np_dtype)
    for i in range(0, rows, step):
        out[i:i + step] = f.cast(w[i:i + step] / (scale[i:i + step] if scale.shape[0] == rows else scale))
    return out
