"""Rounding of a weight read at several places (ALBERT's one layer at every depth) for all its uses at once.

A per-channel FP8/INT8 weight rounded to nearest carries one fixed error; a weight that serves 12 depths applies
that same error 12 times, so the errors add up coherently instead of partly cancelling as independent ones
would (tools/albert_shared.py --init minilm: weights-only FP8 output cosine 0.9848 with the shared error,
0.9905 with the same errors shuffled per depth). Such a weight is rounded with error feedback (GPTQ, Frantar et
al. 2023) against H = Σ_uses XᵀX, the Hessian of the output error summed over every layer that reads it: the
rounding minimises Σ_uses ||X_u (W - Q)||², the error accumulated over all uses, not the weight error. The
per-channel scales stay the format's (max |w| per output channel), so the written graph's form is unchanged.
Only weights with several readers are rounded this way: for a weight read once the same Hessian would need one
more statistic per layer for a gain the measurements here did not need.

The layers before or at the first use of weights shared along a path (`leading_layers`) stay high precision: an
error there passes through every later use, so the output is most sensitive to it (the QDQ pass leaves them out
of its plan, option `shared_lead_high_precision`).
"""
from __future__ import annotations

import logging

import numpy as np

from .. import calib, obs, threads
from .. import graph as G

log = logging.getLogger(__name__)

DAMP = 0.01           # GPTQ's damping: 1% of the mean diagonal
OPS = ("MatMul", "Gemm")
SMALL_K = 4096        # up to this many inputs, one BLAS thread per rounding (on the ALBERT stand-in: write 14-18 s -> ~3 s)
LAZY = 128            # rows rounded between two updates of the rest (the same numbers, fewer passes over W)


def _reads_rows(node) -> bool:
    """The layer multiplies rows of input 0 by the [K, N] weight at input 1 (MatMul, Gemm without transA)."""
    return node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transA", 0))


def _inputs(node, axis: int) -> int | None:
    """K, the weight's input-channel count as the layer sees it (after any Transpose/Identity view)."""
    view = node.inputs[1].shape
    k = view[1 - axis] if view is not None and len(view) == 2 else None
    return k if isinstance(k, int) else None


def shared_weights(place) -> dict:
    """{weight constant name: [(node, axis)]} of the 2-D MatMul/Gemm weights in a rules placement that more than
    one planned layer reads (the writer quantizes such a weight once, for all of them)."""
    uses: dict = {}
    for node, idx, const, axis in place.weights:
        if node.op in OPS and idx == 1 and _reads_rows(node) and _inputs(node, axis):
            uses.setdefault(const.name, []).append((node, axis))
    return {c: u for c, u in uses.items() if len(u) > 1 and len({_inputs(n, a) for n, a in u}) == 1}


def hessian_reducers(place, max_bytes: int | None = None) -> tuple[dict, dict]:
    """({input tensor: [reducer]} for the calibration pass, {weight constant name: calib.Hessian}): one Hessian
    per shared weight, fed by the inputs of all its readers, so it sums XᵀX over every use. Weights read by the
    same inputs (ALBERT's Q, K and V projections) share one. Hessians beyond `max_bytes` in all (float64 K x K)
    are not collected: those weights keep nearest rounding (said in the log)."""
    reducers, hessians, by_inputs, used = {}, {}, {}, 0
    for cname, uses in shared_weights(place).items():
        inputs = tuple(dict.fromkeys(n.inputs[0].name for n, _ in uses))
        k = _inputs(*uses[0])
        if inputs not in by_inputs and max_bytes is not None and used + 8 * k * k > max_bytes:
            log.info("%s: its %dx%d Hessian exceeds the memory budget; rounded to nearest", cname, k, k)
            continue
        used += 0 if inputs in by_inputs else 8 * k * k
        if inputs not in by_inputs:
            h = by_inputs[inputs] = calib.Hessian(_inputs(*uses[0]))
            for name in inputs:
                reducers.setdefault(name, []).append(h)
        hessians[cname] = by_inputs[inputs]
    return reducers, hessians


def hessian_values(hessians: dict) -> dict:
    """{weight constant name: H (float64)} of the reducers from `hessian_reducers` once the data has run."""
    return {c: h.mean for c, h in hessians.items() if h.rows}


