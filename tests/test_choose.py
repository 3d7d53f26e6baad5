"""The Lagrangian choice (autoquant.choose): the vectorised pick is exactly min(formats, key=score tuple) of every
layer, ties included, for the multipliers the bisection asks about; and the mixes it leads to keep their budgets
and, where the budget allows every measured format, take the cheapest."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.autoquant import choose
from onnxopt.autoquant.candidates import Layer

FORMATS = ["fp8", "int8", "int4", "nvfp4"]
# errors drawn from a few values so that ties happen often (equal scores: fp8 and int8 cost the same, and λ·1e-9
# vanishes beside the cost; equal errors); inf: not measured
ERRORS = st.sampled_from([0.0, 1e-9, 1e-6, 1e-5, 1e-5, 3e-4, 1e-3, 1e-3, 0.2, math.inf])


@st.composite
def layer_sets(draw):
    layers = {}
    for i in range(draw(st.integers(1, 12))):
        fmts = ["none"] + draw(st.lists(st.sampled_from(FORMATS), min_size=0, max_size=4, unique=True))
        params = draw(st.sampled_from([0, 64, 4096, 4096, 65536]))
        macs = draw(st.sampled_from([0.0, 1e3, 1e6, 1e6]))
        err = {f: 0.0 if f == "none" else draw(ERRORS) for f in fmts}
        layers[f"l{i}"] = Layer(f"l{i}", "MatMul", fmts, {}, params, (8, 8), macs=macs, error=err)
    return layers


def _reference(layers, score, mult):
    return {n: min(l.formats, key=lambda f: score(l, f, mult)) for n, l in layers.items()}


@settings(max_examples=300, deadline=None)
@given(layer_sets(), st.sampled_from([1e-9, 1e-6, 1e-3, 0.1, 1.0, 7.3, 1e3, 1e6, 1e12]))
def test_vectorised_pick_is_the_scalar_minimum(layers, mult):
    t = choose.totals(layers)

    def err(l, f):
        return l.error.get(f, math.inf)

    def by_error(l, f, lam):      # mix_for_error's score
        return (l.weight_bits(f) / t.params + l.activation_bits(f) / t.macs + lam * err(l, f), err(l, f))

    def by_bits(l, f, mu):        # mix_for_bits' score
        w = l.weight_bits(f) / t.params
        return (err(l, f) + mu * (w + 1e-3 * l.activation_bits(f) / t.macs), w)
    s = choose._Scores(layers, lambda l, f: (l.weight_bits(f) / t.params + l.activation_bits(f) / t.macs,
                                             err(l, f), err(l, f)))
    assert s.pick(mult) == _reference(layers, by_error, mult)
    s = choose._Scores(layers, lambda l, f: (err(l, f), l.weight_bits(f) / t.params + 1e-3 * l.activation_bits(f) / t.macs,
                                             l.weight_bits(f) / t.params))
    assert s.pick(mult) == _reference(layers, by_bits, mult)


@settings(max_examples=100, deadline=None)
@given(layer_sets(), st.sampled_from([0.0, 1e-5, 1e-3, 0.05, 1.0]))
def test_mix_for_error_keeps_its_budget(layers, budget):
    mix = choose.mix_for_error(layers, budget)
    assert set(mix) == set(layers) and all(mix[n] in l.formats for n, l in layers.items())
    assert sum(layers[n].error[f] for n, f in mix.items()) <= budget
    if budget >= sum(max((e for e in l.error.values() if e < math.inf), default=0.0) for l in layers.values()):
        # every measured format fits: each layer takes one of its cheapest measured formats
        for n, l in layers.items():
            cost = {f: l.weight_bits(f) / choose.totals(layers).params + l.activation_bits(f) / choose.totals(layers).macs
                    for f in l.formats if l.error[f] < math.inf}
            assert cost[mix[n]] <= min(cost.values()) + 1e-12, (n, mix[n], cost)
