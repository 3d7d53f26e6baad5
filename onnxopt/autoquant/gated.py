"""The gated graph: every candidate (layer, format) behind an If on one element of a gate vector (a graph
input), so one ORT session measures any mix exactly; plus the MACs of each layer from real feeds."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import formats, modelfile
from .. import threads as threads_
from ..rewrite import fold, lowrank
from ..formats import emulation
from ..formats.base import Format
from .. import graph as G
from ..progress import track
from ..quant import bias_correction, qdq, rules
from ..quant import writer
from ..quant.writer import fake_weight, quantized_weight
from . import smooth
from .candidates import GATES, Candidates, Layer, base_format, has_branch


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
                progress: bool = False, threads: int = 0, codes: dict | None = None):
    """Rewrite `graph` (a copy) in place into the gated graph; returns {(layer, format): gate index}. The weights'
    numbers are made on `threads` worker threads (0: one per core, one for small models); the graph does not
    depend on it. `codes`, if given, receives {(layer, format): `Codes`} of the per-channel weights (read by that
    layer alone): what the writer would compute for them, so the final graph does not quantize them again."""
    b = _Builder(graph)
    nodes = {n.name: n for n in graph.nodes if n.name in cands.layers}
    plans = {f: rules.plan(graph, c) for f, c in cands.configs.items()}  # the same plans, on this copy's nodes
    # A weight read by several layers gets no bias correction in the written graph (quant.writer): nor here.
    shared = {n.name for p in plans.values() for n, _, c, _ in p.weights if len(c.outputs) > 1}
    # Owners before any gate: a gated weight puts an Identity (bias correction) behind the layer's output, and a
    # residual Add's owner is the layer feeding it, as the writer sees it (quant.writer.activation_owner).
    owners = {f: _owners(plan) for f, plan in plans.items()}
    inputs = {name: (node.inputs[0].name, node.inputs[1]) for name, node in nodes.items()}  # before the gates
    ends = {name: (node.inputs[0], node.outputs[0], fold.effective_shape(node)) for name, node in nodes.items()
            if cands.layers[name].branch}  # a low-rank branch reads x and is added to y, around the gates
    jobs = [_WeightJob.of(node, cands.layers[name], {} if name in shared else means, hp, block_size,
                          cands.clips.get(name), _smoothing(cands, node)) for name, node in nodes.items()]
    # The weights' numbers on worker threads, the graph edits (and so every name) here, in the layers' order.
    n = threads_.for_bytes(sum(_fp32_bytes(j) for j in jobs), threads)
    made = threads_.ordered_map(_in_context(_weight_numbers), _with_context(jobs), n, cost=lambda it: _job_bytes(it[1]))
    for job, nums in track(made, total=len(jobs), desc="gated graph", unit="layer", enabled=progress):
        name = job.node.name
        _gate_weight(b, job, nums, {f: (cands.block_clips.get((name, f)), cands.smooth_of(name, f))
                                    for f in cands.layers[name].formats})
        if codes is not None and name not in shared:
            codes.update(((name, f), c) for f, c in nums.codes.items())
    # Activations: one gated Q/DQ per (use, format), owned by the layer (a residual Add by its Conv).
    for f, plan in plans.items():
        for tname, uses in plan.activations.items():
            scale = qdq.activation_scale(amax[f][tname], f, hp)
            for node, idx in uses:
                owner = owners[f][(id(node), idx)]
                for c in cands.layers[owner].formats if owner in cands.layers else ():
                    # With the branch the layer's output is the branch's Add: a residual Add after it is not
                    # fed by the layer, and the rules do not quantize its skip input in the written graph.
                    if base_format(c) != f or (has_branch(c) and owner != node.name):
                        continue
                    x = node.inputs[idx]
                    node.inputs[idx] = b.branch(owner, c, x, lambda x, into, s=scale, f=f: _qdq(b, x, s, f, into),
                                                f"{tname}_{c}")
    if cands.smooth:
        _gate_smoothed(b, plans[smooth.BASE], cands, amax, hp, owners[smooth.BASE])
    _gate_block_activations(b, nodes, cands, amax.get(formats.FP8.name, {}), inputs)
    for name, (x, y, shape) in ends.items():
        _gate_branch(b, nodes[name], cands.layers[name], x, y, shape)
    graph.inputs.append(b.gates_in)
    b.gates_in.shape = [max(len(b.index), 1)]
    return b.index


def _gate_branch(b: _Builder, node: gs.Node, layer: Layer, x: gs.Tensor, y: gs.Tensor, shape: tuple) -> None:
    """The layer's low-rank branch (lowrank.branch_nodes on its unquantized input `x`) added to its output `y`
    behind each of its branch candidates' gates."""
    producer = y.inputs[0]
    cur = b.var(f"{y.name}_before_branch", shape=y.shape)
    producer.outputs[producer.outputs.index(y)] = cur
    for c in (c for c in layer.formats if has_branch(c)):
        def make(v, into, c=c):
            branch, low = lowrank.branch_nodes(node, x, layer.branch[c].l1, layer.branch[c].l2, b.names, f"{node.name}_{c}",
                                                shape)
            into.extend(branch)
            return b.node("Add", [v, low], f"{node.name}_{c}_branch_add", shape=y.shape, into=into)
        cur = b.branch(layer.name, c, cur, make, f"{node.name}_{c}_branch")
    b.graph.nodes.append(gs.Node("Identity", name=G.unique_name(f"{node.name}_branch_out", b.names), inputs=[cur],
                                 outputs=[y]))


