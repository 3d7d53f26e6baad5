"""Attention NaN guards: `Where(IsNaN(softmax), 0, softmax)` removed so that quantized attention fuses.

PyTorch's SDPA exports (transformers' default attention) guard the attention probabilities against the
NaN a softmax gives on a row that is masked entirely with -inf:

    P = Softmax(S);  P' = Where(IsNaN(P), 0, P);  O = P' · V

TensorRT fuses Q·Kᵀ -> Softmax -> Q/DQ -> ·V into one attention kernel (`_gemm_mha_v2`) only when the
softmax output feeds the Q/DQ directly; with the Where in between, quantized attention runs as separate
GEMMs (MiniLM: 0 of 6 fused). The rewrite reads P' as P: numerically equal whenever P has no NaN, i.e.
for every finite input. Exported masks are finite (a large negative constant, saturated in FP16), so a
fully masked row gives a uniform softmax rather than NaN and the guard never fires.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


def _is_zero(t) -> bool:
    if isinstance(t, gs.Constant):
        v = t.values
    elif t.inputs and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
        v = t.inputs[0].attrs["value"].values
    else:
        return False
    v = np.asarray(v)
    return v.size <= 1 or not np.any(v)  # small constants only: never read a big weight here


def find(graph: gs.Graph) -> list[gs.Node]:
    """The Where nodes that guard a Softmax output: Where(IsNaN(P), 0, P) with P = Softmax(...)."""
    out = []
    for w in graph.nodes:
        if w.op != "Where" or len(w.inputs) != 3:
            continue
        cond, zero, p = w.inputs
        isnan = cond.inputs[0] if cond.inputs else None
        if (isnan is not None and isnan.op == "IsNaN" and isnan.inputs[0] is p and p.inputs
                and p.inputs[0].op == "Softmax" and _is_zero(zero)):
            out.append(w)
    return out


def remove(graph: gs.Graph) -> int:
    """Rewire every guarded softmax's consumers to the softmax itself; returns how many guards went."""
    guards = find(graph)
    outputs = {t.name for t in graph.outputs}
    n = 0
    for w in guards:
        guarded, p = w.outputs[0], w.inputs[2]
        if guarded.name in outputs:
            continue  # a graph output keeps its exact semantics
        for c in list(guarded.outputs):
            for i, t in enumerate(c.inputs):
                if t is guarded:
                    c.inputs[i] = p
        n += 1
    if n:
        graph.cleanup()
        log.info("removed %d attention NaN guard(s) Where(IsNaN(softmax), 0, softmax)", n)
    return n
