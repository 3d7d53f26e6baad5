"""The 2:4 report: per weight layer, whether its weight is N:M along its input channels, and the share of
parameters and FLOPs that sits in sparse layers (`onnxopt inspect --check-sparsity`)."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from .sparsity_layers import effective_nonzero, groups_ok, weight_layers, parse_pattern

log = logging.getLogger(__name__)


def report(graph: gs.Graph, pattern: str = "2:4", *, flops: bool = True) -> list[dict]:
    """Per layer with an initializer weight: name, op, weight, shape, axis, eligible (axis a multiple of M),
    is_2_4 (is_n_m for other patterns), params, flops (estimate from the graph's shapes, inferred when missing;
    symbolic dims count 1). `flops=False` skips shape inference (flops then count one output position)."""
    n, m = parse_pattern(pattern)
    shapes = _shapes(graph) if flops else {}
    out = []
    for node, const, chain, axis, reason in weight_layers(graph):
        eligible = reason is None and const.shape[axis] % m == 0
        if reason is None and not eligible:
            reason = f"input-channel axis has {const.shape[axis]} channels, not a multiple of {m}"
        dq = next((p for p in chain if p.op == "DequantizeLinear"), None)
        ok = eligible and groups_ok(effective_nonzero(const, dq), axis, n, m)
        params = int(np.prod(const.shape))
        flops, exact = _flops(node, const.shape, shapes)
        out.append({"name": node.name, "op": node.op, "weight": const.name, "shape": [int(d) for d in const.shape],
                    "axis": axis, "eligible": eligible, "reason": reason, "is_2_4": ok, "params": params,
                    "flops": flops, "flops_exact": exact})
    return out


def summary(rows: list[dict]) -> dict:
    """Shares of weight parameters and FLOPs (over all weight layers) that sit in N:M-sparse layers."""
    params = sum(r["params"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    sp = sum(r["params"] for r in rows if r["is_2_4"])
    sf = sum(r["flops"] for r in rows if r["is_2_4"])
    return {"layers": len(rows), "eligible": sum(r["eligible"] for r in rows), "sparse_layers": sum(r["is_2_4"] for r in rows),
            "params": params, "sparse_params": sp, "param_share": sp / params if params else 0.0,
            "flops": flops, "sparse_flops": sf, "flops_share": sf / flops if flops else 0.0}


def format_report(rows: list[dict]) -> str:
    """A text table of `report` rows (eligible layers) and the summary line."""
    lines = [f"{'layer':<48} {'op':<13} {'shape':<20} {'2:4':<4} {'params':>10} {'GFLOPs':>9}"]
    for r in rows:
        if not r["eligible"]:
            continue
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"{r['name'][-48:]:<48} {r['op']:<13} {shape:<20} {'yes' if r['is_2_4'] else 'no':<4} "
                     f"{r['params']:>10} {r['flops'] / 1e9:>9.3f}")
    s = summary(rows)
    lines.append(f"{s['sparse_layers']}/{s['eligible']} eligible layers are 2:4 ({s['layers']} weight layers); "
                 f"sparse share: {100 * s['param_share']:.1f}% of weight parameters, {100 * s['flops_share']:.1f}% of FLOPs")
    return "\n".join(lines)


def _shapes(graph: gs.Graph) -> dict:
    """Tensor shapes, from the graph or, when layer outputs lack them, from ONNX Runtime's symbolic shape
    inference (it resolves the shape arithmetic of exported 'same' padding), else ONNX's."""
    shapes = {name: t.shape for name, t in graph.tensors().items() if t.shape is not None}

    def known(name):
        return name in shapes and all(isinstance(d, int) for d in shapes[name][2:])
    if all(known(n.outputs[0].name) for n in graph.nodes if n.op in G.WEIGHT_OPS and n.outputs):
        return shapes
    model = gs.export_onnx(graph, do_type_check=False)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # shapes only refine the FLOPs estimate
        log.debug("symbolic shape inference failed (%s); trying ONNX shape inference", e)
        try:
            from onnx import shape_inference
            inferred = shape_inference.infer_shapes(model)
        except Exception as e2:
            log.debug("shape inference failed: %s", e2)
            return shapes
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
        if vi.name not in shapes or not all(isinstance(d, int) for d in shapes[vi.name]):
            shapes[vi.name] = dims
    return shapes


def _flops(node, wshape, shapes) -> tuple[int, bool]:
    """Multiply-adds ×2 per run: weight reuse (output positions) × the weights each position reads."""
    def vol(shape):
        if shape is None:
            return 1, False
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
        return int(np.prod(dims)) if dims else 1, all(isinstance(d, int) and d > 0 for d in shape)
    params = int(np.prod(wshape))
    if node.op == "ConvTranspose":  # each input element meets W.size / C_in weights
        v, exact = vol(shapes.get(node.inputs[0].name))
        return 2 * v * (params // max(int(wshape[0]), 1)), exact and node.inputs[0].name in shapes
    out = shapes.get(node.outputs[0].name)
    if out is None:
        return 2 * params, False
    v, exact = vol(out)
    if node.op == "Conv":  # output [N, K, *sp]: each element reads C/g * prod(kernel) weights
        return 2 * v * (params // max(int(wshape[0]), 1)), exact
    # MatMul / Gemm: each output element reads K weights
    k = int(wshape[-2]) if node.op == "MatMul" else int(wshape[1] if node.attrs.get("transB", 0) else wshape[0])
    return 2 * v * k, exact