def _gate_block_activations(b: _Builder, nodes: dict, cands: Candidates, amax: dict, inputs: dict) -> None:
    """Block formats with dynamic activations (NVFP4, MXFP8): the writer's quantizer on the layer's input
    (quant.writer.write_block_activation), lowered to what ONNX Runtime runs (formats.emulation), behind the gate."""
    for name, node in nodes.items():
        for f in cands.layers[name].formats:
            fmt = formats.get(base_format(f)) if f != "none" else None
            if fmt is None or fmt.activations != "dynamic":
                continue
            x = node.inputs[0]
            node.inputs[0] = b.branch(name, f, x, lambda x, into, fmt=fmt, node=node: _lowered(
                b, lambda g: _block_activation(g, node, x, fmt, amax.get(inputs[name][0]), b.names, inputs[name][1],
                                               cands.smooth_of(name, f)),
                f"{x.name}_{f}", into),
                f"{x.name}_{f}")


def _block_activation(g: gs.Graph, node: gs.Node, x: gs.Tensor, fmt, amax, names: set, weight, smooth=None) -> gs.Variable:
    """The writer's activation nodes on `x` in a scratch graph (a stand-in layer with the layer's weight reads x,
    so the writer can read K and rewire it)."""
    stand_in = gs.Node(node.op, inputs=[x, weight], outputs=[], attrs=dict(node.attrs))
    g.nodes.append(stand_in)
    y = writer.write_block_activation(g, stand_in, fmt, amax, names, smooth, np.float32)  # as --auto's check writes
    g.nodes.remove(stand_in)
    stand_in.inputs.clear()
    return y


def _lowered(b: _Builder, build, base: str, into: list) -> gs.Variable:
    """Nodes that `build(graph)` writes (the real NVFP4/MXFP8 form), lowered in place by formats.emulation to
    standard ONNX with the same numbers, appended to `into`; returns the output."""
    g = gs.Graph(nodes=[], opset=b.graph.opset)
    out = build(g)
    y = b.var(base + "_emu_out", shape=out.shape)
    g.nodes.append(gs.Node("Identity", name=G.unique_name(base + "_emu_out", b.names), inputs=[out], outputs=[y]))
    g.outputs = [y]
    emulation.lower_graph(g)
    into.extend(g.nodes)
    return y


def _owners(plan) -> dict:
    """{(id(node), input index): name of the layer that owns that activation use} of a rules placement."""
    residual = {(id(a), j) for a, j in plan.residuals}
    return {(id(n), i): writer.activation_owner(n, i, residual).name for uses in plan.activations.values() for n, i in uses}


def _qdq(b: _Builder, x: gs.Tensor, scale: np.ndarray, fmt: str, into: list) -> gs.Variable:
    f = formats.get(fmt)
    s = b.const(f"{x.name}_{fmt}_scale", np.asarray(scale, np.float32))
    zp = b.const(f"{x.name}_{fmt}_zp", f.zero_point())
    q = b.node("QuantizeLinear", [x, s, zp], f"{x.name}_{fmt}_Q", dtype=f.np_dtype, shape=x.shape, into=into)
    return b.node("DequantizeLinear", [q, s, zp], f"{x.name}_{fmt}_DQ", shape=x.shape, into=into)


