"""Einsum batched matrix products rewritten as Transpose -> MatMul -> Transpose.

Some exporters write attention with Einsum (a diffusion UNet's `bct,bcs->bts` for Q·Kᵀ and `bts,bcs->bct` for
softmax·V). The placement rules, TensorRT's Q/DQ fusion and its fused-attention matcher know MatMul only, so an
Einsum that is a (batched) matrix product, two operands, each letter once per operand, batch letters in both
operands and the output, one free letter per operand and one contracted letter, becomes a MatMul with the
operands transposed to [batch.., M, K] and [batch.., K, N] and the result transposed to the equation's output
order. Transposes that would be the identity are left out. Exact: the same products and sums.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .toposort import toposort
from . import graph as G

log = logging.getLogger(__name__)


def matmul_form(equation: str) -> tuple[list[int] | None, list[int] | None, list[int] | None] | None:
    """(perm of A, perm of B, perm of the MatMul result) for an Einsum equation that is a batched
    matrix product, perms None where the identity; None when the equation is anything else."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    a, b = ops
    if any(len(set(x)) != len(x) for x in (a, b, out)) or set(out) - set(a) - set(b):
        return None
    batch = [c for c in out if c in a and c in b]
    m = [c for c in a if c not in b and c in out]
    n = [c for c in b if c not in a and c in out]
    k = [c for c in a if c in b and c not in out]
    if len(m) != 1 or len(n) != 1 or len(k) != 1 or len(batch) + 2 != len(a) or len(a) != len(b) or len(out) != len(a):
        return None
    a_order, b_order, res = batch + m + k, batch + k + n, batch + m + n

    def perm(src, dst):
        p = [src.index(c) for c in dst]
        return None if p == list(range(len(p))) else p
    return perm(a, a_order), perm(b, b_order), perm(res, out)


_SCORE_OPS = ("Mul", "Div", "Add", "Sub")  # a scalar constant on the scores: rank-free


def _attention_chain(node: gs.Node):
    """Einsum S -> [scalar Mul/Div/Add/Sub] -> Softmax -> Einsum: the nodes after S up to the second Einsum,
    each tensor read once; None when the scores go anywhere else."""
    chain, t = [], node.outputs[0]
    for _ in range(4):
        if len(t.outputs) != 1:
            return None
        r = t.outputs[0]
        chain.append(r)
        if r.op == "Softmax":
            nxt = r.outputs[0].outputs
            return chain + [nxt[0]] if len(nxt) == 1 and nxt[0].op == "Einsum" and nxt[0].inputs[0] is r.outputs[0] else None
        if r.op not in _SCORE_OPS or not any(isinstance(x, gs.Constant) and x.values.size == 1 for x in r.inputs):
            return None
        t = r.outputs[0]
    return None


def _lift_attention(graph: gs.Graph, names: set) -> int:
    """TensorRT-RTX fuses attention only in 4-D ([B, H, S, hd]); an Einsum block over [B·H, ., .] gets a unit
    head axis: operands unsqueezed at axis 1, equations 'bct,bcs->bts' -> 'bXct,bXcs->bXts', the P · V result
    squeezed back. Exact."""
    lifted = 0
    for qk in [n for n in graph.nodes if n.op == "Einsum"]:
        chain = _attention_chain(qk) if len(qk.inputs) == 2 else None
        if chain is None:
            continue
        pv = chain[-1]
        eqs = [str(n.attrs.get("equation", "")).replace(" ", "") for n in (qk, pv)]
        if any(matmul_form(e) is None for e in eqs) or any(t.shape is None or len(t.shape) != 3 for t in list(qk.inputs) + list(pv.inputs)):
            continue
        terms = [t for e in eqs for t in e.replace("->", ",").split(",")]
        if len({t[0] for t in terms}) != 1:
            continue  # the batch letter first everywhere
        new = next(c for c in "hgfeHGFE" if c not in "".join(terms))
        lift = lambda e: ",".join(t[0] + new + t[1:] for t in e.split("->")[0].split(",")) + "->" + (lambda o: o[0] + new + o[1:])(e.split("->")[1])  # noqa: E731
        for node, keep in ((qk, ()), (pv, (0,))):
            node.attrs["equation"] = lift(str(node.attrs["equation"]).replace(" ", ""))
            for i, t in enumerate(list(node.inputs)):
                if i not in keep:
                    node.inputs[i] = _unsqueeze(graph, t, names, node.name)
        for n in chain[:-1]:
            n.outputs[0].shape = None
            if n.op == "Softmax" and int(n.attrs.get("axis", -1)) >= 0:
                n.attrs["axis"] = int(n.attrs["axis"]) + 1
        qk.outputs[0].shape = None
        out = pv.outputs[0]
        o4 = gs.Variable(G.unique_name(f"{pv.name}_4d", names), dtype=out.dtype)
        pv.outputs = [o4]
        graph.nodes.append(gs.Node("Squeeze", name=G.unique_name(f"{pv.name}_squeeze", names),
                                   inputs=[o4, _axes(names)], outputs=[out]))
        lifted += 1
    return lifted


