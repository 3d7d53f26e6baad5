"""Cost model (weight bits over parameters, activation bits over MACs) and the choice of a mix: a Lagrangian
relaxation of the knapsack and local moves (search.py bisects its error budget against the verified metric).
Tied layers (`Layer.group`, set by groups.py) are chosen as one unit (`groups.unit`): the formats its leaders
share, the sum of their errors and of their costs; every member gets the unit's format (a follower its
`groups.member_format`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .candidates import ABITS, BRANCH_BITS, Layer, base_format, has_branch
from .groups import member_format, unit


# ---------------------------------------------------------------- cost model and choice
@dataclass
class Totals:
    params: float
    macs: float


def totals(layers: dict) -> Totals:
    return Totals(max(sum(l.params for l in layers.values()), 1), max(sum(l.macs for l in layers.values()), 1.0))


def bits_of(mix: dict, layers: dict) -> dict:
    """Weight bits averaged over the parameters of all weighted layers (low-rank branches' 16-bit factors
    included), activation bits over their MACs (branch MACs at 16 bits), and the share of MACs (branches'
    included) that run in 8 bits or fewer; the branches' bytes and MACs on their own."""
    t = totals(layers)
    w = sum(l.weight_bits(mix[n]) for n, l in layers.items()) / t.params
    a = sum(l.activation_bits(mix[n]) for n, l in layers.items()) / t.macs
    branch_macs = sum(l.branch_macs(mix[n]) for n, l in layers.items())
    low = sum(l.macs for n, l in layers.items() if ABITS[base_format(mix[n])] < ABITS["none"])  # activations quantized
    branch_bytes = sum(BRANCH_BITS // 8 * l.branch[mix[n]].params for n, l in layers.items() if mix[n] in l.branch)
    return {"weight_bits": w, "activation_bits": a, "macs_8bit": low / (t.macs + branch_macs),
            "branch_layers": sum(has_branch(f) for f in mix.values()), "branch_bytes": int(branch_bytes),
            "branch_macs": branch_macs}


class _Scores:
    """A Lagrangian score (base + multiplier · slope, tie) of every (layer, format), as arrays: rows the layers in
    order, columns each layer's formats in order (padded with +inf). `pick(m)` is each layer's format of least
    score, ties to the least `tie`, then to the first format: what min(formats, key=score tuple) gives, the same
    float64 arithmetic for all layers at once (the bisection asks for ~80 multipliers, each over every layer)."""

    def __init__(self, layers: dict, terms):
        """`terms(layer, format)` -> (base, slope, tie)."""
        self.names = list(layers)
        self.formats = [list(layers[n].formats) for n in self.names]
        width = max((len(f) for f in self.formats), default=1)
        self.base, self.slope, self.tie = (np.full((len(self.names), width), v) for v in (np.inf, 0.0, np.inf))
        for i, n in enumerate(self.names):
            for j, f in enumerate(self.formats[i]):
                self.base[i, j], self.slope[i, j], self.tie[i, j] = terms(layers[n], f)

    def pick(self, mult: float) -> dict:
        score = self.base + mult * self.slope
        least = score == score.min(axis=1, keepdims=True)
        tie = np.where(least, self.tie, np.inf)
        first = np.argmax(least & (tie == tie.min(axis=1, keepdims=True)), axis=1)
        return {n: self.formats[i][first[i]] for i, n in enumerate(self.names)}


def _bisect(scores: _Scores, fits, lo=1e-9, hi=1e12, steps=80) -> dict:
    """The mix of the smallest multiplier whose mix `fits` (the largest multiplier's mix if none does)."""
    if fits(scores.pick(lo)):
        return scores.pick(lo)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if fits(scores.pick(mid)):
            hi = mid
        else:
            lo = mid
    return scores.pick(hi)


def collapse(layers: dict) -> tuple[dict, dict]:
    """(units, members): each group of tied layers as one Layer (shared formats, summed errors, params, MACs);
    an untied layer is its own unit."""
    members: dict[str, list] = {}
    for n, l in layers.items():
        members.setdefault(l.group or n, []).append(n)
    units = {key: layers[names[0]] if len(names) == 1 else unit(key, [layers[n] for n in names])
             for key, names in members.items()}
    return units, members


def _expand(mix: dict, layers: dict) -> dict:
    return {n: member_format(l, mix[l.group or n]) for n, l in layers.items()}


def _err(l: Layer, f: str) -> float:
    return l.error.get(f, math.inf)


def mix_for_error(layers: dict, budget: float) -> dict:
    """Cheapest mix (weight bits over params + activation bits over MACs) whose summed error <= budget:
    each layer (or group of tied layers) minimises cost + λ·error, λ the smallest that fits."""
    full, (layers, _) = layers, collapse(layers)
    t = totals(layers)

    def cost(l, f):
        return l.weight_bits(f) / t.params + l.activation_bits(f) / t.macs
    scores = _Scores(layers, lambda l, f: (cost(l, f), _err(l, f), _err(l, f)))  # cost + λ·error, ties: error
    mix = _bisect(scores, lambda m: sum(layers[n].error[f] for n, f in m.items()) <= budget)
    # the objective is the λ = 0 score: NaN for a format never measured (error inf), which no move then takes
    return _expand(improve(layers, mix, lambda l, f: cost(l, f) + 0.0 * _err(l, f), _err, budget), full)


def mix_for_bits(layers: dict, bits: float) -> dict:
    """Least summed error whose weight bits (averaged over parameters) <= `bits`: each layer minimises
    error + μ·cost, μ the smallest that fits; activation bits weigh in lightly (attention BMMs have none).
    Tied layers are one unit, as in mix_for_error."""
    full, (layers, _) = layers, collapse(layers)
    t = totals(layers)

    def terms(l, f):
        w = l.weight_bits(f) / t.params
        return _err(l, f), w + 1e-3 * l.activation_bits(f) / t.macs, w  # error + μ·cost, ties: weight bits
    mix = _bisect(_Scores(layers, terms), lambda m: bits_of(m, layers)["weight_bits"] <= bits + 1e-9)
    mix = improve(layers, mix, lambda l, f: _err(l, f) + 1e-9 * l.activation_bits(f) / t.macs,
                  lambda l, f: l.weight_bits(f) / t.params, bits + 1e-9)
    return _expand(mix, full)


def improve(layers: dict, mix: dict, objective, constraint, limit: float, rounds: int = 200) -> dict:
    """Local search after the Lagrangian (whose solutions lie on the convex hull only): apply the best move
    of one or two layers that lowers the summed `objective` and keeps the summed `constraint` <= `limit`."""
    mix = dict(mix)
    names = list(layers)
    used = sum(constraint(layers[n], mix[n]) for n in names)
    for _ in range(rounds):
        moves = []  # (Δobjective, Δconstraint, changes)
        for n in names:
            l, cur = layers[n], mix[n]
            for f in l.formats:
                if f != cur:
                    moves.append((objective(l, f) - objective(l, cur), constraint(l, f) - constraint(l, cur), ((n, f),)))
        best = min(((do, dc, ch) for do, dc, ch in moves if do < -1e-15 and used + dc <= limit), default=None)
        # pairs: one move that frees room (or costs little) with one that gains
        gains = sorted((m for m in moves if m[0] < -1e-15), key=lambda m: m[0])[:64]
        frees = sorted((m for m in moves if m[1] < 0), key=lambda m: m[0] / -m[1] if m[1] else 0)[:64]
        for g in gains:
            for fr in frees:
                if g[2][0][0] == fr[2][0][0]:
                    continue
                do, dc = g[0] + fr[0], g[1] + fr[1]
                if do < -1e-15 and used + dc <= limit and (best is None or do < best[0]):
                    best = (do, dc, g[2] + fr[2])
        if best is None:
            break
        for n, f in best[2]:
            mix[n] = f
        used += best[1]
    return mix