@dataclass
class _WeightJob:
    """One layer's weight gates: the graph reads they need, made on the main thread before any edit (workers
    then read no graph edge while the main thread rewires the graph)."""
    node: gs.Node
    layer: Layer
    formats: list       # the layer's weight candidates (empty: no constant weight)
    const: gs.Constant | None
    chain: list         # the Transposes/Casts between `const` and the layer (fold.weight_chain)
    mean: object        # E[x] of the layer's input (bias correction), or None
    out_shape: list | None
    hp: str
    block_size: int
    clip: object = None
    sm: object = None

    @classmethod
    def of(cls, node: gs.Node, layer: Layer, means: dict, hp: str, block_size: int, clip, sm) -> "_WeightJob":
        fmts = [f for f in layer.formats if f != "none"] if rules.is_weight(node.inputs[1]) else []
        const, chain = fold.weight_chain(node) if fmts else (None, [])
        corrects = node.op in bias_correction.OPS and bias_correction.bias_target(_NoGraph, node) is not None
        mean = means.get(node.inputs[0].name) if corrects else None
        return cls(node, layer, fmts, const, chain, mean, node.outputs[0].shape, hp, block_size, clip, sm)


@dataclass
class _Numbers:
    """A weight's numbers for its gates, made off the main thread: per format, the then-branch's constant (codes
    spilled; named when the graph takes it), the DequantizeLinear's (scale, attrs) (None: an FP32 fake weight) and
    the bias-correction shift; the FP32 weight where a format is made on the main thread (`_main_thread`)."""
    made: dict
    weight: np.ndarray | None = None
    codes: dict = field(default_factory=dict)  # format -> `Codes` (per-channel formats)


@dataclass(frozen=True)
class Codes:
    """A per-channel weight as the gated graph quantized it, in the form `quant.writer.write(quantized=)` takes."""
    const: str                  # the weight constant the layer reads (through its Transposes/Casts)
    values: object              # the codes as held: spilled (lazy) or an array
    scale: np.ndarray           # broadcast over the weight
    fp32_scale: float | None    # qdq.weight_codes': the smallest FP32 scale where FP16 scales would underflow
    shift: np.ndarray | None    # bias_correction.output_shift of the weight error (None: no correction)

    def written(self) -> tuple:
        """The writer's (job, (codes, scales, smallest FP32 scale, shift)) entry (the job is the writer's own)."""
        return None, (self.values, self.scale, self.fp32_scale, self.shift)


def _fp32_bytes(job: _WeightJob) -> int:
    return 4 * int(job.layer.params) if job.formats else 0


def _job_bytes(job: _WeightJob) -> int:
    return 4 * _fp32_bytes(job)  # the weight, its error, the cast's temporaries and codes (an SQ fake weight: +1)


def _with_context(jobs: list):
    for job in jobs:  # the spill file (modelfile.spilling) is a context variable: each job carries a copy
        yield contextvars.copy_context(), job


def _in_context(fn):
    return lambda item: item[0].run(fn, item[1])


def _main_thread(f: str) -> bool:
    """Candidates whose weights write graph nodes as they are made: block formats, low-rank branches."""
    return has_branch(f) or (f != smooth.SQ and formats.get(f).block_weight)