def _axes(names) -> gs.Constant:
    return gs.Constant(G.unique_name("einsum_head_axis", names), np.array([1], np.int64))


def _unsqueeze(graph, t, names, base) -> gs.Variable:
    shape = [t.shape[0], 1, *t.shape[1:]] if t.shape is not None else None
    v = gs.Variable(G.unique_name(f"{base}_4d", names), dtype=t.dtype, shape=shape)
    graph.nodes.append(gs.Node("Unsqueeze", name=G.unique_name(f"{base}_unsqueeze", names), inputs=[t, _axes(names)], outputs=[v]))
    return v


def rewrite(graph: gs.Graph) -> int:
    """Replace every two-operand matrix-product Einsum by MatMul form (softmax first where it is an operand, as
    TensorRT's attention matcher expects P · V). Returns the number rewritten."""
    names = G.taken_names(graph)
    _lift_attention(graph, names)
    count = 0
    for node in list(graph.nodes):
        if node.op != "Einsum" or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        eq = str(node.attrs.get("equation", ""))
        lhs_rhs = eq.replace(" ", "").split("->")
        a, b = node.inputs
        if b.inputs and b.inputs[0].op == "Softmax" and len(lhs_rhs) == 2 and lhs_rhs[0].count(",") == 1:
            x, y = lhs_rhs[0].split(",")
            eq, (a, b) = f"{y},{x}->{lhs_rhs[1]}", (b, a)
        form = matmul_form(eq)
        if form is None:
            continue
        pa, pb, pout = form
        out = node.outputs[0]
        ins = []
        for t, p, tag in ((a, pa, "a"), (b, pb, "b")):
            if p is None:
                ins.append(t)
                continue
            shape = [t.shape[i] for i in p] if t.shape is not None else None
            v = gs.Variable(G.unique_name(f"{node.name}_{tag}T", names), dtype=t.dtype, shape=shape)
            graph.nodes.append(gs.Node("Transpose", name=G.unique_name(f"{node.name}_{tag}_transpose", names),
                                       attrs={"perm": p}, inputs=[t], outputs=[v]))
            ins.append(v)
        node.outputs = []
        if pout is None:
            mm_out = out
        else:
            mm_out = gs.Variable(G.unique_name(f"{node.name}_mm", names), dtype=out.dtype)
        graph.nodes.append(gs.Node("MatMul", name=G.unique_name(f"{node.name}_matmul", names), inputs=ins, outputs=[mm_out]))
        if pout is not None:
            graph.nodes.append(gs.Node("Transpose", name=G.unique_name(f"{node.name}_out_transpose", names),
                                       attrs={"perm": pout}, inputs=[mm_out], outputs=[out]))
        node.inputs = []
        count += 1
    if count:
        toposort(graph.cleanup())
        log.info("rewrote %d Einsum matrix products as MatMul", count)
    return count
