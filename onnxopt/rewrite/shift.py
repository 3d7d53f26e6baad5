"""Channel shift before a symmetric format (Outlier Suppression+, Wei et al. 2023): x W + b = (x - c) W + (b + c W).

INT8 in TensorRT is symmetric (zero point 0), so an activation channel that spans [lo, hi] with lo != -hi wastes
part of the codes: a GELU output spans [-0.17, 17] (half the codes unused), a LayerNorm output's channels sit
off zero by their beta. Subtracting each channel's centre c = (lo + hi) / 2 before the quantizer and adding c W
to the layer's bias is exact in float and halves such a tensor's range (ALBERT stand-in, MiniLM's layer 2 shared
by 12 depths: LayerNorm output 27.6 -> 14.9, GELU output 17.4 -> 8.8; `--int8` output cosine 0.935 -> 0.987).
The Sub is one more pointwise op in front of the quantizer (TensorRT fuses it with the norm or activation before
it). Only MatMul/Gemm readers of a trailing channel axis: a Conv's zero padding would not be shifted.
SmoothQuant decides per activation whether to shift (`smoothquant.smooth`, by the simulated INT8 error).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from ..errors import OnnxoptError
from ..quant import bias_correction
from . import fold

OPS = ("MatMul", "Gemm")


def applicable(node: gs.Node) -> bool:
    """The layer reads its activation's channels on the last axis through a constant 2-D weight, so c W is one
    bias vector: a MatMul with a 2-D weight, or a Gemm without transA."""
    if node.op not in OPS or len(node.inputs) < 2 or G.activation_channel_axis(node) != -1:
        return False
    try:
        return len(fold.effective_shape(node)) == 2
    except OnnxoptError:
        return False


def centre(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Each channel's centre (lo + hi) / 2."""
    return (np.asarray(lo, np.float64) + np.asarray(hi, np.float64)) / 2.0


def half_range(lo: np.ndarray, hi: np.ndarray, c: np.ndarray) -> np.ndarray:
    """max |x - c| per channel for x in [lo, hi]."""
    return np.maximum(np.asarray(hi, np.float64) - c, c - np.asarray(lo, np.float64))


def compensation(node: gs.Node, c: np.ndarray) -> np.ndarray:
    """c W (what the layer's output loses when its input is shifted by -c), in the output's units (Gemm's alpha)."""
    w = np.asarray(fold.effective_weight(node, read_only=True), np.float64)
    if node.op == "Gemm":
        w = w.T if node.attrs.get("transB", 0) else w
        return float(node.attrs.get("alpha", 1.0)) * (c @ w)
    return c @ w


class _NewName:
    def __init__(self, used: set):
        self.used = used

    def new(self, base: str) -> str:
        return G.unique_name(base, self.used)


def _add_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray, names, cache: dict) -> None:
    """bias += delta: the MatMul's following Add constant or Gemm's C (one new constant per old one, weight and
    delta, so readers of a shared weight and bias shifted alike keep sharing one); an Add after a MatMul without a bias."""
    target = bias_correction.bias_target(graph, node)
    if node.op == "Gemm":
        delta = delta / float(node.attrs.get("beta", 1.0))
    if target is None:
        out = node.outputs[0]
        mid = gs.Variable(names.new(out.name + "_unshifted"), dtype=out.dtype, shape=out.shape)
        const = gs.Constant(names.new(node.name + "_shift_bias"), delta.astype(np.float32))
        node.outputs[0] = mid
        graph.nodes.append(gs.Node("Add", name=names.new(node.name + "_shift_bias_add"), inputs=[mid, const], outputs=[out]))
        return
    consumer, idx, const = target
    key = (id(const), fold.weight_key(node), delta.tobytes())
    if key not in cache:
        old = np.zeros(delta.shape, np.float32) if const is None else np.asarray(G.read_values(const), np.float32)
        base = node.name if const is None else const.name
        cache[key] = gs.Constant(names.new(base + "_shift_compensated"), (old + delta).astype(np.float32))
    if const is None:
        consumer.inputs.append(cache[key])
    else:
        consumer.inputs[idx] = cache[key]


def shift_input(graph: gs.Graph, consumers: list[gs.Node], c: np.ndarray, *, taken: set | None = None,
                cache: dict | None = None) -> str:
    """Feed `consumers` (layers reading one activation, all `applicable`) x - c through one inserted Sub and add
    c W to each one's bias. `cache` (kept across calls) lets activations that read one weight and are shifted alike
    share the new bias constant. Exact up to float rounding. Returns a description for the report."""
    x = consumers[0].inputs[0]
    if not all(applicable(n) and n.inputs[0] is x for n in consumers):
        raise OnnxoptError(f"shift_input: every consumer must be a MatMul/Gemm reading '{x.name}'")
    used = G.taken_names(graph) if taken is None else taken
    names = _NewName(used)
    cache = {} if cache is None else cache
    c = np.asarray(c, np.float64).reshape(-1)
    dtype = x.dtype if x.dtype is not None and np.dtype(x.dtype).kind == "f" else np.float32
    const = gs.Constant(names.new(x.name + "_shift"), c.astype(dtype))
    xs = gs.Variable(names.new(x.name + "_shifted"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Sub", name=names.new(x.name + "_shift_sub"), inputs=[x, const], outputs=[xs]))
    for n in consumers:
        delta = compensation(n, c)
        n.inputs[0] = xs
        _add_bias(graph, n, delta, names, cache)
    return f"shifted by the channel centres (Sub '{xs.inputs[0].name}')"