def _weight_numbers(job: _WeightJob) -> tuple:
    """(job, its `_Numbers`): reads the weight and quantizes it in each format; reads no graph edge (worker threads)."""
    if not job.formats:
        return job, _Numbers({})
    node, w = job.node, fold.chain_values(job.const, job.chain)  # as quant.writer reads it
    made, codes = {}, {}
    for f in job.formats:
        if _main_thread(f):
            continue
        held = None  # a per-channel weight's (codes, scales, smallest FP32 scale), kept for the final write
        corrects = job.mean is not None and formats.get(base_format(f)).bias_correction
        if f == smooth.SQ:  # SmoothQuant INT8: an FP32 fake weight (s ⊙ W quantized, ⊘ s)
            wq = smooth.fake_weight(node, w, job.sm, job.hp).astype(np.float32)
            made[f] = (modelfile.constant(f"{node.name}_{f}_w", wq), None)
            dw = wq - w if corrects else None
        elif not COMPACT_WEIGHTS:
            wq = fake_weight(node, w, f, job.hp, job.block_size, job.clip).astype(np.float32)
            made[f] = (modelfile.constant(f"{node.name}_{f}_w", wq), None)
            dw = wq - w if corrects else None
        else:  # the quantized weight (1 byte/param, INT4 0.5) behind a DequantizeLinear: `fake_weight`'s numbers
            fmt = formats.get(f)
            fp32_scale = None
            if fmt.weights == "per-channel":  # as quant.writer.quantize_job: the codes the final graph will hold
                axis = G.weight_output_channel_axis(node) % w.ndim
                q, scale, fp32_scale = qdq.weight_codes(fmt, w, axis, job.hp)
            else:
                q, scale, axis = quantized_weight(node, w, f, job.hp, job.block_size, job.clip)
            dw = _weight_error(fmt, q, scale, axis, w, job.block_size) if corrects else None  # only for the shift
            if fmt.weights == "per-block":
                attrs = {"axis": 1 - axis, "block_size": int(job.block_size)} if job.block_size else {"axis": axis}
                dq_scale = (scale[:, 0] if axis == 0 else scale[0]) if not job.block_size else scale
            else:
                dq_scale, attrs = scale.reshape(-1), {"axis": axis}
            qc = fmt.weight_constant(f"{node.name}_{f}_w_q", np.ascontiguousarray(q))  # spilled: stays lazy
            made[f] = (qc, (np.ascontiguousarray(dq_scale, dtype=np.float32), attrs))
            if fmt.weights == "per-channel":
                held = (modelfile.held_values(qc), scale, fp32_scale)
            del q
        raw = _output_shift(job, dw, f) if dw is not None else None
        made[f] += (_broadcast_shift(job, raw),)
        if held is not None:
            codes[f] = Codes(job.const.name, *held, raw)
        del dw
    return job, _Numbers(made, w if any(_main_thread(f) for f in job.formats) else None, codes)


def _weight_error(fmt, q: np.ndarray, scale: np.ndarray, axis: int, w: np.ndarray, block_size: int) -> np.ndarray:
    """dequantize(q, scale) - w. Where the format dequantizes as to_float(codes) * float32 scales, in place in one
    array: the same float32 operations as `dequantize` then the subtraction, without their two temporaries."""
    if type(fmt).dequantize is Format.dequantize and np.asarray(scale).dtype == np.float32:
        dw = fmt.to_float(q)
        dw *= scale
        dw -= w
        return dw
    return fmt.dequantize(q, scale, axis, block_size=block_size) - w


def _gate_weight(b: _Builder, job: _WeightJob, nums: _Numbers, block_clips: dict) -> None:
    """The layer's weight gates from `nums` (and the main-thread candidates'), names made here in the layers' order."""
    if not job.formats:
        return
    node, layer, w = job.node, job.layer, nums.weight
    y = node.outputs[0]
    # whether a shift exists depends on the format, op and shapes only (a zero error tells)
    if any(nums.made[f][2] is not None if f in nums.made else _bias_shift(job, np.zeros_like(w), f) is not None
           for f in job.formats):
        node.outputs[0] = pre = b.var(f"{y.name}_pre_bc", shape=y.shape)  # y becomes the bias-corrected output
    for f in job.formats:
        if f in nums.made:
            const, dq, shift = nums.made[f]
            make = _taken(b, node, f, const, dq, list(layer.wshape))
        else:  # a branch candidate quantizes the residual W - L1·L2 in its base format
            wf = _residual(node, w, layer.branch[f]) if has_branch(f) else w
            make, wq = _weight_maker(b, node, wf, base_format(f), job.hp, job.block_size,
                                     job.clip if not has_branch(f) else None, block_clips.get(f, (None, None)))
            shift = _bias_shift(job, wq - wf, f)
            del wq
        node.inputs[1] = b.branch(layer.name, f, node.inputs[1], make, f"{node.name}_{f}_w")
        if shift is not None:  # bias correction as the final graph folds it: the output moves by −ΔW·E[x]
            sc = b.const(f"{node.name}_{f}_bc", shift)
            pre = b.branch(layer.name, f, pre, lambda x, into, sc=sc: b.node("Add", [x, sc], f"{node.name}_{f}_bc",
                                                                             into=into, shape=y.shape),
                           f"{node.name}_{f}_bc")
    if node.outputs[0] is not y:
        b.graph.nodes.append(gs.Node("Identity", name=G.unique_name(f"{node.name}_bc_out", b.names), inputs=[pre],
                                     outputs=[y]))


