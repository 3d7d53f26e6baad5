"""Mixed Q/DQ in one strongly typed graph: a per-layer format (layer name -> "fp8" | "int8" | "int4" |
"none"). FP8/INT8 layers get W8A8 Q/DQ placed by the same TensorRT rules as the uniform QDQ pass (each
format's plan, filtered to its layers), INT4 layers blockwise weight-only DequantizeLinear."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import fold
from .. import graph as G
from . import bias_correction, qdq, rules
from . import int4 as int4q

EIGHT_BIT = ("fp8", "int8")
SQ = "int8-sq"   # SmoothQuant, then INT8 W8A8 (onnxopt.autoquant.smooth)


def insert(graph: gs.Graph, formats: dict, configs: dict, amax: dict, means: dict, *, high_precision: str,
           block_size: int = 128, clips: dict | None = None, smooth: dict | None = None) -> dict:
    """Quantize each layer of `graph` in place to its format in `formats`; `configs` are the QDQ options
    each 8-bit format was planned with, `amax` {format: {tensor: amax}}, `clips` AWQ clip ratios of INT4
    layers, `smooth` the SmoothQuant vectors of "int8-sq" layers' inputs. Returns {layer: info}."""
    hp = high_precision
    formats, amax, means, smoothed = _smooth_inputs(graph, formats, smooth or {}, amax, means)
    layers: dict[str, dict] = {}
    plans = {f: rules.plan(graph, configs[f]) for f in EIGHT_BIT if f in formats.values()}
    tensors = graph.tensors()
    names = G.taken_names(graph)
    for f, plan in plans.items():
        residual = {(id(a), i) for a, i in plan.residuals}
        for tname, uses in plan.activations.items():
            mine = [(n, i) for n, i in uses if formats.get(_owner(n, i, residual).name) == f]
            if mine:
                scale = qdq.activation_scale(amax[f][tname], f, hp)
                qdq.insert_activation_qdq(graph, tensors[tname], mine, scale, f,
                                          base=G.unique_name(f"{tname}_{f}", names) if len(plans) > 1 else None)
        done: dict = {}
        for node, idx, const, axis in plan.weights:
            if formats.get(node.name) != f:
                continue
            if const.name not in done:
                src = node.inputs[idx]
                values = fold.effective_weight(node) if src is not const else None
                mean = means.get(_unquantized(node.inputs[0]).name) if node.op in bias_correction.OPS else None
                extra = {}

                def on_error(w, w_deq, node=node, mean=mean):
                    extra["bias_correction"] = bias_correction.apply(graph, node, w, w_deq, mean)
                done[const.name] = qdq.quantize_weight(graph, const, axis, f, hp, values,
                                                       on_error=on_error if mean is not None else None)
                layers[node.name] = {"format": f, **done[const.name][1], **extra}
            node.inputs[idx] = done[const.name][0]
        for node in plan.nodes:
            if formats.get(node.name) == f:
                layers.setdefault(node.name, {"format": f})
    for node in list(graph.nodes):
        if formats.get(node.name) == "int4" and node.op in int4q.OPS:
            w = int4q.to_kn(node, fold.effective_weight(node))
            node.inputs[1], info = int4q.write_weight(graph, node, w, 4, block_size, (clips or {}).get(node.name), hp,
                                                         names)
            layers[node.name] = {"format": "int4", **info}
    for name, how in smoothed.items():
        layers.setdefault(name, {})["format"] = SQ
        layers[name]["smoothing"] = how
    return layers


def _smooth_inputs(graph: gs.Graph, formats: dict, smooth: dict, amax: dict, means: dict):
    """int8-sq layers (SmoothQuant, then INT8): x ⊘ s folded into x's producer where every reader of x is int8-sq
    and the producer is a norm, else a Mul in front of these layers; W ⊙ s. They then quantize as INT8, the
    smoothed activation's range (and bias-correction mean) under its new name. Returns the INT8 view of
    (formats, amax, means) and {layer: how s was folded}."""
    sq = {n for n, f in formats.items() if f == SQ}
    if not sq:
        return formats, amax, means, {}
    amax = {**amax, "int8": dict(amax.get("int8", {}))}
    means, done = dict(means), {}
    by_name = {n.name: n for n in graph.nodes}
    for tname, sm in smooth.items():
        nodes = [by_name[n] for n in sm.layers if n in sq]
        if not nodes:
            continue
        x = nodes[0].inputs[0]
        p = x.inputs[0] if x.inputs else None
        if not (p is not None and p.op in fold._NORMS_LAST + fold._NORMS_CHANNEL and len(x.outputs) == len(nodes)):
            # a private Identity in front of the layers: fold finds no producer to fold into and inserts the Mul
            xi = gs.Variable(G.unique_name(f"{tname}_sq_in", G.taken_names(graph)), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Identity", name=xi.name, inputs=[x], outputs=[xi]))
            for n in nodes:
                n.inputs[0] = xi
        how = fold.fold_input_scale(graph, nodes, sm.s)
        new = nodes[0].inputs[0].name
        amax["int8"][new] = sm.amax
        if tname in means:  # the mean of x ⊘ s, so that bias correction sees what the gated graph saw
            means[new] = np.asarray(means[tname], np.float64).reshape(-1) / sm.s
        for n in nodes:
            done[n.name] = how
    graph.cleanup().toposort()
    return {n: ("int8" if f == SQ else f) for n, f in formats.items()}, amax, means, done


def _unquantized(t: gs.Tensor) -> gs.Tensor:
    """The tensor behind an activation Q/DQ pair (inserted above): bias-correction means are keyed by it."""
    dq = t.inputs[0] if t.inputs else None
    if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0].inputs and dq.inputs[0].inputs[0].op == "QuantizeLinear":
        return dq.inputs[0].inputs[0].inputs[0]
    return t


def _owner(node: gs.Node, idx: int, residual: set) -> gs.Node:
    """The layer an activation use belongs to: the node itself, or for a residual Add the Conv feeding it."""
    if (id(node), idx) in residual:
        return node.inputs[1 - idx].inputs[0]
    return node
