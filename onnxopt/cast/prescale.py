"""Scale-invariant pre-scaling: a tensor beyond FP16's range whose readers are only normalisations (and linear
ops leading to them) is divided by a power of two k, folded into the weights, biases and Q/DQ scales that make
it, so that FP16 holds it and no FP32 island is needed there (issue 22: a diffusion UNet's residual stream
reaching 1e11 before each GroupNorm).

Tensors joined by ops that commute with a positive scale (Add/Sub of two such tensors, Concat, Reshape, Resize,
pooling, Relu, Q -> DQ with its scale divided by k, Mul/Div by a constant, Add/Sub of a constant divided by k)
form one class with one k. A class ends at a weighted layer (Conv, ConvTranspose, Gemm, MatMul with a constant
or dequantized-constant weight: its weights take k_in / k_out, its bias 1 / k_out) or at a normalisation input
(InstanceNorm/LayerNorm/GroupNorm: scale-invariant). Anything else reading or making a class tensor (graph I/O,
Sigmoid, a product of two activations, ...) pins the class at k = 1. All factors are powers of two: exact in
FP32, and in FP16 while no weight or scale leaves its normal range (checked, else the class stays unscaled).

Epsilon: norm(x / k) with epsilon e equals norm(x) with epsilon e·k², so the normalisation gets e / k² (the
same function in exact arithmetic), floored at 2^-24 (FP16's smallest subnormal) so that a group of zero
variance still gives 0, not 0/0, in FP16; with the class's values scaled to at most TARGET that floor is
below 1e-8 of the variance of any group holding a value near its maximum.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..toposort import toposort
from .. import graph as G
from .. import modelfile
from . import precision

log = logging.getLogger(__name__)

TARGET = 2.0 ** 6   # a scaled class's max |x|: its norms' inputs pass precision's squares rule (x² within FP16)
LOWEST = 2.0 ** -4  # no member's max |x| below this after scaling (FP16 keeps ~11 bits down to 6e-5)
EPS_FLOOR = 2.0 ** -24
UNDERFLOW_ENERGY = 1e-4  # share of a weight's energy allowed in channels whose scale falls below FP16's normals
_FP16_TINY = float(np.finfo(np.float16).tiny)
_MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Split", "Concat", "Resize",
          "Upsample", "AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool", "Relu", "DepthToSpace",
          "SpaceToDepth", "ReduceMean", "ReduceMax", "ReduceMin", "Tile", "Expand", "Dropout", "Neg", "Max", "Min",
          "Gather"}
_NORMS = {"InstanceNormalization", "LayerNormalization", "GroupNormalization"}
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class Plan:
    """What `rescale` did: per scaled class its k and members (tensor names)."""
    classes: list = field(default_factory=list)  # (k, [tensor names], max range before)
    fp32_nodes: list = field(default_factory=list)  # vector Gemms that took a factor FP16 weights cannot hold

    @property
    def tensors(self) -> int:
        return sum(len(m) for _, m, _ in self.classes)


def rescale(graph: gs.Graph, ranges: dict[str, float], dtype: str = "fp16") -> tuple[dict[str, float], Plan]:
    """Scale classes beyond `dtype`'s safe range down in place. Returns the ranges after scaling and the plan."""
    plan = Plan()
    if dtype not in precision.FMAX:
        return ranges, plan
    safe = precision.FMAX[dtype] * precision.SAFE_FRACTION
    rng = precision.tensor_ranges(graph, ranges)
    parent: dict[str, str] = {}
    tensors: dict[str, gs.Variable] = {}

    def find(n):
        if n not in parent:
            return n
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def add(t):
        if isinstance(t, gs.Variable) and t.name and G.is_float(t):
            parent.setdefault(t.name, t.name)
            tensors[t.name] = t
            return t.name
        return None

    def union(ts):
        names = [n for n in (add(t) for t in ts) if n]
        for n in names[1:]:
            parent[find(n)] = find(names[0])

    pinned: set[str] = set()
    layers, norms, sigmoids = [], [], []
    for node in graph.nodes:
        role = _role(node)
        if role == "move":
            union([t for t in node.inputs if isinstance(t, gs.Variable)] + list(node.outputs))
        elif role == "qdq":
            union([node.inputs[0]] + [o for q in node.outputs for dq in q.outputs for o in dq.outputs])
        elif role == "layer":
            layers.append(node)
            add(_data(node)), add(node.outputs[0])
        elif role == "norm":
            norms.append(node)
            add(node.inputs[0])
            pinned |= {n for n in (add(o) for o in node.outputs) if n}  # unit scale already
        elif role == "sigmoid":  # sigmoid(k · (x / k)): its input class may scale, its output is in [0, 1]
            sigmoids.append(node)
            add(node.inputs[0])
            pinned |= {n for n in (add(o) for o in node.outputs) if n}
        elif role == "product":  # a · b with b / k is (a · b) / k: the larger side carries the class, a stays
            a, b = sorted(node.inputs[:2], key=lambda t: rng.get(t.name) or 0.0)
            union([b, node.outputs[0]])
            pinned |= {n for n in [add(a)] if n}
        elif role == "other":
            pinned |= {n for n in (add(t) for t in list(node.inputs) + list(node.outputs)) if n}
    pinned |= {n for n in (add(t) for t in list(graph.inputs) + list(graph.outputs)) if n}
    pinned_roots = {find(n) for n in pinned}
    members: dict[str, list[str]] = {}
    for n in parent:
        members.setdefault(find(n), []).append(n)

    k: dict[str, float] = {}
    for root, names in members.items():
        if root in pinned_roots:
            continue
        vals = [rng[n] for n in names if rng.get(n) is not None and math.isfinite(rng[n]) and rng[n] > 0]
        if not vals or max(vals) <= safe:
            continue
        exp = min(math.ceil(math.log2(max(vals) / TARGET)), math.floor(math.log2(min(vals) / LOWEST)))
        if exp > 0:
            k[root] = 2.0 ** exp
    # A layer whose weights or scales would leave the format's normal range keeps its classes unscaled.
    # ... unless the layer stays FP32 anyway (its output leaves FP16 and cannot be scaled): FP32 weights fit.
    fp32 = {id(lay) for lay in layers if find(lay.outputs[0].name) in pinned_roots and (rng.get(lay.outputs[0].name) or 0) > safe}
    # ... or it is a Gemm on vectors (a time-embedding projection: [batch, features]): kept FP32, it takes any factor.
    vector_fp32 = {id(lay) for lay in layers if lay.op == "Gemm" and not _fits(lay, _factor(lay, k, find), _kout(lay, k, find), safe)}
    fp32 |= vector_fp32
    for _ in range(len(k) + 1):
        bad = [lay for lay in layers
               if id(lay) not in fp32 and not _fits(lay, _factor(lay, k, find), _kout(lay, k, find), safe)]
        if not bad:
            break
        for lay in bad:
            k.pop(find(_data(lay).name), None), k.pop(find(lay.outputs[0].name), None)
    if not k:
        return ranges, plan
    new_ranges = _apply(graph, k, find, layers, norms, sigmoids, rng)
    plan.fp32_nodes = [lay.name for lay in layers if id(lay) in vector_fp32 and (_factor(lay, k, find) != 1.0 or _kout(lay, k, find) != 1.0)]
    out = dict(ranges)
    out.update(new_ranges)
    for root, f in k.items():
        for n in members[root]:
            if n in out:
                out[n] = out[n] / f
        top = max((rng.get(n) or 0.0) for n in members[root])
        plan.classes.append((f, sorted(members[root]), top))
        log.info("pre-scaled %d tensors by 1/%g (max |x| %.3g -> %.3g) before scale-invariant readers",
                 len(members[root]), f, top, top / f)
    return out, plan