def _taken(b: _Builder, node: gs.Node, f: str, const: gs.Constant, dq, shape: list):
    """The then-branch maker of a weight constant made by `_weight_numbers`, named now (as `_weight_maker` names)."""
    base = f"{node.name}_{f}_w"
    if dq is None:  # an FP32 fake weight
        const.name = G.unique_name(base, b.names)
        return lambda x, into: b.node("Identity", [const], f"{node.name}_{f}_wq", into=into, shape=shape)
    scale, attrs = dq
    const.name = G.unique_name(base + "_q", b.names)
    sc = b.const(base + "_scale", scale)
    return lambda x, into: b.node("DequantizeLinear", [const, sc], f"{node.name}_{f}_wq", attrs, into=into,
                                  shape=shape)


def _residual(node: gs.Node, w: np.ndarray, branch) -> np.ndarray:
    """The layer's weight `w` less its `branch`, in the layout it consumes (what the writer gets after lowrank.attach)."""
    res = lowrank.residual(fold.weight_matrix(node, w)[0], branch.l1, branch.l2)
    return lowrank.layer_weight(node, res, w.shape).astype(np.float32)


def _smoothing(cands: Candidates, node: gs.Node):
    """The int8-sq smoothing of the layer's input (None if int8-sq is not among its candidates)."""
    if smooth.SQ not in cands.layers[node.name].formats:
        return None
    return cands.smooth.get(node.inputs[0].name)


def _gate_smoothed(b: _Builder, plan, cands: Candidates, amax: dict, hp: str, owners: dict) -> None:
    """int8-sq activations: s ⊙ QDQ(x ⊘ s) on the layer's own input, the INT8 plan's plain QDQ on the other uses
    it owns (a residual Add), each behind the (layer, int8-sq) gate."""
    for tname, uses in plan.activations.items():
        for node, idx in uses:
            owner = owners[(id(node), idx)]
            if owner not in cands.layers or smooth.SQ not in cands.layers[owner].formats:
                continue
            x = node.inputs[idx]
            own = owner == node.name
            sm = cands.smooth.get(tname) if own and idx == 0 else None
            if own and idx == 0 and sm is None:
                continue
            if sm is None:
                scale = qdq.activation_scale(amax[smooth.BASE][tname], smooth.BASE, hp)
                make = lambda x, into, s=scale: _qdq(b, x, s, smooth.BASE, into)  # noqa: E731
            else:
                make = lambda x, into, sm=sm, node=node: _smoothed_qdq(b, x, sm, node, hp, into)  # noqa: E731
            node.inputs[idx] = b.branch(owner, smooth.SQ, x, make, f"{tname}_sq")


def _smoothed_qdq(b: _Builder, x: gs.Tensor, sm, node: gs.Node, hp: str, into: list) -> gs.Variable:
    rank = len(x.shape) if x.shape is not None else None
    axis = G.activation_channel_axis(node)
    inv = smooth.activation_factor(1.0 / sm.s, axis, rank)  # x · (1/s), as the final graph's Mul
    xs = b.node("Mul", [x, b.const(f"{x.name}_sq_inv", inv)], f"{x.name}_sq_div", shape=x.shape, into=into)
    y = _qdq(b, xs, smooth.activation_scale(sm, hp), smooth.BASE, into)
    s = smooth.activation_factor(sm.s, axis, rank)
    return b.node("Mul", [y, b.const(f"{x.name}_sq_s", s)], f"{x.name}_sq_mul", shape=x.shape, into=into)


COMPACT_WEIGHTS = True  # False: FP32 fake-quant constants (4 bytes/param; the reference the tests compare with)