def round_with_feedback(f, w: np.ndarray, axis: int, scale: np.ndarray, h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Codes of `f` for the 2-D weight `w` (output channels on `axis`) with the fixed per-channel `scale`
    (broadcast over w), rounded one input channel at a time with each channel's error fed back into those not
    yet rounded. Raises obs.SingularHessian when H is not positive definite even with more damping."""
    w_kn = w if axis == 1 else w.T
    s = np.asarray(scale if axis == 1 else scale.T)[0]   # [N]
    q = obs.feedback_round(f, w_kn, s, h, damp, LAZY)
    return q if axis == 1 else q.T


def output_error(w: np.ndarray, w_q: np.ndarray, axis: int, h: np.ndarray) -> float:
    """tr(Dᵀ H D) / tr(Wᵀ H W), D = W - W_q: the output error over all uses relative to the output energy."""
    w_kn = np.asarray(w if axis == 1 else w.T, np.float64)
    d = w_kn - np.asarray(w_q if axis == 1 else w_q.T, np.float64)
    return float(np.sum((h @ d) * d) / max(np.sum((h @ w_kn) * w_kn), 1e-30))


def codes(f, w: np.ndarray, axis: int, scale: np.ndarray, q: np.ndarray, h: np.ndarray, name: str = "") -> np.ndarray:
    """`round_with_feedback`'s codes when they lower the output error summed over the uses, else `q` (the
    nearest-rounded codes; also when H stays singular, said in the log)."""
    if w.ndim != 2 or np.ndim(scale) != 2 or np.size(scale) != w.shape[axis]:   # one scale per output channel only
        return q
    try:
        with threads.one_blas_thread(h.shape[0] <= SMALL_K):   # the writer runs several at once on its threads
            fb = round_with_feedback(f, w, axis, scale, h)
    except obs.SingularHessian as e:
        log.warning("%s: %s; rounding to nearest", name, e)
        return q
    before = output_error(w, f.dequantize(q, scale), axis, h)
    after = output_error(w, f.dequantize(fb, scale), axis, h)
    log.debug("%s: output error over all uses %.3g -> %.3g with error feedback", name, before, after)
    return fb if after < before else q


LEAD_MAX = 0.25       # at most this share of the planned layers kept high precision before shared weights
LEAD_REASON = "before or at the first use of a weight later layers share: kept high precision (quant.shared_rounding)"


def _downstream(node, target, limit: int) -> bool:
    """`target` reads, directly or through other nodes, an output of `node` (a walk of at most `limit` nodes)."""
    seen, todo = {id(node)}, [node]
    while todo and len(seen) <= limit:
        for t in todo.pop().outputs:
            for r in t.outputs:
                if r is target:
                    return True
                if id(r) not in seen:
                    seen.add(id(r))
                    todo.append(r)
    return False


def leading_layers(graph, place) -> list[str]:
    """Names of the planned layers that come before or at the first use of a weight read again further down the
    same path (ALBERT's one layer at every depth; not parallel branches reading one weight). An error there passes
    through every later use of the shared weights, so the output is most sensitive to it (ALBERT stand-in: the
    output's gradient energy at the first depth 6x the mean over depths, 60x the last's; keeping these layers
    high precision took FP8 0.9892 -> 0.9935). The first use is the graph's, planned or not (an `--exclude`d depth 0
    moved the cut to the first planned use, depth 3, and then nothing was kept). Empty where no weight is shared
    along a path."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    consts = {c.name: c for _, _, c, _ in place.weights}
    readers: dict = {}   # every reader in the graph, planned or not: an excluded first use is still the first use
    for n in graph.nodes:
        if n.op in OPS and len(n.inputs) > 1:
            c, _ = G.weight_of(n.inputs[1])
            if c is not None:
                readers.setdefault(id(c), []).append(n)
    firsts = []
    for cname, uses in shared_weights(place).items():
        every = readers.get(id(consts[cname]), []) + [n for n, _ in uses]
        nodes = sorted({id(n): n for n in every}.values(), key=lambda n: order[id(n)])
        if len(nodes) > 1 and _downstream(nodes[0], nodes[1], len(graph.nodes)):
            firsts.append(order[id(nodes[0])])
    if not firsts:
        return []
    cut = max(firsts)
    lead = [n.name for n in place.nodes if order[id(n)] <= cut]
    if len(lead) > len(place.nodes) * LEAD_MAX:   # the shared weights start late: not a prefix worth its cost
        log.info("%d of %d layers precede the first use of shared weights; all stay quantized", len(lead), len(place.nodes))
        return []
    return lead
