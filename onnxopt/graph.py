"""Small onnx-graphsurgeon helpers shared by the passes."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import formats

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
VIEW_OPS = ("Cast", "Transpose", "Identity")  # show a constant's values to a layer (cast or permuted)
PASS_THROUGH = VIEW_OPS + formats.dequantize_ops()  # what lies between a layer and its weight initializer


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def weight_of(t: gs.Tensor) -> tuple[gs.Constant | None, list[gs.Node]]:
    """The initializer behind `t`, looking through Cast, Transpose, DequantizeLinear and Identity.
    Returns (constant, chain of nodes passed through, nearest first)."""
    chain = []
    while True:
        if isinstance(t, gs.Constant):
            return t, chain
        p = producer(t)
        if p is None or p.op not in PASS_THROUGH or not p.inputs:
            return None, chain
        chain.append(p)
        t = p.inputs[0]


# (input-channel axis, output-channel axis) of each weighted op's weight (input 1); Gemm with transB swaps them.
_WEIGHT_AXES = {"Conv": (1, 0), "ConvTranspose": (0, 1), "Gemm": (0, 1), "MatMul": (-2, -1)}  # MatMul B [..., K, N]


def _weight_axes(node: gs.Node) -> tuple[int, int]:
    axes = _WEIGHT_AXES.get(node.op, _WEIGHT_AXES["MatMul"])
    return axes[::-1] if node.op == "Gemm" and node.attrs.get("transB", 0) else axes


def weight_input_channel_axis(node: gs.Node) -> int:
    """Axis of the weight (input 1) that runs over the layer's input channels (the reduction axis)."""
    return _weight_axes(node)[0]


def weight_output_channel_axis(node: gs.Node) -> int:
    """Axis of the weight (input 1) that runs over the layer's output channels (per-channel scales)."""
    return _weight_axes(node)[1]


def activation_channel_axis(node: gs.Node) -> int:
    """Channel axis of the layer's data input (input 0)."""
    if node.op in ("Conv", "ConvTranspose"):
        return 1
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return 0
    return -1


def is_float(t: gs.Tensor) -> bool:
    dt = t.dtype
    if dt is None:
        return False
    try:
        return np.dtype(dt).kind == "f"
    except TypeError:
        return False


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def read_values(const: gs.Constant) -> np.ndarray:
    """A constant's values without caching them on the graph, so that big lazy weights are read,
    used and released one at a time."""
    v = const._values
    return v.load() if isinstance(v, gs.ir.tensor.LazyValues) else v


def unique_name(base: str, taken: set) -> str:
    """`base`, or `base_1`, `base_2`, ... whichever is not in `taken` (which then holds it)."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def taken_names(graph: gs.Graph) -> set:
    """Every tensor and node name of `graph`: new names must avoid them."""
    return set(graph.tensors()) | {n.name for n in graph.nodes}


def to_kn(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """A MatMul/Gemm weight as [K, N] (reduction axis first): transposed for a Gemm with transB."""
    return w.T if node.op == "Gemm" and node.attrs.get("transB", 0) else w
