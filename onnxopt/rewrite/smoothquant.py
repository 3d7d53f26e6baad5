"""SmoothQuant for INT8 W8A8: migrate activation outliers into the weights, s_j = max|X_j|^a / max|W_j|^(1-a).

Per-input-channel activation maxima are collected in one streaming calibration pass. With alpha "auto",
the same pass keeps a bounded sample of each layer's input rows (Conv: im2col patches) from the first few
batches, and alpha is chosen per activation by the simulated INT8 Q/DQ error of the layers' outputs
against FP32 (per-tensor activation scale from the smoothed max, per-channel weight scales). Layers that
read one activation (Q, K, V) share one s. The scales are folded by `fold.fold_input_scale`. With "auto" the
pass also collects each MatMul/Gemm activation's per-channel min and max and may centre the channels before
scaling (x - c, c W into the bias: rewrite/shift.py, Outlier Suppression+), searching alpha again on x - c.
The searches' evaluations (an alpha each, both searches of an activation together) run on worker threads, each
computed alone as one thread would, so the choices and the file do not depend on the thread count.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import calib, formats, threads as threads_
from . import fold, shift as shifting
from .. import graph as G
from ..calib import PatchSample, RowSample
from ..errors import OnnxoptError
from ..progress import track
from ..graph import activation_channel_axis
from ..settings import MEMORY_BUDGET_MB
from ..pass_protocol import PassBase, StaticQuantizer, WeightOnlyQuantizer, after, check_regexes

log = logging.getLogger(__name__)

ALPHAS = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.05))
_S_RANGE = (1e-4, 1e4)
_FLOOR = 1e-5
SEARCH_BATCHES = 8        # "a few calibration batches" for auto alpha
SHIFT_RANGE = 0.9         # a shared weight's activation is shifted where its range shrinks to at most this share
SEARCH_ROWS = 1024        # rows (or patches) kept per layer for the search, fewer under a tight budget


# ---------------------------------------------------------------- groups
@dataclass
class Group:
    """Layers that read one activation (input 0) and so share one scale vector."""
    activation: str
    layers: list[gs.Node]
    axis: int
    order: int = 0
    absmax: calib.ChannelAbsMax | None = None
    samplers: list = field(default_factory=list)  # one per layer, or empty
    lo: calib.ChannelExtreme | None = None    # per-channel min and max, where a shift may apply (rewrite/shift.py)
    hi: calib.ChannelExtreme | None = None

    @property
    def shiftable(self) -> bool:
        return (self.lo is not None and self.lo.value is not None and self.hi.value is not None
                and all(shifting.applicable(n) for n in self.layers))


def find_groups(graph: gs.Graph, plan=None, exclude: tuple[str, ...] = (),
                op_types: tuple[str, ...] = fold.CONSUMER_OPS) -> list[Group]:
    """Groups of weight layers of `op_types` by shared activation, from `plan.activations` (the quantizer's plan)
    or, without a plan, from every Conv/ConvTranspose/MatMul/Gemm with a constant weight."""
    if plan is not None:
        readers = {name: [n for n, i in rs if i == 0] for name, rs in plan.activations.items()}
        weighted = {id(w[0]) for w in getattr(plan, "weights", ()) if w[1] == 1}
    else:
        pats = [re.compile(p) for p in exclude]
        readers, weighted = {}, set()
        for n in graph.nodes:
            if n.op in op_types and n.op in fold.CONSUMER_OPS and len(n.inputs) > 1 and not any(p.search(n.name) for p in pats):
                readers.setdefault(n.inputs[0].name, []).append(n)
                weighted.add(id(n))
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    groups = []
    for name, nodes in readers.items():
        layers, seen = [], set()
        for n in nodes:
            if (id(n) in seen or n.op not in fold.CONSUMER_OPS or n.op not in op_types or id(n) not in weighted
                    or n.inputs[0].name != name):
                continue
            try:
                fold.weight_chain(n, 1)
            except OnnxoptError:
                continue
            seen.add(id(n))
            layers.append(n)
        if not layers:
            continue
        axes = {activation_channel_axis(n) for n in layers}
        if len(axes) != 1:
            log.info("'%s': readers disagree on the channel axis; not smoothed", name)
            continue
        groups.append(Group(name, layers, axes.pop(), min(position.get(id(n), 0) for n in layers)))
    return groups


def tied(groups: list[Group]) -> list[list[Group]]:
    """Groups joined by a weight constant their layers share (ALBERT: one layer's weights read at every depth):
    such a weight takes one smoothing scale, since W ⊙ s is stored once (fold.tied). Other groups stand alone."""
    return [[groups[i] for i in unit] for unit in fold.tied([g.layers for g in groups])]


# ---------------------------------------------------------------- scales
def scales(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), clipped; channels that are all zero keep s = 1."""
    a = np.maximum(act_max, _FLOOR)
    w = np.maximum(w_max, _FLOOR)
    s = np.clip(a ** alpha / w ** (1.0 - alpha), *_S_RANGE)
    return np.where((act_max > 0) & (w_max > 0), s, 1.0)


@dataclass
class _Layer:
    """A layer's weight as [groups, rows, outputs] with the input channel of each row, its sampled
    inputs [samples, groups, rows] and FP32 outputs."""
    w3: np.ndarray
    chan: np.ndarray
    col_group: int
    x: np.ndarray
    y_ref: np.ndarray
    y_norm: float


def sim_layer(node: gs.Node, sample: np.ndarray, shift: np.ndarray | None = None, *, like: _Layer | None = None,
              inputs: dict | None = None) -> _Layer:
    """The layer's weight matrix, input samples and FP32 output on them, for the simulated INT8 error. With
    `shift` (rewrite/shift.py) the layer reads sample - shift and its bias restores c W: the error is that of
    the shifted product, relative to the unshifted output's energy (the one both choices are judged by).
    `like`: this node's unshifted layer on the same sample, whose weight matrix and energy are taken as they are
    (the same numbers); `inputs`: a dict shared by the layers reading one `sample` (Q, K, V), which then share one
    input array, quantized once per alpha by `simulated_error`."""
    if like is None:
        w = fold.effective_weight(node)
        w3 = fold.weight_matrix(node, w)
        g, r, _ = w3.shape
        c = fold.input_channels(node, w.shape)
        cg = c // g
        kk = r // cg
        col_group = 1
        if node.op == "ConvTranspose":  # columns run over (output channel, kernel position)
            col_group = int(np.prod(w.shape[2:]))
            kk = 1
        chan = np.arange(g)[:, None] * cg + np.arange(r)[None, :] // kk
    else:
        w3, chan, col_group = like.w3, like.chan, like.col_group
        g, r, _ = w3.shape
    key = (id(sample), g, r)
    x = None if inputs is None else inputs.get(key)
    if x is None:
        x = sample.reshape(len(sample), g, r).transpose(1, 0, 2)  # [g, m, r]
        if shift is not None:
            x = x - shift.astype(x.dtype).reshape(g, 1, r)
        if inputs is not None:
            inputs[key] = x
    with np.errstate(over="ignore", invalid="ignore"):   # an FP32 overflow: its error is inf, never chosen
        y = np.matmul(x, w3)
        norm = like.y_norm if like is not None else float(np.sum(y.astype(np.float64) ** 2)) or 1.0
    return _Layer(w3, chan, col_group, x, y, norm)


TARGET = formats.INT8   # the format SmoothQuant prepares activations for (its numbers in the simulated error)


def _qdq_int8(v: np.ndarray, scale) -> np.ndarray:
    """INT8 Q/DQ of `v` (a temporary: overwritten and returned), the numbers of
    clip(rint(v / scale), qmin, qmax) * scale without their temporaries."""
    np.divide(v, scale, out=v)
    np.rint(v, out=v)
    np.clip(v, TARGET.qmin, TARGET.qmax, out=v)
    return np.multiply(v, scale, out=v)


def _qdq_weight(L: _Layer, srow: np.ndarray) -> np.ndarray:
    """(W ⊙ s) Q/DQ to INT8 per output channel (the columns of one ConvTranspose output channel together)."""
    ws = L.w3 * srow[:, :, None]
    g, r, o = ws.shape
    v = ws.reshape(g, r, o // L.col_group, L.col_group)
    amax = np.maximum(v.max(axis=(1, 3)), -v.min(axis=(1, 3)))   # max |ws|, without an |ws| temporary
    w_scale = np.repeat(np.maximum(amax, 1e-12) / TARGET.qmax, L.col_group, axis=1)[:, None, :]
    return _qdq_int8(ws, w_scale)


def _term(xq: np.ndarray, wq: np.ndarray, L: _Layer) -> float:
    """||xq wq - Y_fp32||^2 / ||Y_fp32||^2, summed in float64 as one array (the same sum whatever the thread)."""
    y = np.matmul(xq, wq)
    np.subtract(y, L.y_ref, out=y)
    d = y.astype(np.float64)
    del y
    d **= 2
    return float(np.sum(d)) / L.y_norm


def _readers(layers: list[_Layer]) -> list[list[int]]:
    """The layers' indices grouped by the input they read (one array, one channel map: sim_layer's `inputs`)."""
    groups: list[list[int]] = []
    for i, L in enumerate(layers):
        for idx in groups:
            F = layers[idx[0]]
            if F.x is L.x and F.chan.shape == L.chan.shape and np.array_equal(F.chan, L.chan):
                idx.append(i)
                break
        else:
            groups.append([i])
    return groups


def simulated_error(layers: list[_Layer], act_max: np.ndarray, s: np.ndarray, *, shared: dict | None = None,
                    cache: dict | None = None) -> float:
    """Sum over layers of ||Y_qdq - Y_fp32||^2 / ||Y_fp32||^2 with INT8 activations (per-tensor scale from
    the smoothed max) and INT8 weights (per output channel) after smoothing by `s`. Layers that share an input
    array quantize it once; `shared` ({id(layer): key}, `shared_weights`) names layers holding one weight, which
    is quantized once into `cache` (a dict for this `s`)."""
    a_scale = max(float(np.max(act_max / s)), 1e-12) / TARGET.qmax
    terms = [0.0] * len(layers)
    for idx in _readers(layers):
        first = layers[idx[0]]
        srow = s[first.chan].astype(np.float32)  # [g, r]
        xq = _qdq_int8(np.divide(first.x, srow[:, None, :]), a_scale)
        for i in idx:
            L = layers[i]
            key = shared.get(id(L)) if shared and cache is not None else None
            wq = None if key is None else cache.get(key)
            if wq is None:
                wq = _qdq_weight(L, srow)
                if key is not None:
                    cache[key] = wq
            terms[i] = _term(xq, wq, L)
        del xq
    err = 0.0
    for t in terms:   # in layer order: the sum of one layer after another
        err += t
    return err


def shared_weights(uses) -> dict:
    """{id(layer): key} for the layers of `uses` ([(layers, act_max)]) whose weight matrix another of them holds
    bit for bit (ALBERT: one constant read at every depth): `simulated_error` quantizes it once per s."""
    if len(uses) < 2:
        return {}
    reps: list[_Layer] = []
    keys = {}
    for ls, _ in uses:
        for L in ls:
            for k, R in enumerate(reps):
                if (R.w3.shape == L.w3.shape and R.col_group == L.col_group and R.chan.shape == L.chan.shape
                        and np.array_equal(R.chan, L.chan) and np.array_equal(R.w3.view(np.int32), L.w3.view(np.int32))):
                    break
            else:
                k = len(reps)
                reps.append(L)
            keys[id(L)] = k
    counts = Counter(keys.values())
    return {i: k for i, k in keys.items() if counts[k] > 1}


def search_alpha(layers: list[_Layer], act_max: np.ndarray, w_max: np.ndarray, uses=None, threads: int = 0
                 ) -> tuple[float | None, np.ndarray, dict]:
    """alpha on a 0.1 grid, refined by 0.05 around the best; None (no smoothing) when that is better still.
    `uses` ([(layers, act_max)], default one: (layers, act_max)) are the activations one shared weight reads:
    one s (from `act_max`, their elementwise maximum) for all, the error summed over them, each with its own
    per-tensor activation scale. `threads`: as `search_alphas`."""
    return search_alphas([(uses or [(layers, act_max)], act_max, w_max)], threads)[0]


def search_alphas(searches: list, threads: int = 0) -> list[tuple[float | None, np.ndarray, dict]]:
    """`search_alpha` for independent searches [(uses, act_max, w_max)] together: the grid's and the unsmoothed
    evaluations of all, then their refinements, each evaluation one job on `threads` worker threads (0: one per core
    where the work is big, threads.for_bytes). A job computes its error alone, in the order one thread would, so
    the errors and the choices do not depend on the thread count."""
    shared = [shared_weights(uses) for uses, _, _ in searches]
    work, held = [], []   # bytes an evaluation reads; bytes its temporaries and shared weights hold at once
    for (uses, _, _), sh in zip(searches, shared):
        ls = [L for u, _ in uses for L in u]
        work.append(sum(L.x.nbytes + L.w3.nbytes + L.y_ref.nbytes for L in ls))
        kept = {sh[id(L)]: L.w3.nbytes for L in ls if id(L) in sh}
        held.append(max((L.x.nbytes + L.w3.nbytes + 3 * L.y_ref.nbytes for L in ls), default=0) + sum(kept.values()))

    def error(job) -> float:
        k, alpha = job
        uses, act_max, w_max = searches[k]
        s = np.ones_like(act_max) if alpha is None else scales(act_max, w_max, alpha)
        cache: dict = {}
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # overflowed layers: inf, not chosen
            return sum(simulated_error(ls, am, s, shared=shared[k], cache=cache) for ls, am in uses)

    def run(jobs) -> dict:
        cores = threads_.count(threads)
        n = min(threads_.for_bytes(sum(work[k] for k, _ in jobs), threads), len(jobs))
        # each worker's matmuls on its share of the cores (BLAS on every core in each worker would oversubscribe
        # them, and its threads spin); where BLAS's threads cannot be set, one worker and BLAS as it is
        with threads_.blas_threads(cores // len(jobs) if n > 1 else 1) as limited:
            return dict(zip(jobs, threads_.ordered_map(error, jobs, n if limited else 1, cost=lambda j: held[j[0]])))

    grid = ALPHAS[::2]
    errs = run([(k, a) for k in range(len(searches)) for a in grid + (None,)])
    tried = [{a: errs[k, a] for a in grid} for k in range(len(searches))]
    refine = []
    for k, t in enumerate(tried):
        best = min(t, key=t.get)
        refine += [(k, a) for a in (round(best - 0.05, 2), round(best + 0.05, 2)) if 0.0 <= a <= 1.0 and a not in t]
    errs.update(run(refine) if refine else {})
    out = []
    for k, ((uses, act_max, w_max), t) in enumerate(zip(searches, tried)):
        t.update({a: errs[j, a] for j, a in refine if j == k})   # in the order the refinements were tried
        best = min(t, key=t.get)
        base = errs[k, None]
        if base <= t[best]:
            out.append((None, np.ones_like(act_max), {"unsmoothed": base, "smoothed": base}))
        else:
            out.append((float(best), scales(act_max, w_max, best), {"unsmoothed": base, "smoothed": t[best]}))
    return out


# ---------------------------------------------------------------- entry point
def parse_alpha(value) -> float | str:
    """A SmoothQuant alpha in [0, 1], or 'auto'."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise OnnxoptError(f"--smoothquant takes a number in [0, 1] or 'auto', got '{value}'") from None
    if not 0.0 <= a <= 1.0:
        raise OnnxoptError(f"--smoothquant alpha must lie in [0, 1], got {a}")
    return a


def smooth(graph: gs.Graph, data: calib.CalibData | None, plan=None, *, alpha: float | str = 0.5, exclude=(),
           op_types=fold.CONSUMER_OPS, provider: str = "cpu", memory_budget_mb: int = MEMORY_BUDGET_MB, progress: bool = True,
           shift: bool = True, kept: frozenset = frozenset(), shared_rounding: bool = True, threads: int = 0) -> dict:
    """SmoothQuant on `graph` in place: one scale per activation read by the planned weight layers (`plan`,
    else every weight layer of `op_types` not matching `exclude`), alpha fixed (a float) or searched per
    activation ('auto'); `kept`: planned layers the quantizer leaves high precision; `shared_rounding`: it rounds
    shared weights for all uses (quant.shared_rounding); `threads`: the alpha search's worker threads (0: automatic,
    threads.for_bytes; the choices do not depend on it). With 'auto' and `shift`, an activation read only by
    MatMul/Gemm layers is centred per channel first (rewrite/shift.py) where that lowers the simulated error (a
    shared weight's with `shared_rounding`: where it shrinks the range). Returns the report."""
    t0 = time.perf_counter()
    alpha = parse_alpha(alpha)
    if data is None:
        raise OnnxoptError("SmoothQuant needs calibration data: pass --calib FILE (or --calib-random N)")
    groups = find_groups(graph, plan, exclude, op_types)
    report = {"alpha": alpha, "groups": [], "alphas": {}, "inserted_muls": 0, "shifted": 0}
    if not groups:
        log.info("smoothquant: no layer to smooth")
        return report
    batches = min(SEARCH_BATCHES, len(data)) if alpha == "auto" else 0
    rows = SEARCH_ROWS
    if batches:
        width = 0  # floats per sampled row, summed over all layers
        for g in groups:
            for n in g.layers:
                shape = fold.effective_shape(n)
                width += int(np.prod(shape[1:])) if n.op == "Conv" else fold.input_channels(n, shape)
        budget = memory_budget_mb * 2**20 // 4
        rows = int(np.clip(budget // 4 // max(width, 1), 64, SEARCH_ROWS))
    reducers: dict[str, list] = {}
    for i, g in enumerate(groups):
        conv = next((n for n in g.layers if n.op in ("Conv", "ConvTranspose")), None)
        rank = len(fold.effective_shape(conv)) if conv is not None else None  # a conv input has its weight's rank
        g.absmax = calib.ChannelAbsMax(g.axis, rank)
        reducers.setdefault(g.activation, []).append(g.absmax)
        if batches:
            rows_sampler = None  # MatMul/Gemm/ConvTranspose readers of one activation share their rows
            for n in g.layers:
                if n.op == "Conv":
                    sampler = PatchSample(n, tuple(fold.effective_shape(n)[2:]), rows, batches, seed=i)
                elif rows_sampler is None:
                    sampler = rows_sampler = RowSample(g.axis, rows, batches, seed=i)
                else:
                    g.samplers.append(rows_sampler)
                    continue
                g.samplers.append(sampler)
                reducers[g.activation].append(sampler)
            if shift and all(shifting.applicable(n) for n in g.layers) and not fold.is_attention_output(g.layers[0].inputs[0]):
                g.lo, g.hi = calib.ChannelExtreme(g.axis, rank, lowest=True), calib.ChannelExtreme(g.axis, rank)
                reducers[g.activation] += [g.lo, g.hi]
    t1 = time.perf_counter()
    calib.collect_graph(graph, data, reducers, provider=provider, memory_budget_mb=memory_budget_mb, progress=progress,
                        desc="smoothquant: calibrating")
    t2 = time.perf_counter()

    taken = G.taken_names(graph)  # once: every fold below adds its names to it
    # Downstream groups first: folding into a producer rescales that layer's output channels, which
    # changes its per-input-channel weight maxima; those must be final when its own scale is chosen.
    # an activation that overflowed is left to the quantizer's calibration, whose error names it
    units = [[g for g in u if g.absmax.value is not None and np.all(np.isfinite(g.absmax.value))]
             for u in sorted(tied(groups), key=lambda u: -max(g.order for g in u))]
    # weight maxima read ahead on worker threads (recomputed where a fold below changed the weight since)
    ahead = fold.input_channel_absmax_ahead([[n for g in u for n in g.layers] for u in units])
    for unit, w_maxes in track(zip(units, ahead), total=len(units), enabled=progress,
                               desc="smoothquant: alpha search" if batches else "smoothquant"):
        if not unit:
            continue
        # a shared weight's scale serves its quantized uses: a use the quantizer keeps high precision (the layers
        # before the first use, quant.shared_rounding) is smoothed alike but its statistics do not count
        judged = [g for g in unit if not all(n.name in kept for n in g.layers)] or unit
        act_max = np.max([g.absmax.value for g in judged], axis=0)
        layers_all = [n for g in unit for n in g.layers]
        w_max = np.max(w_maxes, axis=0)
        entry = {"activation": unit[0].activation, "layers": [n.name for n in layers_all]}
        if len(unit) > 1:
            entry["shared_weight_activations"] = [g.activation for g in unit]
        if batches:
            samples: dict = {}   # one array per sampler (Q, K and V share theirs): sim_layer's shared inputs
            for smp in (smp for g in judged for smp in g.samplers):
                if id(smp) not in samples:
                    samples[id(smp)] = smp.value
            inputs: dict = {}
            uses = [([sim_layer(n, samples[id(smp)], inputs=inputs) for n, smp in zip(g.layers, g.samplers)],
                     g.absmax.value) for g in judged]
            searches = [(uses, act_max, w_max)]
            shiftable = all(g.shiftable for g in unit)
            if shiftable:   # searched together with the unshifted: independent of it
                cs = {id(g): shifting.centre(g.lo.value, g.hi.value) for g in unit}   # each use its own centres
                halves = [shifting.half_range(g.lo.value, g.hi.value, cs[id(g)]) for g in judged]
                act_c = np.max(halves, axis=0)
                entry["range_shift"] = [float(np.max(act_max)), float(np.max(act_c))]
                inputs = {}
                searches.append(([([sim_layer(n, samples[id(smp)], cs[id(g)], like=L, inputs=inputs)
                                    for n, smp, L in zip(g.layers, g.samplers, ls)], h)
                                  for g, h, (ls, _) in zip(judged, halves, uses)], act_c, w_max))
            found = search_alphas(searches, threads)
            del uses, searches, samples, inputs
            chosen, s, entry["error"] = found[0]
            if shiftable:
                chosen_c, s_c, entry["error_shifted"] = found[1]
                better = entry["error_shifted"]["smoothed"] < entry["error"]["smoothed"]
                if shared_rounding and len(unit) > 1:
                    # the QDQ pass rounds a shared weight with error feedback on the (shifted) inputs of all its uses,
                    # which removes most of the weight error nearest rounding puts on x - c, so the simulation above
                    # misjudges it: shift where the range shrinks (ALBERT stand-in: GELU outputs shifted too,
                    # output cosine 0.9874 -> 0.9899, where the simulation said no)
                    better = np.max(act_c) <= SHIFT_RANGE * np.max(act_max)
                if better:
                    chosen, s = chosen_c, s_c
                    entry["shift"] = [shifting.shift_input(graph, g.layers, cs[id(g)], taken=taken) for g in unit][0]
                    report["shifted"] += len(unit)
            for g in unit:
                g.samplers.clear()
        else:
            chosen, s = alpha, scales(act_max, w_max, alpha)
        if chosen is not None and len(unit) > 1 and any(fold.is_attention_output(g.layers[0].inputs[0]) for g in unit):
            # 1/s would go into the shared V projection once per use (copies) or a Mul would split fused attention.
            chosen = None
            entry["fold"] = "not smoothed: a shared weight reading attention outputs"
        elif chosen is None:
            entry["fold"] = "not smoothed: smoothing did not lower the simulated error"
        elif len(unit) == 1:
            entry["fold"] = fold.fold_input_scale(graph, unit[0].layers, s, taken=taken)
        else:  # one weight read at several places: W ⊙ s once, each activation ⊘ s on its own
            folds = [fold.fold_input_scale(graph, g.layers, s, weights=False, norm_only=True, taken=taken) for g in unit]
            fold.scale_weights(graph, layers_all, s)
            ins = sum(f.startswith("inserted") for f in folds)
            entry["fold"] = f"shared weights scaled once; {len(folds) - ins} activation(s) folded into norms, {ins} Mul(s) inserted"
            report["inserted_muls"] += ins
        entry["alpha"] = chosen
        if chosen is not None:
            entry["s_range"] = [float(s.min()), float(s.max())]
            report["inserted_muls"] += len(unit) == 1 and entry["fold"].startswith("inserted")
        for n in layers_all:
            report["alphas"][n.name] = chosen
        report["groups"].append(entry)
    report["time_s"] = round(time.perf_counter() - t0, 3)
    # the run's breakdown (pipeline.breakdown): statistics as calibrate, alpha search and folding as write
    report["timings_s"] = {"calibrate": t2 - t1, "fold": time.perf_counter() - t2}
    log.info("smoothquant: %d activation(s), %d inserted Mul(s), %.1f s", len(report["groups"]),
             report["inserted_muls"], report["time_s"])
    return report


# The pass: smoothquant's options as a recipe step (onnxopt.pass_protocol.Pass).
@dataclass
class SmoothQuant(PassBase):
    """Before a QDQ("int8") pass, smooths exactly the layers that pass will quantize; alone, every weight
    layer of `op_types` not matching `exclude`."""
    alpha: float | str = "auto"      # migration strength in [0, 1], or "auto" (per-activation search)
    exclude: tuple = ()
    op_types: tuple = fold.CONSUMER_OPS
    shift: bool = True                # with "auto": shift activations by their channel centres where it helps
    name = "smoothquant"

    def __post_init__(self):
        self.alpha = parse_alpha(self.alpha)
        self.exclude = check_regexes(self.exclude, "--exclude")
        self.op_types = tuple(self.op_types)

    @property
    def needs_data(self) -> bool:
        return True

    def check_recipe(self, recipe, index: int) -> None:
        nxt = after(recipe, index, (StaticQuantizer, WeightOnlyQuantizer))
        if nxt and not (isinstance(nxt[0], StaticQuantizer) and formats.get(nxt[0].mode).smoothquant):
            sq = [m for m in formats.modes() if formats.get(m).smoothquant]
            raise OnnxoptError(f"--smoothquant applies to {'/'.join('--' + m for m in sq)} only; drop it or quantize with --{sq[0]}")
        target = TARGET.name
        if nxt and self.alpha == "auto" and nxt[0].mode != target:
            # the alpha search simulates the target format's rounding; another format needs a given alpha
            raise OnnxoptError(f"--smoothquant auto searches alpha for --{target} only; with --{nxt[0].mode} give an "
                               f"alpha in [0, 1], e.g. --smoothquant 1.0")

    def run(self, ctx) -> dict:
        data = ctx.require_data("SmoothQuant")
        qdq = ctx.following(StaticQuantizer, self)
        plan = qdq.smoothing_plan(ctx.graph) if qdq is not None else None
        kept = frozenset(n.name for n in plan.nodes) - {n.name for n in qdq.plan(ctx.graph).nodes} if qdq is not None else frozenset()
        return smooth(ctx.graph, data, plan, alpha=self.alpha, exclude=self.exclude, op_types=self.op_types,
                                  provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress,
                                  shift=self.shift, kept=kept,
                                  shared_rounding=bool(getattr(qdq, "shared_rounding", False)), threads=ctx.threads)
