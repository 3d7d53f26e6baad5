"""The one writer: any `QuantPlan` (layer -> format, with its reason) becomes Q/DQ in one strongly typed graph.

Formats with static activations (FP8, INT8) get W8A8 Q/DQ where the TensorRT rules place them (`quant.rules`,
one placement per format, filtered to the plan's layers), weights per output channel behind a DequantizeLinear
and bias correction; weight-only formats (INT4) a blocked DequantizeLinear on the weight; int8-sq layers are
smoothed (x ⊘ s, W ⊙ s) first and then written in their base format. `--fp8` is the plan "FP8 wherever the
rules allow" (`QuantPlan.uniform`); `--auto`'s search picks a plan per layer. Every number comes from the
format objects (onnxopt.formats), as the search's gated graph's do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..toposort import toposort
from .. import formats
from ..rewrite import fold
from .. import threads as threads_
from .. import graph as G
from ..formats import Format
from . import bias_correction, qdq, rules, shared_rounding

WEIGHT_ONLY_OPS = ("MatMul", "Gemm")


@dataclass
class Choice:
    format: str             # a registered format name, or "none" (left to autocast)
    reason: str = ""        # why: "rules", "preset", "search: ...", "override file"


@dataclass
class QuantPlan:
    """The hand-off between deciding and writing: each layer's format and reason, plus what the writer needs
    of the decision (statistics, search results)."""
    layers: dict                                  # layer name -> Choice
    configs: dict = field(default_factory=dict)   # static format -> the QDQ options its rules placement uses
    placements: dict = field(default_factory=dict)  # static format -> rules.Plan already made on this graph
    amax: dict = field(default_factory=dict)      # static format -> {tensor: calibrated range}
    means: dict = field(default_factory=dict)     # tensor -> channel mean (bias correction); empty: none
    block_size: int = 128                         # per-block formats
    clips: dict = field(default_factory=dict)     # weight-only layer -> AWQ clip ratios, or (codes, scales)
    smooth: dict = field(default_factory=dict)    # activation -> autoquant.smooth.Smoothing (int8-sq layers)
    hessians: dict = field(default_factory=dict)  # weight read by several layers -> Σ XᵀX of all uses (shared_rounding)
    block_smooth: dict = field(default_factory=dict)  # block-format layer -> Smooth (its own input scaling)

    @classmethod
    def from_mix(cls, mix: dict, reason: str = "", **kw) -> "QuantPlan":
        """A plan from {layer: format name}."""
        return cls({n: Choice(f, reason) for n, f in mix.items()}, **kw)

    @classmethod
    def uniform(cls, fmt: str, placement, amax: dict, means: dict, **kw) -> "QuantPlan":
        """`fmt` on every layer the rules placement quantizes (--fp8, --int8)."""
        return cls({n.name: Choice(fmt, "rules") for n in placement.nodes}, placements={fmt: placement},
                   amax={fmt: amax}, means=means, **kw)

    def mix(self) -> dict:
        """{layer: format name}."""
        return {n: c.format for n, c in self.layers.items()}


def write(graph: gs.Graph, plan: QuantPlan, *, high_precision: str, threads: int = 0, quantized: dict | None = None,
          block_dtype=None, in_flight_bytes: int = threads_.IN_FLIGHT_BYTES) -> dict:
    """Quantize each layer of `graph` in place to its format in `plan` (weights on `threads` worker threads,
    0: one per core; the result does not depend on it; at most `in_flight_bytes` of memory for weights being quantized
    or waiting to be written at once (their work counted as `JOB_FP32_COPIES` copies of the FP32 weight), each
    written (spilled) before the next is taken). `quantized` ({(weight constant name, format): result of
    `quantize_weights`}; codes as arrays or as values spilled already, quant.prequantize) supplies per-channel weights
    quantized earlier, which are not quantized again.
    `block_dtype` np.float32: block formats whose TensorRT dequantizers output FP16 (MXFP8) are cast to it, for a
    graph evaluated before Autocast (--auto's check); None: TensorRT's own types (the file; Autocast follows).
    Returns {layer: info}."""
    hp = high_precision
    mix, amax, means, smoothed = _smooth_inputs(graph, plan)
    used = set(mix.values())
    placements = dict(plan.placements) or {f: rules.plan(graph, plan.configs[f]) for f in formats.static() if f in used}
    layers: dict[str, dict] = {}
    tensors = graph.tensors()
    names = G.taken_names(graph)
    for f, place in placements.items():
        residual = {(id(a), i) for a, i in place.residuals}
        for tname, uses in place.activations.items():
            mine = [(n, i) for n, i in uses if mix.get(activation_owner(n, i, residual).name) == f]
            if mine:
                scale = qdq.activation_scale(amax[f][tname], f, hp)
                qdq.insert_activation_qdq(graph, tensors[tname], mine, scale, f,
                                          base=G.unique_name(f"{tname}_{f}", names) if len(placements) > 1 else None)
        shared = {c.name for _, _, c, _ in place.weights if len(c.outputs) > 1}
        jobs, first = [], set()
        for node, idx, const, axis in place.weights:
            if mix.get(node.name) == f and const.name not in first:
                first.add(const.name)
                # One weight read by several layers gets no bias correction (one correction cannot fit every reader).
                mean = (means.get(_unquantized(node.inputs[0]).name)
                        if node.op in bias_correction.OPS and const.name not in shared else None)
                chain = fold.weight_chain(node, idx)[1] if node.inputs[idx] is not const else None
                jobs.append(WeightJob(node, const, chain, axis, f, hp, mean, plan.hessians.get(const.name)))
        # The numbers in worker threads (or from `quantized`, computed before), the graph edits here in plan
        # order: the same graph at any thread count.
        have = quantized or {}
        todo = [j for j in jobs if (j.const.name, f) not in have]
        by_const = {j.const.name: j for j in jobs}
        # Bounded by bytes in flight (threads.IN_FLIGHT_BYTES): each result is spilled below before the next is taken.
        fresh = threads_.ordered_map(quantize_job, todo, threads_.for_bytes(jobs_bytes(todo), threads), cost=job_bytes,
                                     budget=in_flight_bytes)
        done: dict = {}
        for node, idx, const, axis in place.weights:
            if mix.get(node.name) != f:
                continue
            if const.name not in done:
                if (const.name, f) in have:
                    job = by_const[const.name]
                    q, scale, fp32_scale, shift = have[(const.name, f)][1]
                else:
                    job, (q, scale, fp32_scale, shift) = next(fresh)
                    assert job.const is const
                extra = {}
                if job.mean is not None:
                    extra["bias_correction"] = bias_correction.apply_shift(graph, node, shift)
                done[const.name] = qdq.write_weight_codes(graph, const, axis, f, q, scale, fp32_scale)
                layers[node.name] = {"format": f, **done[const.name][1], **extra}
            node.inputs[idx] = done[const.name][0]
        for node in place.nodes:
            if mix.get(node.name) == f:
                layers.setdefault(node.name, {"format": f})
    per_layer = [(n, formats.get(mix[n.name])) for n in graph.nodes
                 if mix.get(n.name, "none") != "none" and not formats.get(mix[n.name]).planned and n.op in WEIGHT_ONLY_OPS]
    wo, _, _ = write_per_layer(graph, [(n, f) for n, f in per_layer if not f.block_weight], plan.block_size,
                               plan.clips, hp, names)
    layers.update(wo)
    ranges = amax.get(formats.FP8.name, {})  # block formats' per-tensor activation scales: FP8's calibration (max)
    for node, f in per_layer:
        if f.block_weight:  # the format's own weight nodes; its dynamic quantizer too unless weight-only (nvfp4-wo)
            before = {id(n) for n in graph.nodes}
            sm = plan.block_smooth.get(node.name)
            if f.activations == "dynamic":
                write_block_activation(graph, node, f, ranges.get(node.inputs[0].name), names, sm, block_dtype)  # K: first
            layers[node.name] = write_block_weight(graph, node, f, names, plan.clips.get(node.name), sm, block_dtype)[1]
            if sm is not None:
                layers[node.name]["smoothing"] = {"alpha": sm.alpha, "amax": sm.amax}
            if "tensor_scale" in layers[node.name]:  # NVFP4's FP32 tensor scales (amax / 2688 underflows FP16); MXFP8 has none
                layers[node.name]["fp32_nodes"] = [n.name for n in graph.nodes if id(n) not in before]
    for name, how in smoothed.items():
        layers.setdefault(name, {})["format"] = plan.layers[name].format
        layers[name]["smoothing"] = how
    return layers


@dataclass
class WeightJob:
    """One per-channel weight of a static-activation layer to quantize (the numbers only; no graph edit)."""
    node: gs.Node
    const: gs.Constant
    chain: list | None         # the view nodes (Transpose, Cast) between const and the layer (fold.weight_chain)
    axis: int
    format: str
    high_precision: str
    mean: np.ndarray | None    # input channel means: bias correction
    hessian: np.ndarray | None = None   # Σ XᵀX over every layer reading a shared weight: rounded for all uses


def quantize_job(job: WeightJob) -> tuple:
    """(codes, scales, smallest FP32 scale or None, bias-correction output shift or None) of one weight, as
    `write` stores it. Reads the weight (lazily, from its file) and touches no graph: safe in worker threads."""
    w = job_weight(job)
    f = formats.get(job.format)
    q, scale, fp32_scale = qdq.weight_codes(f, w, job.axis, job.high_precision)
    if job.hessian is not None:
        q = shared_rounding.codes(f, w, job.axis, scale, q, job.hessian, job.const.name)
    return job_result(job, w, f, q, scale, fp32_scale)


def job_weight(job: WeightJob) -> np.ndarray:
    """The job's weight as the layer reads it (FP32), read now (not cached on the graph)."""
    values = fold.chain_values(job.const, job.chain) if job.chain is not None else G.read_values(job.const)
    return np.asarray(values, dtype=np.float32)


def job_result(job: WeightJob, w: np.ndarray, f, q, scale, fp32_scale) -> tuple:
    """`quantize_job`'s result for weight `w` with these codes: adds the bias-correction output shift."""
    shift = None
    if job.mean is not None:
        shift = _output_shift(job.node, w, f, q, scale, np.asarray(job.mean, dtype=np.float64))
    return job, (q, scale, fp32_scale, shift)


def _output_shift(node: gs.Node, w: np.ndarray, f, q: np.ndarray, scale: np.ndarray, mean: np.ndarray):
    """bias_correction.output_shift of the weight error dequantize(q, scale) - w: computed in place, and for a
    big ungrouped Conv in parts of output channels (its shift is a sum within each output channel: the same
    numbers), so a job holds one FP32 temporary of at most a part, not two of the weight."""
    if type(f).dequantize is not Format.dequantize or np.ndim(scale) != w.ndim:
        return bias_correction.output_shift(node, f.dequantize(q, scale) - w, mean)

    def error(sl):
        dw = f.to_float(q[sl])
        dw *= scale[sl] if scale.shape[0] == w.shape[0] else scale
        dw -= w[sl]
        return dw
    rows = w.shape[0] if w.ndim else 0
    if node.op != "Conv" or int(node.attrs.get("group", 1)) != 1 or rows < 2 or w.nbytes <= qdq.CAST_PART_BYTES:
        return bias_correction.output_shift(node, error(slice(None)), mean)
    step = max(1, qdq.CAST_PART_BYTES // (w.nbytes // rows))
    parts = [bias_correction.output_shift(node, error(slice(i, i + step)), mean) for i in range(0, rows, step)]
    return None if any(p is None for p in parts) else np.concatenate(parts)


def weight_jobs(graph: gs.Graph, plan: QuantPlan, *, high_precision: str) -> list:
    """The per-channel weights `write(graph, plan)` will quantize, as WeightJobs (no graph edit, no weight read)."""
    mix = plan.mix()
    view = {n: (formats.get(f).base or f) if f != "none" else f for n, f in mix.items()}
    placements = dict(plan.placements) or {f: rules.plan(graph, plan.configs[f]) for f in formats.static()
                                           if f in set(view.values())}
    jobs = []
    for f, place in placements.items():
        shared = {c.name for _, _, c, _ in place.weights if len(c.outputs) > 1}
        first = set()
        for node, idx, const, axis in place.weights:
            if view.get(node.name) == f and const.name not in first and not formats.get(mix[node.name]).base:
                first.add(const.name)
                mean = (plan.means.get(_unquantized(node.inputs[0]).name)
                        if node.op in bias_correction.OPS and const.name not in shared else None)
                chain = fold.weight_chain(node, idx)[1] if node.inputs[idx] is not const else None
                jobs.append(WeightJob(node, const, chain, axis, f, high_precision, mean, plan.hessians.get(const.name)))
    return jobs


def quantize_weights(graph: gs.Graph, plan: QuantPlan, *, high_precision: str, threads: int = 0) -> dict:
    """Each per-channel (FP8/INT8) weight of `plan` quantized once, on `threads` worker threads:
    {(weight constant name, format): (WeightJob, (codes, scales, smallest FP32 scale or None, bias-correction
    shift or None))}, exactly what `write` computes. Give the result to `write(..., quantized=...)` (and read the
    codes for a search's gated graph) so that no weight is quantized twice. Smoothed (int8-sq) layers are not
    included: their weights change when the writer folds the smoothing."""
    jobs = weight_jobs(graph, plan, high_precision=high_precision)
    return {(j.const.name, j.format): r for j, r in
            ((r[0], r) for r in threads_.ordered_map(quantize_job, jobs, threads_.for_bytes(jobs_bytes(jobs), threads)))}


# A job's peak, in FP32 copies of its weight (tracemalloc, the read included): whole, the read weight, w / scale,
# the cast's temporaries and codes, bias correction's error (FP8/INT8: 3.25-4.0); above qdq.CAST_PART_BYTES, cast
# and bias-correction error in parts of rows: the read weight, codes, a Conv's error or a part's temporaries (1.8-2.2).
JOB_FP32_COPIES = 4
JOB_FP32_COPIES_IN_PARTS = 2.5


def job_bytes(job: WeightJob) -> int:
    """Memory one job holds at its peak (from the weight's shape; nothing is read)."""
    b = _fp32_bytes(job)
    parts = b > qdq.CAST_PART_BYTES and job.hessian is None  # (shared rounding: its own temporaries)
    return int((JOB_FP32_COPIES_IN_PARTS if parts else JOB_FP32_COPIES) * b)


def _fp32_bytes(job: WeightJob) -> int:
    return 4 * int(np.prod(job.const.shape)) if job.const.shape is not None else 0


def jobs_bytes(jobs: list) -> int:
    """FP32 bytes of the weights of `jobs` (from their shapes; nothing is read)."""
    return sum(_fp32_bytes(j) for j in jobs)


def write_per_layer(graph: gs.Graph, layers: list, block_size: int, clips: dict, hp: str, names: set
                    ) -> tuple[dict, int, int]:
    """(node, format) layers of formats without a static placement, in place: the weight (each once however many
    layers read it) behind a DequantizeLinear; for a format with dynamic activations, also its activation nodes
    (`Format.write_dynamic_activation`) on the layer's input. Returns ({layer: info}, weight bytes before, after)."""
    done: dict[tuple, tuple[gs.Variable, dict]] = {}
    out, before, after = {}, 0, 0
    for node, fmt in layers:
        clip = (clips or {}).get(node.name)
        # one stored weight per matrix (through Identity/Cast views; ALBERT's layer read at every depth) and format
        key = (fold.weight_key(node), node.op == "Gemm" and bool(node.attrs.get("transB", 0)), fmt.name,
               None if clip is None else node.name)
        if key not in done:
            w = G.to_kn(node, fold.effective_weight(node))
            before += w.size * np.dtype(node.inputs[1].dtype or np.float32).itemsize
            done[key] = write_weight(graph, node, w, fmt, block_size, clip, hp, names)
            after += done[key][1]["bytes"]
            node.inputs[1], info = done[key]
        else:
            node.inputs[1], info = per_use_dequantize(graph, done[key][0], names), done[key][1]
        out[node.name] = dict(info)
        if fmt.activations == "dynamic":
            x = node.inputs[0]
            fmt.write_dynamic_activation(graph, x, [(node, 0)], axis=G.activation_channel_axis(node),
                                         base=G.unique_name(f"{x.name}_{fmt.name}", names))
    return out, before, after


def per_use_dequantize(graph: gs.Graph, dq_out: gs.Variable, names: set) -> gs.Variable:
    """A further reader's DequantizeLinear of a weight already written: the same codes initializer, its own copy of
    the (small) scales. TensorRT-RTX 1.7.1 cannot build one INT4 DequantizeLinear, or one scale tensor, feeding
    several GEMMs (Myelin vector::_M_range_check); this form builds, the codes stored once (BENCHMARKS.md
    "INT4 weights shared by several GEMMs")."""
    dq = dq_out.inputs[0]
    copies = [gs.Constant(G.unique_name(f"{t.name}_use", names), np.array(t.values)) for t in dq.inputs[1:]]
    out = gs.Variable(G.unique_name(f"{dq_out.name}_use", names), dtype=dq_out.dtype, shape=dq_out.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", name=G.unique_name(f"{dq.name}_use", names), inputs=[dq.inputs[0], *copies],
                               outputs=[out], attrs=dict(dq.attrs)))
    return out


@dataclass
class Smooth:
    """A block-format layer's own input scaling (--auto's W4A4 helper): the layer reads x ⊘ s (a Mul in front of
    its dynamic quantizer, whose per-tensor range is `amax`) and s ⊙ W (K rows scaled)."""
    s: np.ndarray
    amax: float
    alpha: float = 0.0


def write_block_weight(graph: gs.Graph, node: gs.Node, fmt: Format, names: set, clip=None, smooth: Smooth | None = None,
                       dtype=None) -> tuple[gs.Variable, dict]:
    """The layer's weight in a block format with dynamic activations (NVFP4, MXFP8), the format's own nodes, wired
    into the layer (`clip`: AWQ's clip ratios or error-fed codes, [K, N] layout; `dtype`: as `write`'s block_dtype);
    the gated graph of --auto lowers these very nodes for ONNX Runtime. Returns (output, info)."""
    trans = bool(node.op == "Gemm" and node.attrs.get("transB", 0))
    w_kn = G.to_kn(node, fold.effective_weight(node))
    if smooth is not None:
        w_kn = (w_kn * smooth.s[:, None]).astype(np.float32)
    out, info = fmt.write_block_weight(graph, node.inputs[1].name, w_kn, trans, lambda s: G.unique_name(s, names), clip=clip,
                                       dtype=dtype)
    node.inputs[1] = out
    return out, {**info, "format": fmt.name}


def write_block_activation(graph: gs.Graph, node: gs.Node, fmt: Format, amax, names: set, smooth: Smooth | None = None,
                           dtype=None) -> gs.Variable:
    """The format's dynamic quantizer on the layer's input (its per-tensor scale from `amax`, where the format has
    one), wired into the layer; with `smooth`, on x ⊘ s (a Mul of its own, range smooth.amax). Returns its output."""
    trans = bool(node.op == "Gemm" and node.attrs.get("transB", 0))
    k = int(fold.effective_shape(node)[1 if trans else 0])
    x = node.inputs[0]
    if smooth is not None:
        inv = gs.Constant(G.unique_name(f"{node.name}_w4a4_inv_s", names), (1.0 / smooth.s).astype(np.float32))
        xs = gs.Variable(G.unique_name(f"{x.name}_w4a4_smoothed", names), dtype=x.dtype or np.float32, shape=x.shape)
        graph.nodes.append(gs.Node("Mul", name=G.unique_name(f"{node.name}_w4a4_smooth", names), inputs=[x, inv],
                                   outputs=[xs]))
        node.inputs[0] = x = xs
        amax = smooth.amax
    return fmt.write_dynamic_activation(graph, x, [(node, 0)], amax=amax, name=lambda s: G.unique_name(s, names), k=k,
                                        dtype=dtype)


def fusable_block_size(k: int, block_size: int) -> int:
    """The DequantizeLinear block size TensorRT(-RTX) fuses into its weight-only INT4 GEMM for reduction size `k`.

    Its builder fuses only weights with at least two blocks along K: with one (per-channel, or K <= block
    size) the DequantizeLinear runs as its own kernel and the GEMM in FP16 (measured on TensorRT-RTX 1.7.1:
    K=64/128 with block 128, K=256 with block 256, per-channel at any K). One block is written as two halves
    with the same scale. Odd K has no such split (the parser rejects its blocked INT4 weights anyway)."""
    if (block_size and block_size < k) or k < 2 or k % 2:
        return block_size
    return k // 2


def write_weight(graph: gs.Graph, node: gs.Node, w_kn: np.ndarray, fmt: Format, block_size: int, clip,
                 high_precision: str, names: set) -> tuple[gs.Variable, dict]:
    """Quantized weight + DequantizeLinear in the node's own weight layout; returns the DQ output. A per-block
    format (INT4) takes `clip`: per-block clip ratios, or the (codes, scales) error-feedback rounding chose;
    a per-channel one (INT8 of --int8-layers) quantizes per output column."""
    trans = node.op == "Gemm" and node.attrs.get("transB", 0)
    k, n = w_kn.shape
    base = G.unique_name(f"{node.inputs[1].name}_{fmt.name}", names)
    if fmt.weights == "per-block":
        q, scale = clip if isinstance(clip, tuple) else fmt.quantize_weight(w_kn, 1, high_precision,
                                                                            block_size=block_size, clip=clip)
        info = {"format": fmt.name, "bits": fmt.bits, "block_size": block_size, "blocks": int(scale.shape[0])}
        split = fusable_block_size(k, block_size)
        if split != block_size:  # one block along K: the same scale written for two half blocks (same numbers)
            scale, block_size = np.repeat(scale[:1], 2, axis=0), split
            info["dq_block_size"] = split
        if block_size:
            attrs = {"axis": 1 if trans else 0, "block_size": int(block_size)}
        else:  # one block per output channel: per-axis scales
            scale = scale[0]
            attrs = {"axis": 0 if trans else 1}
    else:
        q, scale = fmt.quantize_weight(w_kn, 1, high_precision)
        scale = scale.reshape(-1)
        attrs = {"axis": 0 if trans else 1}
        info = {"format": fmt.name, "bits": fmt.bits, "per_channel": True}
    if trans:
        q, scale = q.T, scale.T
    q = np.ascontiguousarray(q)
    dtype = node.inputs[1].dtype if G.is_float(node.inputs[1]) else np.float32
    out = fmt.write_weight(graph, base, q, scale, attrs, zero_point=False, dtype=dtype, qname=base,
                           unique=lambda s: G.unique_name(s, names))
    info["bytes"] = int(-(-q.size * fmt.bits // 8) + scale.size * 4)
    return out, info


# ---------------------------------------------------------------- the effective weight
def fake_weight(node: gs.Node, w: np.ndarray, fmt: str, hp: str, block_size: int, clip=None) -> np.ndarray:
    """What the layer will see of weight `w` (its consumed layout) in `fmt` (per-block: with AWQ clip ratios)."""
    q, scale, axis = quantized_weight(node, w, fmt, hp, block_size, clip)
    return formats.get(fmt).dequantize(q, scale, axis, block_size=block_size)


def quantized_weight(node: gs.Node, w: np.ndarray, fmt: str, hp: str, block_size: int = 0, clip=None):
    """(codes, scales, output-channel axis) of the layer's weight `w` in `fmt`, as the final graph writes it."""
    axis = G.weight_output_channel_axis(node) % w.ndim
    f = formats.get(fmt)
    if f.weights == "per-channel":
        q, scale, _ = qdq.weight_codes(f, w, axis, hp)
    else:
        q, scale = f.quantize_weight(w, axis, hp, block_size=block_size, clip=clip)
    return q, scale, axis


def _smooth_inputs(graph: gs.Graph, plan: QuantPlan):
    """Smoothed layers (a format whose `base` is another, after SmoothQuant: int8-sq): x ⊘ s folded into x's
    producer where every reader of x is smoothed and the producer is a norm, else a Mul in front of these
    layers; W ⊙ s. They then quantize in the base format, the smoothed activation's range (and bias-correction
    mean) under its new name. Returns the base-format view (mix, amax, means) and {layer: how s was folded}."""
    mix = plan.mix()
    sq = {n for n, f in mix.items() if f != "none" and formats.get(f).base}
    if not sq:
        return mix, plan.amax, plan.means, {}
    amax = {k: dict(v) for k, v in plan.amax.items()}
    means, done = dict(plan.means), {}
    by_name = {n.name: n for n in graph.nodes}
    taken = G.taken_names(graph)  # once, kept up to date by each fold (not a walk of the graph per layer)
    todo = [(t, sm, [by_name[n] for n in sm.layers if n in sq]) for t, sm in plan.smooth.items()]
    todo = [x for x in todo if x[2]]
    # Activations whose layers read one weight constant and share one s (autoquant.smooth.finish): each divided on
    # its own, the weight multiplied once, so it stays one tensor (different s: a scaled copy per activation).
    units = [u for u in fold.tied([nodes for _, _, nodes in todo])
             if len(u) > 1 and all(np.array_equal(todo[i][1].s, todo[u[0]][1].s) for i in u)]
    shared = {i for u in units for i in u}
    for i, (tname, sm, nodes) in enumerate(todo):
        x = nodes[0].inputs[0]
        p = x.inputs[0] if x.inputs else None
        if not (p is not None and fold.is_norm(p) and len(x.outputs) == len(nodes)):
            # a private Identity in front of the layers: fold finds no producer to fold into and inserts the Mul
            xi = gs.Variable(G.unique_name(f"{tname}_sq_in", taken), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Identity", name=xi.name, inputs=[x], outputs=[xi]))
            for n in nodes:
                n.inputs[0] = xi
        how = fold.fold_input_scale(graph, nodes, sm.s, weights=i not in shared, norm_only=i in shared, taken=taken)
        new = nodes[0].inputs[0].name
        base = formats.get(mix[nodes[0].name]).base
        amax.setdefault(base, {})[new] = sm.amax
        if tname in means:  # the mean of x ⊘ s, so that bias correction sees what the gated graph saw
            means[new] = np.asarray(means[tname], np.float64).reshape(-1) / sm.s
        for n in nodes:
            done[n.name] = how
    for u in units:
        fold.scale_weights(graph, [n for i in u for n in todo[i][2]], todo[u[0]][1].s)
    toposort(graph.cleanup())
    view = {n: (formats.get(f).base or f) if f != "none" else f for n, f in mix.items()}
    return view, amax, means, done


def _unquantized(t: gs.Tensor) -> gs.Tensor:
    """The tensor behind an activation Q/DQ pair (inserted above): bias-correction means are keyed by it."""
    dq = t.inputs[0] if t.inputs else None
    if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0].inputs and dq.inputs[0].inputs[0].op == "QuantizeLinear":
        return dq.inputs[0].inputs[0].inputs[0]
    return t


def activation_owner(node: gs.Node, idx: int, residual: set) -> gs.Node:
    """The layer an activation use belongs to: the node itself, or for a residual Add the Conv feeding it."""
    if (id(node), idx) in residual:
        return node.inputs[1 - idx].inputs[0]
    return node
