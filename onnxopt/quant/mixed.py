"""Mixed Q/DQ in one strongly typed graph: a per-layer format (layer name -> "fp8" | "int8" | "int4" |
"none"). FP8/INT8 layers get W8A8 Q/DQ placed by the same TensorRT rules as the uniform QDQ pass (each
format's plan, filtered to its layers), INT4 layers blockwise weight-only DequantizeLinear."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import fold
from .. import graph as G
from . import bias_correction, qdq, rules
from . import int4 as int4q

EIGHT_BIT = ("fp8", "int8")


def insert(graph: gs.Graph, formats: dict, configs: dict, amax: dict, means: dict, *, high_precision: str,
           block_size: int = 128, clips: dict | None = None) -> dict:
    """Quantize each layer of `graph` in place to its format in `formats`; `configs` are the QDQ options
    each 8-bit format was planned with, `amax` {format: {tensor: amax}}, `clips` AWQ clip ratios of INT4
    layers. Returns {layer: info}."""
    hp = high_precision
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
                mean = means.get(node.inputs[0].name) if node.op in bias_correction.OPS else None
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
    return layers


def _owner(node: gs.Node, idx: int, residual: set) -> gs.Node:
    """The layer an activation use belongs to: the node itself, or for a residual Add the Conv feeding it."""
    if (id(node), idx) in residual:
        return node.inputs[1 - idx].inputs[0]
    return node