def _role(node) -> str:
    op = node.op
    var = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
    if op in ("Shape", "Size"):
        return "neutral"  # reads the shape only
    if op in _MOVES:
        return "move" if not (op == "Gather" and node.inputs[0] not in var) else "other"
    if op in ("Add", "Sub"):
        return "move" if var else "other"
    if op in ("Mul", "Div") and len(var) == 1 and (op == "Mul" or node.inputs[0] is var[0]) and _const_in(node):
        return "layer"
    if op == "Sigmoid" and len(var) == 1:
        return "sigmoid"
    if op == "Mul" and len(var) == 2 and var[0] is not var[1] and all(G.is_float(t) for t in var):
        return "product"  # x·c, x/c: c takes the factor, so the classes on both sides may differ (SmoothQuant's Mul)
    if op == "QuantizeLinear":
        if isinstance(node.inputs[1], gs.Constant) and all(dq.op == "DequantizeLinear" for dq in node.outputs[0].outputs):
            return "qdq"
        return "other"
    if op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
        return "neutral"  # a weight: its layer's factor scales it
    if op == "DequantizeLinear" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "QuantizeLinear":
        return "neutral" if _role(node.inputs[0].inputs[0]) == "qdq" else "other"  # joined at its Q
    if op in _WEIGHTED and _weight(node) is not None and isinstance(node.inputs[0], gs.Variable):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None or isinstance(bias, gs.Constant):
            return "layer"
    if op in _NORMS and all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t is not None and t.name):
        return "norm"
    return "other"


def _const_in(node):
    return next((t for t in node.inputs if isinstance(t, gs.Constant)), None)


def _data(node):
    """A layer's activation input."""
    if node.op in ("Mul", "Div"):
        return next(t for t in node.inputs if not isinstance(t, gs.Constant))
    return node.inputs[0]


