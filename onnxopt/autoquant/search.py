"""The search against a verified target: the error budget of the choice bisected against the metric measured
on held-out batches with the chosen mix (the repair step: a smaller budget promotes the most sensitive layers)."""
from __future__ import annotations

import math

from ..progress import track
from .choose import bits_of, mix_for_error
from .evaluate import Evaluator, Memo


# ---------------------------------------------------------------- search against a verified target
RATIO = 1.15   # the bisection stops when the passing and failing budgets are this close


def search_target(ev: Evaluator, layers: dict, metric: str, target: float, steps: int = 14,
                  progress: bool = True, margin: float = 0.0, split: str = "verify",
                  k: float = 0.0) -> tuple[dict, list]:
    """Largest error budget whose mix meets `target` + `margin` + `k` standard errors of the mean per-sample
    metric on the held-out batches (k = 1.64: the expected metric is above target with ~95% one-sided confidence),
    found from the additive prediction by steps scaled by the measured error (`_step`), then by narrowing the
    bracket in log space; a passing mix that already uses 1/RATIO of the allowed error ends the search (the
    next budget would be at least RATIO up, predicted to miss: one verification less, a full chain at full size). A mix that misses is repaired by the smaller budget, which
    promotes its most sensitive layers first. Returns (mix, trials)."""
    everything = sum(max(l.error.values()) for l in layers.values()) or 1e-6
    b = (1.0 - target) if metric == "cosine" else 10 ** (-target / 10) if metric == "psnr" else 1e-3
    b = min(max(b, 1e-7), everything)
    ev = ev if isinstance(ev, Memo) else Memo(ev)  # nearby budgets often give the same mix
    lo, hi, best, trials = 0.0, None, {n: "none" for n in layers}, []
    at_lo = at_hi = 0.0
    for _ in track(range(steps), total=steps, desc="verifying mixes", enabled=progress, unit="mix"):
        mix = mix_for_error(layers, b)
        got = ev.metrics(ev.gates(mix), split)
        need = margin + k * got.get(f"{metric}_se", 0.0)
        ok = got[metric] >= target + need
        trials.append({"error_budget": b, "predicted_error": sum(layers[n].error[f] for n, f in mix.items()),
                       metric: got[metric], "margin": need, "passed": bool(ok), **bits_of(mix, layers)})
        if ok:
            lo, best, at_lo = b, mix, got[metric]
            if _used(metric, got[metric], target + need) >= 1 / RATIO:
                break  # within RATIO of the allowance: the next budget, RATIO up at least, is predicted to miss
        else:
            hi, at_hi = b, got[metric]
        if hi is None:
            if b >= everything:
                break
            b = min(b * _step(metric, got[metric], target + need, ok), everything)
        elif lo == 0.0:
            b = b * _step(metric, got[metric], target + need, ok)
        else:
            if hi / lo <= RATIO:
                break
            b = lo * (hi / lo) ** _inside(metric, at_lo, at_hi, target + need)
    return best, trials


def _error(metric: str, value: float) -> float | None:
    """What the budget is about proportional to: 1 - cosine, or the MSE ratio 10^(-PSNR/10); None for top-1."""
    if metric == "cosine":
        return 1.0 - value
    if metric == "psnr":
        return 10 ** (-value / 10)
    return None


def _used(metric: str, got: float, need: float) -> float:
    """Share of the allowed error (1 - cosine, MSE ratio) a mix measured at `got` uses; 0 for top-1 (steps)."""
    allowed, err = _error(metric, need), _error(metric, got)
    if allowed is None or allowed <= 0:
        return 0.0
    return err / allowed


def _inside(metric: str, at_lo: float, at_hi: float, need: float) -> float:
    """Where in the bracket [lo, hi] (0..1 in log budget) to try next: for a cosine or PSNR, where the line through
    the two measured errors (log-log) meets the allowance, kept within 0.1..0.9 so the bracket always narrows;
    otherwise (top-1) the middle."""
    if _error(metric, need) is None:
        return 0.5
    allowed, e_lo, e_hi = _error(metric, need), _error(metric, at_lo), _error(metric, at_hi)
    if min(allowed, e_lo, e_hi) <= 0 or e_hi <= e_lo:
        return 0.5
    return min(max(math.log(allowed / e_lo) / math.log(e_hi / e_lo), 0.1), 0.9)


def _step(metric: str, got: float, need: float, ok: bool) -> float:
    """Factor to the next budget before the target is bracketed. A cosine error (or a final-sample MSE) grows
    about in proportion to the budget, so the budget moves by allowed error over measured error instead of by 8;
    at least RATIO and at most 8 either way. Top-1 moves in steps: x8 or /8."""
    if _error(metric, got) is None:
        return 8.0 if ok else 1 / 8
    allowed, err = _error(metric, need), _error(metric, got)
    r = allowed / err if err > 0 and allowed > 0 else (8.0 if ok else 1 / 8)
    return min(max(r, RATIO), 8.0) if ok else max(min(r, 1 / RATIO), 1 / 8)
