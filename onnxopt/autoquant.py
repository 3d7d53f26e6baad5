"""Mixed precision to a target: a per-layer format search on the ONNX graph, without gradients.

1. Candidates: every Conv/ConvTranspose/MatMul/Gemm gets the formats the TensorRT placement rules allow
   (`quant.rules.plan` run once per 8-bit format; INT4 weight-only only for MatMul/Gemm weights), plus "none".
2. Calibration once: max |x| (FP8) and the MSE clip (INT8) of every candidate activation, and the input
   means for bias correction, in one pass; reused for every candidate and for the final graph.
3. Sensitivity: ONE fake-quant graph where each candidate (layer, format) sits behind a gate that is a
   graph input, y = x + g·(QDQ(x) − x) on activations and W + g·(Wq − W) on weights (plus g·bias
   correction), so one ORT session (ORT_DISABLE_ALL) measures "only this layer in this format" exactly by
   feeding a one-hot gate vector. Error = 1 − mean cosine of the output against the FP32 reference.
4. Choice (Lagrangian relaxation of the knapsack): each layer picks the format minimising
   cost + λ·error; λ is bisected so that the summed error fits a budget (or, for `bits`, the weight-bit
   budget). The error budget itself is bisected against the metric measured on held-out batches (a split of
   the calibration data) with the gated graph, which is the chosen mix exactly; that search is the repair
   step: a mix that misses the target promotes its most sensitive layers (the smaller budget does).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from . import calib, fold, io, ort
from . import graph as G
from .errors import OnnxoptError
from .progress import track
from .quant import bias_correction, blockwise, qdq, rules
from .quant import int4 as int4q

log = logging.getLogger(__name__)

FORMATS = ("fp8", "int8", "int4")
EIGHT_BIT = ("fp8", "int8")
WBITS = {"none": 16.0, "fp8": 8.0, "int8": 8.0, "int4": 4.0}
ABITS = {"none": 16.0, "fp8": 8.0, "int8": 8.0, "int4": 16.0}   # INT4 is weight-only: activations stay FP16
CAL_METHOD = {"fp8": "max", "int8": "mse"}
GATES = "autoquant_gates"


@dataclass
class Layer:
    name: str
    op: str
    formats: list                       # candidate formats, "none" first
    reasons: dict                       # format -> why it is not a candidate
    params: int = 0
    wshape: tuple = ()                  # the weight as the layer consumes it (empty for attention BMMs)
    trans_b: bool = False
    macs: float = 0.0
    error: dict = field(default_factory=dict)   # format -> measured 1 - cosine (only this layer quantized)


@dataclass
class Candidates:
    layers: dict                        # name -> Layer, graph order
    plans: dict                         # format -> rules.Plan (8-bit formats)
    configs: dict                       # format -> the QDQ options its plan was made with
    clips: dict = field(default_factory=dict)   # INT4 layer -> AWQ clip ratios per block
    int4: set = field(default_factory=set)      # names of layers that may take INT4 weights


# ---------------------------------------------------------------- candidates
def candidates(graph: gs.Graph, formats, configs: dict, block_size: int) -> Candidates:
    """Candidate formats of every weighted layer; `configs` maps each 8-bit format to its QDQ options."""
    plans = {f: rules.plan(graph, configs[f]) for f in formats if f in EIGHT_BIT}
    in_plan = {f: {n.name for n in p.nodes} for f, p in plans.items()}
    int4_ok, int4_skip = set(), {}
    if "int4" in formats:
        cfg = next(iter(configs.values()))
        sel, int4_skip = int4q.select_layers(graph, exclude=cfg.exclude, op_types=cfg.op_types)
        int4_ok = {n.name for n, _ in sel}
    layers = {}
    for node in graph.nodes:
        if node.op not in G.WEIGHT_OPS:
            continue
        fmts, reasons = ["none"], {}
        for f in formats:
            if f in EIGHT_BIT:
                ok = node.name in in_plan[f]
                why = plans[f].skipped.get(node.name, "not planned")
            else:
                ok = node.name in int4_ok
                why = int4_skip.get(node.name, "INT4 is for MatMul/Gemm weights only")
            if ok:
                fmts.append(f)
            else:
                reasons[f] = why
        wshape = tuple(int(d) for d in fold.effective_shape(node)) if rules._is_weight(node.inputs[1]) else ()
        layers[node.name] = Layer(node.name, node.op, fmts, reasons, int(np.prod(wshape)) if wshape else 0, wshape,
                                  bool(node.attrs.get("transB", 0)))
    return Candidates(layers, plans, {f: configs[f] for f in plans}, int4=int4_ok)


def calibrate(graph: gs.Graph, data, cands: Candidates, *, provider: str, memory_budget_mb: int, progress: bool):
    """Activation ranges per 8-bit format (Concat groups share the largest) and bias-correction means, in
    one pass over `data`. Returns ({format: {tensor: amax}}, {tensor: channel mean})."""
    reducers: dict[str, list] = {}
    by_fmt: dict[str, dict] = {}
    for f, plan in cands.plans.items():
        by_fmt[f] = {}
        for name in plan.activations:
            if name in plan.fixed_amax:
                continue
            r = calib.AbsMax() if CAL_METHOD[f] == "max" else calib.Histogram()
            by_fmt[f][name] = r
            reducers.setdefault(name, []).append(r)
    means = {}
    for plan in cands.plans.values():
        for node, _, _, _ in plan.weights:
            if node.op in bias_correction.OPS and node.inputs[0].name not in means:
                means[node.inputs[0].name] = r = calib.ChannelMean(bias_correction.input_axis(node),
                                                                   bias_correction.input_rank(node))
                reducers.setdefault(node.inputs[0].name, []).append(r)
    calib.collect_graph(graph, data, reducers, provider=provider, memory_budget_mb=memory_budget_mb,
                        progress=progress, desc="calibrating (once, all candidates)")
    amax = {}
    for f, plan in cands.plans.items():
        a = dict(plan.fixed_amax)
        for name, r in by_fmt[f].items():
            a[name] = calib.amax_from_histogram(r, "mse", f) if isinstance(r, calib.Histogram) else r.value
        for group in plan.shared_scales:
            shared = max(a[n] for n in group)
            for n in group:
                a[n] = shared
        amax[f] = a
    return amax, {n: r.value for n, r in means.items() if r.value is not None}


# ---------------------------------------------------------------- fake-quant numerics
def fake_weight(node: gs.Node, w: np.ndarray, fmt: str, hp: str, block_size: int, clip=None) -> np.ndarray:
    """What the layer will see of weight `w` (its consumed layout) in `fmt` (INT4: with AWQ clip ratios)."""
    if fmt == "int4":
        kn = blockwise.to_kn(node, w)
        fq = blockwise.fake_quant(kn, block_size, clip, hp)
        return fq.T if kn is not w else fq
    f = qdq.FORMATS[fmt]
    axis = G.weight_output_channel_axis(node) % w.ndim
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red, keepdims=True)
    scale = qdq.round_scale(np.where(amax > 0, amax / f.QMAX, 1.0), hp)
    return f.cast(w / scale).astype(np.float32) * scale


# ---------------------------------------------------------------- the gated graph
class _Builder:
    """Gates as If nodes on `gates[i] > 0.5`: a candidate whose gate is off costs one If and an Identity,
    so every forward runs at about the FP32 model's speed whatever the number of candidates."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.names = G.taken_names(graph)
        self.gates_in = gs.Variable(GATES, dtype=np.float32, shape=None)
        self.index: dict[tuple, int] = {}
        self._cond: dict[tuple, gs.Variable] = {}

    def var(self, base, dtype=np.float32, shape=None):
        return gs.Variable(G.unique_name(base, self.names), dtype=dtype, shape=shape)

    def const(self, base, values):
        return gs.Constant(G.unique_name(base, self.names), values)

    def node(self, op, inputs, base, attrs=None, dtype=np.float32, shape=None, into=None):
        out = self.var(base + "_out", dtype, shape)
        (self.graph.nodes if into is None else into).append(
            gs.Node(op, name=G.unique_name(base, self.names), inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def cond(self, layer: str, fmt: str) -> gs.Variable:
        key = (layer, fmt)
        if key not in self._cond:
            self.index[key] = i = len(self.index)
            g = self.node("Gather", [self.gates_in, self.const(f"gate_{i}_index", np.array(i, np.int64))],
                          f"gate_{i}", {"axis": 0}, shape=[])
            self._cond[key] = self.node("Greater", [g, self.const(f"gate_{i}_half", np.array(0.5, np.float32))],
                                        f"gate_{i}_on", dtype=np.bool_, shape=[])
        return self._cond[key]

    def branch(self, layer: str, fmt: str, x: gs.Tensor, make, base: str) -> gs.Variable:
        """If gate (layer, fmt) is on: make(x, nodes) (nodes appended to the then-branch), else x."""
        then_nodes: list = []
        y = make(x, then_nodes)
        else_nodes: list = []
        x_out = self.node("Identity", [x], base + "_off", shape=x.shape, into=else_nodes)
        then_g = gs.Graph(nodes=then_nodes, outputs=[y], opset=self.graph.opset, name=base + "_on_branch")
        else_g = gs.Graph(nodes=else_nodes, outputs=[x_out], opset=self.graph.opset, name=base + "_off_branch")
        return self.node("If", [self.cond(layer, fmt)], base + "_if",
                         {"then_branch": then_g, "else_branch": else_g}, shape=x.shape)


def build_gated(graph: gs.Graph, cands: Candidates, amax: dict, means: dict, hp: str, block_size: int,
                progress: bool = False):
    """Rewrite `graph` (a copy) in place into the gated graph; returns {(layer, format): gate index}."""
    b = _Builder(graph)
    nodes = {n.name: n for n in graph.nodes if n.name in cands.layers}
    plans = {f: rules.plan(graph, c) for f, c in cands.configs.items()}  # the same plans, on this copy's nodes
    for name, node in track(list(nodes.items()), total=len(nodes), desc="gated graph", unit="layer",
                            enabled=progress):
        _gate_weight(b, node, cands.layers[name], means, hp, block_size, cands.clips.get(name))
    # Activations: one gated Q/DQ per (use, format), owned by the layer (a residual Add by its Conv).
    for f, plan in plans.items():
        residual = {(id(a), i) for a, i in plan.residuals}
        for tname, uses in plan.activations.items():
            scale = qdq.activation_scale(amax[f][tname], f, hp)
            for node, idx in uses:
                owner = node
                if (id(node), idx) in residual:
                    owner = node.inputs[1 - idx].inputs[0]
                if owner.name not in cands.layers or f not in cands.layers[owner.name].formats:
                    continue
                x = node.inputs[idx]
                node.inputs[idx] = b.branch(owner.name, f, x, lambda x, into, s=scale, f=f: _qdq(b, x, s, f, into),
                                            f"{tname}_{f}")
    graph.inputs.append(b.gates_in)
    b.gates_in.shape = [max(len(b.index), 1)]
    return b.index


def _qdq(b: _Builder, x: gs.Tensor, scale: np.ndarray, fmt: str, into: list) -> gs.Variable:
    f = qdq.FORMATS[fmt]
    s = b.const(f"{x.name}_{fmt}_scale", np.asarray(scale, np.float32))
    zp = b.const(f"{x.name}_{fmt}_zp", f.zero_point())
    q = b.node("QuantizeLinear", [x, s, zp], f"{x.name}_{fmt}_Q", dtype=f.NP_TYPE, shape=x.shape, into=into)
    return b.node("DequantizeLinear", [q, s, zp], f"{x.name}_{fmt}_DQ", shape=x.shape, into=into)


def _gate_weight(b: _Builder, node: gs.Node, layer: Layer, means: dict, hp: str, block_size: int, clip=None) -> None:
    fmts = [f for f in layer.formats if f != "none"]
    if not fmts or not rules._is_weight(node.inputs[1]):
        return
    w = _consumed_weight(node)
    y = node.outputs[0]
    if any(_bias_shift(node, np.zeros_like(w), means, f) is not None for f in fmts):
        node.outputs[0] = pre = b.var(f"{y.name}_pre_bc", shape=y.shape)  # y becomes the bias-corrected output
    for f in fmts:
        wq = fake_weight(node, w, f, hp, block_size, clip).astype(np.float32)
        shift = _bias_shift(node, wq - w, means, f)
        wc = io.constant(G.unique_name(f"{node.name}_{f}_w", b.names), wq)  # spilled to the work dir: stays lazy
        del wq
        node.inputs[1] = b.branch(layer.name, f, node.inputs[1],
                                  lambda x, into, wc=wc: b.node("Identity", [wc], f"{node.name}_{f}_wq", into=into,
                                                                shape=list(w.shape)), f"{node.name}_{f}_w")
        if shift is not None:  # bias correction as the final graph folds it: the output moves by −ΔW·E[x]
            sc = b.const(f"{node.name}_{f}_bc", shift)
            pre = b.branch(layer.name, f, pre, lambda x, into, sc=sc: b.node("Add", [x, sc], f"{node.name}_{f}_bc",
                                                                             into=into, shape=y.shape),
                           f"{node.name}_{f}_bc")
    if node.outputs[0] is not y:
        b.graph.nodes.append(gs.Node("Identity", name=G.unique_name(f"{node.name}_bc_out", b.names), inputs=[pre],
                                     outputs=[y]))


def _bias_shift(node, dw, means, fmt):
    """−ΔW·E[x] shaped to broadcast over the layer output, where the QDQ pass folds bias correction."""
    if fmt not in EIGHT_BIT or node.op not in bias_correction.OPS or node.inputs[0].name not in means:
        return None
    if bias_correction.bias_target(_NoGraph, node) is None:
        return None
    shift = bias_correction.output_shift(node, dw, np.asarray(means[node.inputs[0].name], np.float64))
    if shift is None:
        return None
    shape = [-1] + [1] * (len(node.outputs[0].shape) - 2) if node.op != "Gemm" and node.outputs[0].shape else [-1]
    return (-shift).astype(np.float32).reshape(shape)


class _NoGraph:  # bias_target only reads the node
    pass


def _consumed_weight(node: gs.Node) -> np.ndarray:
    return fold.effective_weight(node)  # as quant.mixed reads it: the constant through its Cast/Transpose


# ---------------------------------------------------------------- evaluation
class Evaluator:
    """One ORT session over the gated graph; outputs of the FP32 reference are computed once."""

    def __init__(self, model, index: dict, search: list, verify: list, provider: str, shape_names: dict):
        self.index = index
        self.sess = ort.session(model, provider=provider, level="disable")
        self.out = self.sess.get_outputs()[0].name
        self.shape_names = shape_names
        self.search, self.verify = search, verify
        self.shapes: dict[str, list] = {}
        self.ref = {"search": self._outputs(self.zeros(), search, shapes=True), "verify": self._outputs(self.zeros(), verify)}

    def zeros(self) -> np.ndarray:
        return np.zeros(max(len(self.index), 1), np.float32)

    def gates(self, mix: dict) -> np.ndarray:
        g = self.zeros()
        for layer, f in mix.items():
            if f != "none":
                g[self.index[(layer, f)]] = 1.0
        return g

    def _outputs(self, gates, feeds, shapes=False) -> np.ndarray:
        names = [self.out] + (list(self.shape_names) if shapes else [])
        outs = []
        for feed in feeds:
            got = ort.run(self.sess, names, {**feed, GATES: gates}, label="the gated graph")
            outs.append(got[0].reshape(got[0].shape[0] if got[0].ndim > 1 else 1, -1))
            if shapes:
                for n, v in zip(names[1:], got[1:]):
                    self.shapes.setdefault(n, []).append([int(d) for d in v])
        return np.concatenate(outs).astype(np.float64)

    def metrics(self, gates, split: str = "search") -> dict:
        """Cosine and top-1 agreement on the "search" or "verify" batches, or on "all" of them."""
        if split == "all":
            ref = np.concatenate([self.ref["search"], self.ref["verify"]])
            cand = np.concatenate([self._outputs(gates, self.search), self._outputs(gates, self.verify)])
            return {"cosine": cosine(ref, cand), "top1": float(np.mean(ref.argmax(-1) == cand.argmax(-1)))}
        ref = self.ref[split]
        cand = self._outputs(gates, self.search if split == "search" else self.verify)
        return {"cosine": cosine(ref, cand), "top1": float(np.mean(ref.argmax(-1) == cand.argmax(-1)))}


def cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    if not np.all(np.isfinite(cand)):
        return -1.0
    num = (ref * cand).sum(1)
    den = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-30)
    return float((num / den).mean())


def shape_outputs(graph: gs.Graph, names: list) -> dict:
    """Shape(input 0) and Shape(output) of each layer as extra outputs, for MACs from real feeds."""
    wanted = {}
    nodes = {n.name: n for n in graph.nodes}
    taken = G.taken_names(graph)
    for name in names:
        n = nodes[name]
        for tag, t in (("in", n.inputs[0]), ("out", n.outputs[0])):
            out = gs.Variable(G.unique_name(f"{name}_shape_{tag}", taken), dtype=np.int64, shape=None)
            graph.nodes.append(gs.Node("Shape", name=G.unique_name(out.name + "_node", taken), inputs=[t], outputs=[out]))
            graph.outputs.append(out)
            wanted[out.name] = (name, tag)
    return wanted


def macs_of(layer: Layer, shp_in: list, shp_out: list) -> float:
    """Multiply-accumulates of one forward of one feed."""
    w = layer.wshape
    if layer.op == "MatMul":
        return float(np.prod(shp_out)) * shp_in[-1]
    if layer.op == "Gemm":
        return float(np.prod(shp_out)) * (w[1] if layer.trans_b else w[0])
    if layer.op == "Conv":
        return float(np.prod(shp_out)) * float(np.prod(w[1:]))
    return float(np.prod(shp_in)) * float(np.prod(w[1:]))  # ConvTranspose


# ---------------------------------------------------------------- sensitivities (restartable)
def load_sensitivities(path, key: str) -> dict:
    """{layer: {format: error}} saved by an earlier run on the same model and options ({} if none)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise OnnxoptError(f"cannot read sensitivities {path} ({e}); delete it to measure again") from None
    if saved.get("key") != key:
        log.warning("sensitivities in %s are for another model or options; measuring again", path)
        return {}
    return saved.get("layers", {})


def save_sensitivities(path, key: str, layers: dict) -> None:
    if path is None:
        return
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "layers": {n: l.error for n, l in layers.items()}}, indent=1))


def measure(ev: Evaluator, layers: dict, *, path=None, key: str = "", progress: bool = True) -> int:
    """Error of each (layer, format) alone on the search batches; returns how many were measured now."""
    saved = load_sensitivities(path, key)
    todo = [(n, f) for n, l in layers.items() for f in l.formats if f != "none"
            and f not in saved.get(n, {})]
    for n, l in layers.items():
        l.error = {"none": 0.0, **{f: v for f, v in saved.get(n, {}).items() if f in l.formats}}
    last = None
    for i, (name, f) in enumerate(track(todo, total=len(todo), desc="sensitivity (layer, format)", enabled=progress,
                                        unit="candidate")):
        m = ev.metrics(ev.gates({name: f}))
        layers[name].error[f] = max(0.0, 1.0 - m["cosine"])
        if name != last or i == len(todo) - 1:
            save_sensitivities(path, key, layers)
            last = name
    if todo:
        save_sensitivities(path, key, layers)
    return len(todo)


# ---------------------------------------------------------------- cost model and choice
@dataclass
class Totals:
    params: float
    macs: float


def totals(layers: dict) -> Totals:
    return Totals(max(sum(l.params for l in layers.values()), 1), max(sum(l.macs for l in layers.values()), 1.0))


def bits_of(mix: dict, layers: dict) -> dict:
    """Weight bits averaged over the parameters of all weighted layers, activation bits over their MACs,
    and the share of MACs that run in 8 bits."""
    t = totals(layers)
    w = sum(WBITS[mix[n]] * l.params for n, l in layers.items()) / t.params
    a = sum(ABITS[mix[n]] * l.macs for n, l in layers.items()) / t.macs
    eight = sum(l.macs for n, l in layers.items() if mix[n] in EIGHT_BIT) / t.macs
    return {"weight_bits": w, "activation_bits": a, "macs_8bit": eight}


def _lagrange(layers: dict, score, mult: float) -> dict:
    """Each layer's format minimising score(layer, format, multiplier) (a tuple: ties go to its later items)."""
    return {n: min(l.formats, key=lambda f: score(l, f, mult)) for n, l in layers.items()}


def _bisect(layers, score, fits, lo=1e-9, hi=1e12, steps=80) -> dict:
    """The mix of the smallest multiplier whose mix `fits` (the largest multiplier's mix if none does)."""
    if fits(_lagrange(layers, score, lo)):
        return _lagrange(layers, score, lo)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if fits(_lagrange(layers, score, mid)):
            hi = mid
        else:
            lo = mid
    return _lagrange(layers, score, hi)


def _err(l: Layer, f: str) -> float:
    return l.error.get(f, math.inf)


def mix_for_error(layers: dict, budget: float) -> dict:
    """Cheapest mix (weight bits over params + activation bits over MACs) whose summed error <= budget:
    each layer minimises cost + λ·error, λ the smallest that fits."""
    t = totals(layers)

    def score(l, f, lam):
        return (WBITS[f] * l.params / t.params + ABITS[f] * l.macs / t.macs + lam * _err(l, f), _err(l, f))
    mix = _bisect(layers, score, lambda m: sum(layers[n].error[f] for n, f in m.items()) <= budget)
    return improve(layers, mix, lambda l, f: score(l, f, 0.0)[0], _err, budget)


def mix_for_bits(layers: dict, bits: float) -> dict:
    """Least summed error whose weight bits (averaged over parameters) <= `bits`: each layer minimises
    error + μ·cost, μ the smallest that fits; activation bits weigh in lightly (attention BMMs have none)."""
    t = totals(layers)

    def score(l, f, mu):
        w = WBITS[f] * l.params / t.params
        return (_err(l, f) + mu * (w + 1e-3 * ABITS[f] * l.macs / t.macs), w)
    mix = _bisect(layers, score, lambda m: bits_of(m, layers)["weight_bits"] <= bits + 1e-9)
    return improve(layers, mix, lambda l, f: _err(l, f) + 1e-9 * ABITS[f] * l.macs / t.macs,
                   lambda l, f: WBITS[f] * l.params / t.params, bits + 1e-9)


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


# ---------------------------------------------------------------- search against a verified target
def search_target(ev: Evaluator, layers: dict, metric: str, target: float, steps: int = 10,
                  progress: bool = True, margin: float = 0.0, split: str = "verify") -> tuple[dict, list]:
    """Largest error budget whose mix meets `target` + `margin` on the held-out batches, found by bisection in
    log space from the additive prediction. A mix that misses is repaired by the smaller budget, which
    promotes its most sensitive layers first. Returns (mix, trials)."""
    everything = sum(max(l.error.values()) for l in layers.values()) or 1e-6
    b = (1.0 - target) if metric == "cosine" else 1e-3
    b = min(max(b, 1e-7), everything)
    lo, hi, best, trials = 0.0, None, {n: "none" for n in layers}, []
    for _ in track(range(steps), total=steps, desc="verifying mixes", enabled=progress, unit="mix"):
        mix = mix_for_error(layers, b)
        got = ev.metrics(ev.gates(mix), split)
        ok = got[metric] >= target + margin
        trials.append({"error_budget": b, "predicted_error": sum(layers[n].error[f] for n, f in mix.items()),
                       metric: got[metric], "passed": bool(ok), **bits_of(mix, layers)})
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
            if hi / lo < 1.5:
                break
            b = math.sqrt(lo * hi)
    return best, trials
