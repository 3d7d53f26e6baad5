"""Clip ranges (amax) from an |x| histogram: max, percentile, entropy (TensorRT's KL) and mse."""
from __future__ import annotations

import math

import numpy as np

from .. import formats
from ..errors import OnnxoptError
from .reducers import Histogram

METHODS = ("max", "percentile", "entropy", "mse")
ENTROPY_LEVELS = 128   # TensorRT's entropy calibrator quantizes the |x| histogram to 128 levels


def amax_from_histogram(h: Histogram, method: str, qtype: str = formats.INT8.name, percentile: float = 99.99) -> float:
    """Clip range for symmetric quantization to format `qtype` (a registered name), chosen by `method`."""
    if h.amax == 0.0:
        return 0.0
    if method == "max":
        return h.amax
    total = h.counts.sum()
    centers = (h.edges[:-1] + h.edges[1:]) / 2
    if method == "percentile":
        cdf = np.cumsum(h.counts) / total
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(h.edges[min(i + 1, h.bins)], h.amax))
    candidates = _candidates(h)
    if method == "mse":
        return float(candidates[int(np.argmin(_quant_mse(centers, h.counts, candidates, qtype)))])
    if method == "entropy":
        return _entropy_amax(h, qtype)
    raise OnnxoptError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")


def _candidates(h: Histogram) -> np.ndarray:
    last = int(np.nonzero(h.counts)[0].max()) + 1
    stop = min(h.edges[last], h.amax)
    return np.unique(np.concatenate([np.geomspace(stop * 1e-3, stop, 160), [h.amax]]))


def _quant_mse(x: np.ndarray, w: np.ndarray, amaxes: np.ndarray, qtype: str, rows: int = 32) -> np.ndarray:
    """Weighted squared error of quantizing the bin centres `x` at each clip range, a block of rows at a time.
    Terms are computed for the non-empty bins only (about 40% of them on SDXL's activations) and summed over
    all bins, zeros included: the same pairwise sums, so the same choice, as one 1-D sum per candidate."""
    f = formats.get(formats.get(qtype).clip_qtype)
    nz = np.flatnonzero(w)
    xs, ws = x[nz], w[nz]
    errs = np.empty(len(amaxes))
    terms = np.zeros((min(rows, len(amaxes)), x.size))
    for i in range(0, len(amaxes), rows):
        s = (np.asarray(amaxes[i:i + rows], np.float64) / f.qmax)[:, None]
        q = f.to_float(f.cast(xs[None, :] / s)).astype(np.float64) * s
        t = terms[:s.shape[0]]
        t[:, nz] = ws * (xs - q) ** 2
        errs[i:i + rows] = np.sum(t, axis=1)
    return errs


def _entropy_amax(h: Histogram, qtype: str) -> float:
    """TensorRT's KL-divergence calibration over the |x| histogram (ENTROPY_LEVELS levels, whatever the format)."""
    levels = ENTROPY_LEVELS
    counts = h.counts.copy()
    # A spike in the first bin (the zeros of a ReLU output) would make KL favour tiny ranges; TensorRT's
    # calibrator flattens it the same way.
    if counts.size > 1:
        counts[0] = counts[1]
    nz = np.nonzero(counts)[0]
    last = int(nz.max()) + 1
    # Work on 2048 bins like TensorRT; fold finer histograms.
    factor = max(1, h.bins // 2048)
    counts = counts.reshape(-1, factor).sum(axis=1)
    last = min(counts.size, math.ceil(last / factor))
    width = h.range / counts.size
    best, best_i = np.inf, last
    start = levels
    for i in range(start, last + 1, max(1, (last - start) // 256 or 1)):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        nzmask = p > 0
        # Quantize the first i bins into `levels` bins, spreading each back over its non-empty source bins.
        idx = (np.arange(i) * levels) // i
        qsum = np.bincount(idx, weights=counts[:i], minlength=levels)
        qnz = np.bincount(idx, weights=(counts[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(counts[:i] > 0, qsum[idx] / np.maximum(qnz[idx], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        pn, qn = p / ps, q / qs
        mask = nzmask & (qn > 0)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask]))) + (1e9 if np.any(nzmask & (qn == 0)) else 0.0)
        if kl < best:
            best, best_i = kl, i
    return float(min((best_i + 0.5) * width, h.amax))