def _weight_maker(b: _Builder, node: gs.Node, w: np.ndarray, fmt: str, hp: str, block_size: int, clip,
                  block=(None, None)):
    """(then-branch maker, the weight it gives) of a weight gate: the quantized weight (1 byte/param, INT4 0.5)
    behind a DequantizeLinear, which gives exactly `fake_weight`'s numbers (the same q, float32 scales, one multiply)."""
    base = f"{node.name}_{fmt}_w"
    if formats.get(fmt).block_weight:  # block formats (W4A4 or weight-only): the writer's own weight nodes, lowered (exact)
        return _block_weight_maker(b, node, w, formats.get(fmt), *block)
    if not COMPACT_WEIGHTS:
        wq = fake_weight(node, w, fmt, hp, block_size, clip).astype(np.float32)
        wc = modelfile.constant(G.unique_name(base, b.names), wq)
        return (lambda x, into: b.node("Identity", [wc], f"{node.name}_{fmt}_wq", into=into, shape=list(w.shape))), wq
    f = formats.get(fmt)
    q, scale, axis = quantized_weight(node, w, fmt, hp, block_size, clip)
    wq = f.dequantize(q, scale, axis, block_size=block_size)
    if f.weights == "per-block":
        attrs = {"axis": 1 - axis, "block_size": int(block_size)} if block_size else {"axis": axis}
        if not block_size:
            scale = scale[:, 0] if axis == 0 else scale[0]
    else:
        scale, attrs = scale.reshape(-1), {"axis": axis}
    qc = f.weight_constant(G.unique_name(base + "_q", b.names), np.ascontiguousarray(q))  # spilled: stays lazy
    sc = b.const(base + "_scale", np.ascontiguousarray(scale, dtype=np.float32))
    return (lambda x, into: b.node("DequantizeLinear", [qc, sc], f"{node.name}_{fmt}_wq", attrs, into=into,
                                   shape=list(w.shape))), wq


def _block_weight_maker(b: _Builder, node: gs.Node, w: np.ndarray, f, clip=None, smooth=None):
    """(then-branch maker, the weight it gives) of a block-format weight gate: quant.writer.write_block_weight's
    nodes on a stand-in layer (with the candidate's AWQ `clip`), lowered to one constant of exactly the numbers
    they dequantize to."""
    g = gs.Graph(nodes=[], opset=b.graph.opset)
    stand_in = gs.Node(node.op, inputs=[node.inputs[0], gs.Constant(f"{node.name}_{f.name}_w_src", w)],
                       outputs=[], attrs=dict(node.attrs))
    out, _ = writer.write_block_weight(g, stand_in, f, b.names, clip, smooth, np.float32)
    stand_in.inputs.clear()
    y = b.var(f"{node.name}_{f.name}_wq_out", shape=list(w.shape))
    keep = gs.Node("Identity", name=G.unique_name(f"{node.name}_{f.name}_wq", b.names), inputs=[out], outputs=[y])
    g.nodes.append(keep)
    g.outputs = [y]
    emulation.lower_graph(g)
    wc = keep.inputs[0]
    while not isinstance(wc, gs.Constant) and len(wc.inputs) == 1 and wc.inputs[0].op == "Cast":
        wc = wc.inputs[0].inputs[0]  # MXFP8: its FP16 output cast to the FP32 graph's type (exact)
    wq = np.asarray(wc.values, np.float32)
    if np.dtype(wc.dtype) != np.float32:
        wc = b.const(f"{node.name}_{f.name}_wq_f32", wq)
    keep.inputs.clear()
    keep.outputs.clear()
    return (lambda x, into: b.node("Identity", [wc], f"{node.name}_{f.name}_wq", into=into, shape=list(w.shape))), wq


def _bias_shift(job: _WeightJob, dw, fmt):
    """−ΔW·E[x] shaped to broadcast over the layer output, where the QDQ pass folds bias correction."""
    return _broadcast_shift(job, _output_shift(job, dw, fmt))


def _output_shift(job: _WeightJob, dw, fmt):
    """bias_correction.output_shift of the weight error `dw` (None where the QDQ pass folds no correction)."""
    if not formats.get(base_format(fmt)).bias_correction or job.mean is None:
        return None
    return bias_correction.output_shift(job.node, dw, np.asarray(job.mean, np.float64))


def _broadcast_shift(job: _WeightJob, shift):
    if shift is None:
        return None
    shape = [-1] + [1] * (len(job.out_shape) - 2) if job.node.op != "Gemm" and job.out_shape else [-1]
    return (-shift).astype(np.float32).reshape(shape)


class _NoGraph:  # bias_target only reads the node
    pass




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


