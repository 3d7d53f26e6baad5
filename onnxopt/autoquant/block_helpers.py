"""Accuracy helpers of the W4A4 block candidates (NVFP4) of --auto, fitted on the search split so that each
candidate is cheaper in error before the search weighs it:

- smoothing (opt-in; SmoothQuant-style, per layer): x ⊘ s quantized, s ⊙ W quantized, s = max|x_j|^a / max|W_j|^(1-a); a
  from (none, 0.25, 0.5, 0.75) by the simulated W4A4 output error on sampled input rows (the format's own
  numerics); written as a Mul in front of the layer's dynamic quantizer (quant.writer.Smooth);
- AWQ's clip search and error-feedback rounding (`awq.apply`, method clip) of the (scaled) weight; error feedback
  only with at least FEEDBACK_ROWS_PER_K calibration rows per input channel (FP8's rule, quant.feedback): with fewer it
  fitted the search split and lost on held-out data (MiniLM, BENCHMARKS.md "NVFP4 candidates on more calibration data").

No scale is folded into the graph: every other candidate sees the FP32 model. The gated graph and the writer
quantize with these, so the measured sensitivities are those of the helped candidate.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import calib, formats
from ..rewrite import awq, fold
from .. import graph as G
from ..quant.feedback import MIN_ROWS_PER_K as FEEDBACK_ROWS_PER_K
from ..quant.writer import Smooth
from .candidates import Candidates

ALPHAS = (0.25, 0.5, 0.75)
ROWS = 1024          # sampled input rows per activation for the smoothing choice
GAIN = 0.97          # smoothing is kept only when it lowers the simulated error by at least 3%


def block_awq(graph: gs.Graph, data, cands: Candidates, fmts_wanted, *, high_precision: str, provider: str,
              memory_budget_mb: int, progress: bool, smooth: bool = False) -> None:
    """Fill `cands.block_smooth` (with `smooth`) and `cands.block_clips` for every candidate of a W4A4 block
    format with AWQ (NVFP4, and its weight-only form), from `data` (the search split). AWQ's clip search and error
    feedback minimise the output error of the unquantized input through its Gram matrix, so two formats with the
    same weight numerics (nvfp4 and nvfp4-wo) and no input scaling get the same result: computed once."""
    done: dict = {}  # weight numerics -> {layer: clips} of an unscaled search
    for f in fmts_wanted:
        fmt = formats.get(f)
        if not fmt.block_weight or not fmt.awq:
            continue
        nodes = [n for n in graph.nodes if n.name in cands.layers and f in cands.layers[n.name].formats]
        if not nodes:
            continue
        if smooth and fmt.activations == "dynamic":  # the W4A4 input scaling (weight-only: nothing to balance)
            for n, sm in _smoothing(graph, data, nodes, fmt, provider, memory_budget_mb, progress).items():
                cands.block_smooth[(n, f)] = sm
        pre = {n: sm.s for (n, g), sm in cands.block_smooth.items() if g == f}
        key = (type(fmt), fmt.block_size, fmt.awq_ratios_above)
        known = done.get(key, {}) if not pre else {}
        todo = [n for n in nodes if n.name not in known]
        clips = {}
        if todo:
            _, clips = awq.apply(graph, data, [(n, fmt) for n in todo], method="clip", feedback=True,
                                 block_size=fmt.block_size, high_precision=high_precision, provider=provider,
                                 memory_budget_mb=memory_budget_mb, progress=progress, prescale=pre,
                                 feedback_rows_per_k=FEEDBACK_ROWS_PER_K)
        clips = {**{n.name: known[n.name] for n in nodes if n.name in known}, **clips}
        if not pre:
            done.setdefault(key, {}).update(clips)
        cands.block_clips.update({(n, f): c for n, c in clips.items()})


def input_samples(graph, data, nodes, provider, memory_budget_mb, progress) -> dict:
    """{input tensor name: (per-channel max |x|, sampled rows)} of the layers `nodes` (one calibration pass)."""
    names = list(dict.fromkeys(n.inputs[0].name for n in nodes))
    stats = {x: (calib.ChannelAbsMax(-1), calib.RowSample(-1, ROWS, len(data), seed=i)) for i, x in enumerate(names)}
    calib.collect_graph(graph, data, {x: list(r) for x, r in stats.items()}, provider=provider,
                        memory_budget_mb=memory_budget_mb, progress=progress, desc="w4a4: smoothing statistics")
    return {x: (r[0].value, r[1].value) for x, r in stats.items()}


def _smoothing(graph, data, nodes, fmt, provider, memory_budget_mb, progress) -> dict:
    """{layer: Smooth} where scaling lowers the simulated output error (one pass: channel max and row samples)."""
    stats = input_samples(graph, data, nodes, provider, memory_budget_mb, progress)
    out = {}
    for n in nodes:
        cmax, rows = stats[n.inputs[0].name]
        if cmax is None or not len(rows):
            continue
        w = G.to_kn(n, fold.effective_weight(n)).astype(np.float32)
        if w.shape[0] != len(cmax):
            continue
        sm = choose(rows, cmax, w, fmt)
        if sm is not None:
            out[n.name] = sm
    return out


def smoothing_scales(cmax: np.ndarray, w_kn: np.ndarray):
    """(alpha, s) for each of ALPHAS: s = max|x_j|^a / max|W_j|^(1-a), geometric mean 1."""
    wmax = np.maximum(np.abs(w_kn).max(axis=1), 1e-12)
    c = np.maximum(cmax, 1e-12)
    for a in ALPHAS:
        s = np.clip(c ** a / wmax ** (1 - a), 1e-4, 1e4)
        yield a, (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: values stay near their range


def choose(rows: np.ndarray, cmax: np.ndarray, w_kn: np.ndarray, fmt) -> Smooth | None:
    """The smoothing of one layer with the least simulated W4A4 output error on `rows`, None if none beats
    plain quantization by GAIN."""
    y = rows @ w_kn
    norm = max(float(np.sum(y.astype(np.float64) ** 2)), 1e-30)
    amax = float(cmax.max())

    def err(s):
        xs, ws, a = (rows, w_kn, amax) if s is None else (rows / s, w_kn * s[:, None], float((cmax / s).max()))
        yq = fmt.fake_quant_activation(xs, a) @ fmt.fake_quant(ws, 1, "fp32")
        return float(np.sum((yq - y).astype(np.float64) ** 2)) / norm
    best, best_err = None, err(None)
    for a, s in smoothing_scales(cmax, w_kn):
        e = err(s)
        if e < best_err * (GAIN if best is None else 1.0):
            best, best_err = Smooth(s, float((cmax / s).max()), a), e
    return best