def _weight(node):
    """The weight input: a constant, or a DequantizeLinear of constants read only by this layer."""
    if node.op in ("Mul", "Div"):
        return _const_in(node)
    if len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if isinstance(w, gs.Constant):  # Gemm too: alpha would apply after a product that may overflow FP16
        return w
    p = G.producer(w)
    if p is not None and p.op == "DequantizeLinear" and all(isinstance(t, gs.Constant) for t in p.inputs) and len(w.outputs) == 1:
        return p
    return None


def _factor(layer, k, find) -> float:
    """What the layer's weight is multiplied by (Div: its divisor divided by)."""
    return k.get(find(_data(layer).name), 1.0) / _kout(layer, k, find)


def _kout(layer, k, find) -> float:
    return k.get(find(layer.outputs[0].name), 1.0)


def _fits(layer, f: float, kout: float, safe: float) -> bool:
    if f == 1.0 and kout == 1.0:
        return True
    w = _weight(layer)
    if isinstance(w, gs.Constant):
        v = np.abs(np.asarray(G.read_values(w), np.float64))
        if layer.op == "Div":
            v = 1.0 / np.maximum(v, 1e-30)
        return float(v.max(initial=0.0)) * f <= safe and float(np.median(v)) * f >= _FP16_TINY
    s = np.abs(np.asarray(G.read_values(w.inputs[1]), np.float64)) * f
    # Channels whose scale leaves FP16's normal range lose precision: allowed for weak ones only (SmoothQuant
    # leaves a few), as in quant.qdq's weight-scale rule.
    energy = np.square(s)
    weak = float(energy[s < _FP16_TINY].sum()) <= UNDERFLOW_ENERGY * float(energy.sum())
    return float(s.max(initial=0.0)) <= safe and weak


def _apply(graph, k, find, layers, norms, sigmoids, rng) -> dict[str, float]:
    names = G.taken_names(graph)
    added = {}
    for sg in sigmoids:  # sigmoid(x) = sigmoid(k · (x / k)): the Mul by k (exact, a power of two) beside it
        f = k.get(find(sg.inputs[0].name))
        if f:
            x = sg.inputs[0]
            up = gs.Variable(G.unique_name(f"{x.name}_unscaled", names), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Mul", name=G.unique_name(f"{sg.name}_unscale", names),
                                       inputs=[x, modelfile.constant(G.unique_name(f"{sg.name}_k", names), np.asarray(f, np.float32))],
                                       outputs=[up]))
            sg.inputs[0] = up
            added[up.name] = rng.get(x.name) or 0.0
    for node in graph.nodes:
        if node.op in ("Add", "Sub") and _role(node) == "move":
            f = k.get(find(node.outputs[0].name))
            if f:
                for i, t in enumerate(node.inputs):
                    if isinstance(t, gs.Constant):
                        node.inputs[i] = _scaled_const(t, 1.0 / f, names)
        elif node.op == "QuantizeLinear" and _role(node) == "qdq":
            f = k.get(find(node.inputs[0].name))
            if f:
                done: dict[int, gs.Constant] = {}
                for n in [node] + [dq for dq in node.outputs[0].outputs]:
                    s = n.inputs[1]
                    n.inputs[1] = done.setdefault(id(s), _scaled_const(s, 1.0 / f, names))
    for lay in layers:
        f, kout = _factor(lay, k, find), _kout(lay, k, find)
        if f == 1.0 and kout == 1.0:
            continue
        w = _weight(lay)
        if isinstance(w, gs.Constant):
            i = next(j for j, t in enumerate(lay.inputs) if t is w)
            lay.inputs[i] = _scaled_const(w, 1.0 / f if lay.op == "Div" else f, names)
        else:  # DequantizeLinear: its own copy with the scale multiplied (the codes are unchanged)
            out = gs.Variable(G.unique_name(f"{lay.inputs[1].name}_prescaled", names), dtype=lay.inputs[1].dtype,
                              shape=lay.inputs[1].shape)
            ins = list(w.inputs)
            ins[1] = _scaled_const(ins[1], f, names)
            graph.nodes.append(gs.Node("DequantizeLinear", name=G.unique_name(f"{w.name}_prescaled", names),
                                       inputs=ins, outputs=[out], attrs=dict(w.attrs)))
            lay.inputs[1] = out
        if kout != 1.0 and len(lay.inputs) > 2 and isinstance(lay.inputs[2], gs.Constant):
            lay.inputs[2] = _scaled_const(lay.inputs[2], 1.0 / kout, names)
    for norm in norms:
        f = k.get(find(norm.inputs[0].name))
        if f:
            eps = float(norm.attrs.get("epsilon", 1e-5))
            norm.attrs["epsilon"] = max(eps / (f * f), EPS_FLOOR)
    if sigmoids:
        toposort(graph)
    return added


def _scaled_const(c: gs.Constant, f: float, names: set) -> gs.Constant:
    v = np.asarray(G.read_values(c))
    return modelfile.constant(G.unique_name(f"{c.name}_prescaled", names), np.asarray(v * np.asarray(f, v.dtype), dtype=v.dtype))
