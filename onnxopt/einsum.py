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

import onnx_graphsurgeon as gs

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


def rewrite(graph: gs.Graph) -> int:
    """Replace every two-operand matrix-product Einsum by MatMul form (softmax first where it is an operand, as
    TensorRT's attention matcher expects P · V). Returns the number rewritten."""
    names = G.taken_names(graph)
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
        graph.cleanup().toposort()
        log.info("rewrote %d Einsum matrix products as MatMul", count)
    return count
