"""Bias correction (Nagel et al., "Data-Free Quantization", 2019): quantizing a weight shifts the expected
layer output by ΔW·E[x]. Subtracting that shift from the bias removes the systematic part of the error,
which dominates in depthwise convolutions (few weights per output channel, MobileNet/EfficientNet)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G


# Convolutions and Gemm see the same weight error at every position, the case the method was made for;
# transformer MatMuls mix padded and real tokens, whose means differ, and gain nothing measurable.
OPS = ("Conv", "ConvTranspose", "Gemm")


def input_axis(node: gs.Node) -> int:
    return G.activation_channel_axis(node)


def input_rank(node: gs.Node) -> int | None:
    """A convolution's input has its weight's rank, whatever shape inference managed to tell."""
    w = node.inputs[1]
    if node.op in ("Conv", "ConvTranspose") and w.shape is not None:
        return len(w.shape)
    return None


def output_shift(node: gs.Node, dw: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Expected change of each output channel for a weight change `dw` and input channel means `mean`."""
    if node.op == "Conv":
        k, cg = dw.shape[:2]
        groups = int(node.attrs.get("group", 1))
        if mean.size != cg * groups:
            return None
        per = dw.reshape(k, cg, -1).sum(axis=2)                      # [K, C/g]
        m = mean.reshape(groups, cg)[np.arange(k) // (k // groups)]  # [K, C/g]
        return (per * m).sum(axis=1)
    if node.op == "ConvTranspose":
        if int(node.attrs.get("group", 1)) != 1 or mean.size != dw.shape[0]:
            return None
        return np.einsum("ck,c->k", dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2), mean)
    if node.op == "Gemm":
        return (dw @ mean) if node.attrs.get("transB", 0) else (mean @ dw)
    if node.op == "MatMul" and dw.ndim == 2:
        return mean @ dw
    return None


def bias_target(graph: gs.Graph, node: gs.Node):
    """(consumer, input index, constant) holding the layer's bias, creating a zero bias for Conv/Gemm
    without one; MatMul's bias is the constant operand of a following Add. None if there is none."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            return node, 2, node.inputs[2]
        if len(node.inputs) == 2:
            return node, 2, None
        return None
    if node.op == "MatMul":
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            for i, t in enumerate(add.inputs):
                if isinstance(t, gs.Constant) and t.shape is not None and len(t.shape) == 1:
                    return add, i, t
    return None


def apply(graph: gs.Graph, node: gs.Node, w: np.ndarray, w_deq: np.ndarray, mean: np.ndarray) -> float | None:
    """Fold -ΔW·E[x] into the bias of `node`. Returns the largest correction, or None if not applicable."""
    return apply_shift(graph, node, output_shift(node, w_deq - w, np.asarray(mean, dtype=np.float64)))


def apply_shift(graph: gs.Graph, node: gs.Node, shift: np.ndarray | None) -> float | None:
    """Subtract `shift` (from `output_shift`) from the bias of `node`. Returns the largest correction, or None
    if not applicable."""
    if shift is None:
        return None
    target = bias_target(graph, node)
    if target is None:
        return None
    consumer, idx, const = target
    bias = np.zeros(shift.shape, np.float32) if const is None else np.asarray(G.read_values(const), np.float32)
    if bias.shape != shift.shape:
        return None
    new = gs.Constant(f"{node.name}_bias_corrected" if const is None else f"{const.name}_corrected",
                      (bias - shift).astype(np.float32))
    if const is None:
        consumer.inputs.append(new)
    else:
        consumer.inputs[idx] = new
    return float(np.max(np.abs(shift))) if shift.size else 0.0
