"""The search against a verified target: the error budget of the choice bisected against the metric measured
on held-out batches with the chosen mix (the repair step: a smaller budget promotes the most sensitive layers)."""
from __future__ import annotations

import math

from ..progress import track
from .choose import bits_of, mix_for_error
from .evaluate import Evaluator


# ---------------------------------------------------------------- search against a verified target
RATIO = 1.15   # the bisection stops when the passing and failing budgets are this close


def search_target(ev: Evaluator, layers: dict, metric: str, target: float, steps: int = 14,
                  progress: bool = True, margin: float = 0.0, split: str = "verify",
                  k: float = 0.0) -> tuple[dict, list]:
    """Largest error budget whose mix meets `target` + `margin` + `k` standard errors of the mean per-sample
    metric on the held-out batches (k = 1.64: the expected metric is above target with ~95% one-sided confidence),
    found by bisection in log space from the additive prediction. A mix that misses is repaired by the smaller budget, which
    promotes its most sensitive layers first. Returns (mix, trials)."""
    everything = sum(max(l.error.values()) for l in layers.values()) or 1e-6
    b = (1.0 - target) if metric == "cosine" else 1e-3
    b = min(max(b, 1e-7), everything)
    lo, hi, best, trials, seen = 0.0, None, {n: "none" for n in layers}, [], {}
    for _ in track(range(steps), total=steps, desc="verifying mixes", enabled=progress, unit="mix"):
        mix = mix_for_error(layers, b)
        key = tuple(sorted(mix.items()))
        got = seen[key] if key in seen else ev.metrics(ev.gates(mix), split)  # nearby budgets often agree
        seen[key] = got
        need = margin + k * got.get(f"{metric}_se", 0.0)
        ok = got[metric] >= target + need
        trials.append({"error_budget": b, "predicted_error": sum(layers[n].error[f] for n, f in mix.items()),
                       metric: got[metric], "margin": need, "passed": bool(ok), **bits_of(mix, layers)})
        if ok:
            lo, best = b, mix
        else:
            hi = b
        if hi is None:
            if b >= everything:
                break
            b = min(b * 8, everything)
        elif lo == 0.0:
            b = b / 8
        else:
            if hi / lo < RATIO:
                break
            b = math.sqrt(lo * hi)
    return best, trials
