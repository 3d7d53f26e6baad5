"""Where Q/DQ go, for TensorRT. Each rule is a small function that returns None when the node may be
quantized, or the reason it must not be; `plan` runs them and records every decision.

TensorRT fuses DequantizeLinear into the consuming Conv/ConvTranspose/MatMul/Gemm when every data input
of that layer is Q/DQ'd (weights pre-quantized behind a DequantizeLinear, activations per tensor), and
fuses a residual Add into the Conv when the Add's other input is Q/DQ'd as well.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from ..rewrite import lowrank
from ..cast.autocast import shape_nodes

# Head sizes of TensorRT's fused multi-head-attention kernels.
MHA_HEAD_SIZES = (16, 32, 40, 64, 80, 96, 104, 128, 160, 192, 256)
MIN_GEMM_DIM = 16
MAX_INT8_MHA_SEQ = 512


@dataclass
class Context:
    config: object
    shape_nodes: set
    exclude: list
    graph_inputs: set
    int8_conv_floor: int = 0  # INT8 convs with fewer weights stay FP16 (rule_int8_small_conv)


@dataclass
class Plan:
    nodes: list = field(default_factory=list)                # quantized layers
    activations: dict = field(default_factory=dict)          # tensor name -> [(node, input index)]
    weights: list = field(default_factory=list)              # (node, input index, constant, axis)
    skipped: dict = field(default_factory=dict)              # node name -> reason
    residuals: list = field(default_factory=list)            # (add node, input index)
    shared_scales: list = field(default_factory=list)        # groups of tensor names sharing one scale
    fixed_amax: dict = field(default_factory=dict)           # tensor name -> amax known without calibration
    unshared: list = field(default_factory=list)             # (tensor names, reason): kept out of a Concat's scale


# ---------------------------------------------------------------- rules (None = go ahead)
def rule_op_type(node, ctx):
    """Only the layers TensorRT runs in low precision are quantized (norms and softmax stay high precision)."""
    return None if node.op in ctx.config.op_types and node.op in G.WEIGHT_OPS else f"op {node.op} is not quantized"


def rule_lowrank_branch(node, ctx):
    """Low-rank branch GEMMs stay high precision: they hold the weight's largest singular directions, the
    part the branch exists to keep out of quantization; with K or N = r they are thin GEMMs whose Q/DQ
    would cost more than it saves (onnxopt.rewrite.lowrank)."""
    return "low-rank branch GEMM stays high precision" if lowrank.is_branch(node) else None


def rule_user_exclude(node, ctx):
    """--exclude REGEX on node names."""
    for rx in ctx.exclude:
        if rx.search(node.name or ""):
            return f"excluded by --exclude {rx.pattern}"
    return None


def rule_float_data(node, ctx):
    """Integer tensors are never quantized (index math, token ids)."""
    for t in node.inputs[:2]:
        if not G.is_float(t):
            return f"input {t.name} is not a float tensor"
    return None


def rule_not_shape_subgraph(node, ctx):
    """Shape computations are left alone."""
    return "part of a shape subgraph" if id(node) in ctx.shape_nodes else None


def rule_not_prequantized(node, ctx):
    """A weight already behind a DequantizeLinear is not quantized twice."""
    for t in node.inputs[:2]:
        if t.inputs and t.inputs[0].op == "DequantizeLinear":
            return "already quantized"
    return None


def rule_gemm_size(node, ctx):
    """Small GEMMs (K or N < 16) and GEMV (M = 1) run faster in FP16 than with Q/DQ on TensorRT."""
    if node.op not in ("MatMul", "Gemm"):
        return None
    k, n, m = _gemm_dims(node)
    if k is not None and k < MIN_GEMM_DIM:
        return f"K={k} < {MIN_GEMM_DIM}"
    if n is not None and n < MIN_GEMM_DIM:
        return f"N={n} < {MIN_GEMM_DIM}"
    if m == 1:
        return "GEMV (M=1)"
    return None


def rule_conditioning_gemv(node, ctx):
    """A GEMM over per-sample vectors (2-D rows: the batch) whose result is broadcast over a feature map, as a
    diffusion UNet's time/class conditioning is (its embedding MLP and each block's projection), runs as a GEMV
    at deployment batch sizes: no faster with Q/DQ, and its error shifts every position of the map (the real
    terrain UNet: five such Gemms carried 89% of the INT8 one-call error)."""
    if node.op not in ("MatMul", "Gemm") or not is_weight(node.inputs[1]):
        return None
    a = node.inputs[0]
    if a.shape is None or len(a.shape) != 2:
        return None
    return "per-sample conditioning GEMM (GEMV at deployment batch, broadcast over a feature map)" \
        if _broadcast_over_map(node.outputs[0]) else None


_PER_SAMPLE = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Relu", "Tanh", "Gelu", "Softplus", "Unsqueeze", "Reshape",
               "Squeeze", "Split", "Slice", "Identity", "Cast", "Gemm", "MatMul", "Expand"}
_SEARCH_LIMIT = 64  # readers looked at per layer: conditioning reaches the map within a few ops


def _per_sample(t) -> bool:
    """Rank ≤ 2, or higher rank with unit trailing dims (a [B, C, 1, 1] view): one vector per sample."""
    shape = t.shape
    return shape is not None and (len(shape) <= 2 or all(d == 1 for d in shape[2:]))


def _broadcast_over_map(t) -> bool:
    """Whether per-sample tensor `t` reaches, through per-sample ops, a binary op that broadcasts it over a
    tensor of rank ≥ 3 with spatial or token extent (bounded search)."""
    todo, seen = [t], set()
    while todo and len(seen) < _SEARCH_LIMIT:
        cur = todo.pop()
        for reader in cur.outputs:
            if id(reader) in seen or reader.op not in _PER_SAMPLE:
                continue
            seen.add(id(reader))
            for out in reader.outputs:
                if out.shape is None:
                    continue
                if reader.op in ("Add", "Sub", "Mul", "Div") and not _per_sample(out) and len(out.shape) >= 3:
                    return True
                if _per_sample(out):
                    todo.append(out)
    return False


def rule_mha(node, ctx):
    """Activation-by-activation MatMuls (attention BMMs) follow the MHA setting, and only for head sizes
    that TensorRT's fused MHA supports."""
    if node.op != "MatMul" or is_weight(node.inputs[1]):
        return None
    if not ctx.config.quantize_mha:
        return "MHA quantization is off"
    k, n, _ = _gemm_dims(node)
    head = _head_size(node, k, n)
    if head is not None and head not in MHA_HEAD_SIZES:
        return f"head size {head} not supported by TensorRT's fused MHA"
    seq = _seq_len(node, k, n)
    if ctx.config.mode == "int8" and seq is not None and seq > MAX_INT8_MHA_SEQ:
        return f"sequence length {seq} > {MAX_INT8_MHA_SEQ}: no fused INT8 MHA"
    return None


def rule_int8_depthwise(node, ctx):
    """INT8 depthwise convs stay FP16: the TensorRT(-RTX) builder pads every group from 1 to 4 channels with
    activation-sized INT8 zero constants, so the engine grows instead of shrinking (EfficientNet-Lite0: Total
    Weights Memory 13.0 MB for 4.6 MB of INT8 weights, engine 18.1 MB vs 9.7 MB in FP16; with depthwise convs
    in FP16 the INT8 engine is smaller than FP16's). FP8 already leaves them in FP16 (rule_conv_kernels)."""
    if node.op != "Conv" or ctx.config.mode != "int8" or node.inputs[1].shape is None:
        return None
    shape = list(node.inputs[1].shape)
    if int(node.attrs.get("group", 1)) > 1 and len(shape) > 1 and shape[1] == 1:
        return "INT8 depthwise conv: TensorRT pads it to 4 channels per group (a larger engine than FP16)"
    return None


MIN_INT8_CONV_WEIGHTS = 1 << 17  # 128 Ki weights: the INT8 bytes saved must pay for ~130 KB of kernel source


def _conv_weights(node) -> int:
    shape = node.inputs[1].shape if len(node.inputs) > 1 else None
    if node.op not in ("Conv", "ConvTranspose") or shape is None:
        return 0
    return int(np.prod([d if isinstance(d, (int, np.integer)) else 0 for d in shape]))


def rule_int8_small_conv(node, ctx):
    """Small INT8 convs stay FP16 next to large ones: TensorRT-RTX runs an INT8 conv with per-channel weight
    scales as an INT8 kernel with an FP32 output plus a separate elementwise kernel (scales, bias, activation,
    next Q) whose CUDA source (~130 KB, JIT-compiled on the GPU) the engine carries; FP16 convs fuse all of
    it. Below 128 Ki weights that costs more engine bytes than INT8 saves, and an FP32 round trip. EfficientNet-
    Lite0: all 34 INT8 layers: engine 10.0 MB vs FP16 9.7 MB, top-1 0.90; the 10 with >= 128 Ki weights:
    7.4 MB, top-1 0.99. Applies only where some conv is that large (`Context.int8_conv_floor`); a graph of
    small convs only is quantized as asked, there is no gain for them to eat."""
    n = _conv_weights(node)
    if ctx.config.mode != "int8" or not n or n >= ctx.int8_conv_floor:
        return None
    return f"INT8 conv with {n} weights (< {ctx.int8_conv_floor}): its separate FP32 epilogue kernel costs more than INT8 saves"


def rule_conv_kernels(node, ctx):
    """TensorRT's quantized Conv kernels want at least 16 input and output channels. INT8 also covers dense
    convs with a multiple of 8 channels (at the network input or next to a wide side, square filters) and
    grouped convs with a multiple of 8 outputs and filters of 3 or more. FP8 needs filters of at most 32
    taps and more than 16 channels each way (below that FP16 kernels are faster)."""
    if node.op != "Conv" or node.inputs[1].shape is None:
        return None
    shape = list(node.inputs[1].shape)
    oc, ic, kernel = shape[0], shape[1], shape[2:]
    group = int(node.attrs.get("group", 1))
    mode = ctx.config.mode
    if oc < 16 or ic < 16:
        if mode == "int8":
            at_input = not node.inputs[0].inputs or node.inputs[0].name in ctx.graph_inputs
            if group == 1 and (oc % 8 == 0 or ic % 8 == 0) and (at_input or oc >= 16 or ic >= 16) and len(set(kernel)) <= 1:
                return None
            if group > 1 and oc % 8 == 0 and all(k >= 3 for k in kernel):
                return None
        return f"{ic} input / {oc} output channels per group: no TensorRT {mode} kernel"
    if mode == "fp8":
        taps = int(np.prod(kernel)) if kernel else 1
        if taps > 32:
            return f"{taps}-tap filter: no TensorRT FP8 kernel"
        if oc <= 16 or ic <= 16:
            return "16 channels or fewer: FP16 is faster than FP8"
    return None


RULES = (rule_op_type, rule_lowrank_branch, rule_user_exclude, rule_not_shape_subgraph, rule_float_data, rule_not_prequantized,
         rule_int8_depthwise, rule_int8_small_conv, rule_conv_kernels, rule_gemm_size, rule_conditioning_gemv,
         rule_mha)



# ---------------------------------------------------------------- block formats (NVFP4, MXFP8)
# Measured with TensorRT-RTX 1.7.1 for SM 12.0 (tools/probe_fp4_rtx.py); layers refused here keep FP8 (the rules
# above) or FP16, with the reason in the report.
MIN_BLOCK_GEMM_DIM = 32  # K or N below this: a few blocks per row, little to gain and the 4-bit error undiluted


def block_format_reason(node, block: int, fmt: str = "NVFP4", dynamic_activations: bool = True) -> str | None:
    """None when `node` may take block-format weights (and dynamic activations, unless weight-only), else why it
    keeps FP8/FP16."""
    if node.op in ("Conv", "ConvTranspose"):
        return f"conv: TensorRT has no {fmt} convolution (blocks must run along one of the last two axes)"
    if node.op not in ("MatMul", "Gemm"):
        return f"op {node.op} has no {fmt} kernel"
    if not is_weight(node.inputs[1]):
        return f"attention BMM: no {fmt} kernel for activation x activation GEMMs in TensorRT-RTX (FP16 GEMM measured)"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    const, chain = G.weight_of(node.inputs[1])
    if const is None or const.shape is None or len(const.shape) != 2:
        return f"weight is not 2-D: no {fmt} GEMM"
    a = node.inputs[0]
    if a.shape is not None and len(a.shape) < 2:
        return "1-D input"
    k, n, _ = _gemm_dims(node)
    if k is None or k % block:
        return f"K={k} is not a multiple of the {fmt} block ({block})"
    if k < MIN_BLOCK_GEMM_DIM or (n is not None and n < MIN_BLOCK_GEMM_DIM):
        return f"tiny GEMM (K={k}, N={n} < {MIN_BLOCK_GEMM_DIM}): kept at higher precision"
    if fmt == "NVFP4" and dynamic_activations and _value_projection_shared_across_attention(node):
        return ("value projection of an input other attention blocks' value projections read (SDXL's cross-attention "
                "V): TensorRT-RTX 1.7.1 merges such FP4 GEMMs and fails at batch > 1 (Myelin perm.size() check)")
    return None


def _value_bmm(gemm):
    """The P·V MatMul whose V operand `gemm` produces through layout ops (an attention value projection), or None."""
    t = gemm.outputs[0]
    for _ in range(6):
        readers = _data_readers(t)
        if len(readers) != 1:
            return None
        r = readers[0]
        if r.op == "MatMul" and r.inputs[1] is t:
            return r if any(pv is r for _, pv in (_attention_bmms(s) for s in _softmax_before(r.inputs[0]))) else None
        if r.op not in _LAYOUT_OPS + ("Cast",):
            return None
        t = r.outputs[0]
    return None


def _softmax_before(t, limit: int = 4):
    """The Softmax producing `t` through layout ops/Casts, as a list of at most one."""
    for _ in range(limit):
        n = G.producer(t)
        if n is None:
            return []
        if n.op == "Softmax":
            return [n]
        if n.op not in _LAYOUT_OPS + ("Cast",):
            return []
        t = n.inputs[0]
    return []


def _value_projection_shared_across_attention(node) -> bool:
    """`node` is an attention value projection and its input is read by another block's value projection too.
    FP4 GEMMs reading one dynamically quantized input are merged horizontally by TensorRT-RTX 1.7.1's Myelin, and
    for two or more value projections that merge fails to compile at batch > 1 (measured on the tiny SDXL UNet's
    cross-attention; key projections and one value projection build; BENCHMARKS.md "NVFP4 at batch 2")."""
    mine = _value_bmm(node)
    if mine is None:
        return False
    return any(r is not node and r.op in ("MatMul", "Gemm") and is_weight(r.inputs[1])
               and (pv := _value_bmm(r)) is not None and pv is not mine for r in _data_readers(node.inputs[0]))


# ---------------------------------------------------------------- planning
def plan(graph: gs.Graph, config) -> Plan:
    ctx = Context(config, shape_nodes(graph), [re.compile(p) for p in config.exclude], {t.name for t in graph.inputs})
    if any(_conv_weights(n) >= MIN_INT8_CONV_WEIGHTS for n in graph.nodes):
        ctx.int8_conv_floor = MIN_INT8_CONV_WEIGHTS
    p = Plan()
    for node in graph.nodes:
        if node.op not in G.WEIGHT_OPS:
            continue
        reason = next((r for r in (rule(node, ctx) for rule in RULES) if r), None)
        if reason:
            p.skipped[node.name] = reason
            continue
        p.nodes.append(node)
    _plan_attention_reader(graph, p, config)
    for node in p.nodes:
        for idx in (0, 1):
            t = node.inputs[idx]
            if idx == 1 and is_weight(t):
                const, _ = G.weight_of(t)
                axis = G.weight_output_channel_axis(node) % len(const.shape)
                p.weights.append((node, idx, const, axis))
            else:
                p.activations.setdefault(t.name, []).append((node, idx))
    _plan_residual_adds(graph, p)
    _plan_concat_sharing(graph, p)
    _plan_softmax_outputs(graph, p, config)
    return p


_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
_SCORE_OPS = ("Mul", "Div", "Add", "Where", "Cast")   # scale and mask between Q·Kᵀ and Softmax


def _data_readers(t):
    """Readers of `t` other than Shape (exporters read shapes beside the data path)."""
    return [r for r in t.outputs if r.op != "Shape"]


def _next_gemm(t, limit: int = 8):
    """The Conv/MatMul/Gemm reading `t` through single-reader layout ops (an attention block's output
    projection), or None. Shape readers do not count."""
    for _ in range(limit):
        readers = _data_readers(t)
        if len(readers) != 1:
            return None
        r = readers[0]
        if r.op in G.WEIGHT_OPS:
            return r
        if r.op not in _LAYOUT_OPS:
            return None
        t = r.outputs[0]
    return None


def _attention_bmms(softmax):
    """(Q·Kᵀ, P·V) MatMuls around a Softmax, either None where the pattern does not hold."""
    qk = pv = None
    todo = [(softmax.inputs[0], 0)]
    while todo and qk is None:
        t, depth = todo.pop(0)
        n = G.producer(t)
        if n is None or depth > 4:
            continue
        if n.op == "MatMul" and not is_weight(n.inputs[1]):
            qk = n
        elif n.op in _SCORE_OPS:
            todo += [(i, depth + 1) for i in n.inputs if not isinstance(i, gs.Constant)]
    t = softmax.outputs[0]
    for _ in range(4):
        readers = _data_readers(t)
        if len(readers) != 1:
            break
        if readers[0].op == "MatMul":
            pv = readers[0]
            break
        if readers[0].op not in _LAYOUT_OPS + ("Cast",):
            break
        t = readers[0].outputs[0]
    return qk, pv


def attention_reader(pv):
    """The layer reading an attention block's output (softmax·V) through layout ops: its output projection, or None."""
    return _next_gemm(pv.outputs[0])


def _plan_attention_reader(graph, p: Plan, config) -> None:
    """Rule (TensorRT constraint): quantized attention fuses only into a reader quantized in the same format. The
    fused MHA kernel ends in its reader's Q: an attention block whose BMMs are quantized while the layer reading
    its output is not runs as separate quantized kernels, slower than fused FP16 attention, so its BMMs stay FP16.
    Measured with TensorRT-RTX 1.7.1: INT8, the terrain UNet's 19 INT8 blocks before FP16 1x1 projections ran
    unfused (the same blocks in FP16 fuse; tests/test_auto_engine.py on a tiny transformer); FP8, the terrain
    `--auto` mix whose two FP16 `proj_out` convs followed FP8 attention (`node_softmax_25`/`_27` quantized and
    unfused, the other 26 blocks with FP8 `proj_out` fused; BENCHMARKS.md "`--auto`: attention blocks tied to
    their output projection"). `--auto` ties the same layers (autoquant/groups.py). Where no reader is found
    (the output fans out), INT8 BMMs stay FP16 and FP8 ones are kept as before."""
    if config.mode not in ("int8", "fp8"):
        return
    planned = {id(n) for n in p.nodes}
    drop = {}
    for sm in graph.nodes:
        if sm.op != "Softmax":
            continue
        qk, pv = _attention_bmms(sm)
        bmms = [n for n in (qk, pv) if n is not None and id(n) in planned]
        if not bmms or pv is None:
            continue
        proj = attention_reader(pv)
        if proj is not None and id(proj) in planned:
            continue
        if proj is None and config.mode != "int8":
            continue
        mode = config.mode.upper()
        why = (f"{mode} attention fuses only into an {mode} output projection ({proj.name} is not quantized: "
               f"{p.skipped.get(proj.name, 'not planned')}); fused FP16 attention instead") if proj is not None else \
              f"{mode} attention fuses only into an {mode} output projection (none found); fused FP16 attention instead"
        for n in bmms:
            drop[id(n)] = why
            p.skipped[n.name] = why
    if drop:
        p.nodes = [n for n in p.nodes if id(n) not in drop]


def _plan_residual_adds(graph, p: Plan) -> None:
    """Q/DQ the skip input of an Add fed by a quantized Conv, so that TensorRT fuses Conv+Add."""
    convs = {id(n) for n in p.nodes if n.op in ("Conv", "ConvTranspose")}
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or lowrank.is_branch(node):
            continue  # a low-rank branch's sum: its FP16 side stays unquantized
        from_conv = [bool(t.inputs) and id(t.inputs[0]) in convs for t in node.inputs]
        if not any(from_conv):
            continue
        idx = 1 if from_conv[0] else 0
        skip = node.inputs[idx]
        if isinstance(skip, gs.Constant) or not G.is_float(skip) or _same_shape(node.inputs) is False:
            continue
        p.activations.setdefault(skip.name, []).append((node, idx))
        p.residuals.append((node, idx))


def _plan_concat_sharing(graph, p: Plan) -> None:
    """Where Concat inputs get Q/DQ, they share one scale (TensorRT then moves the Q across the Concat)."""
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        group = [t.name for t in node.inputs if t.name in p.activations]
        if node.outputs[0].name in p.activations:
            group.append(node.outputs[0].name)
        if len(group) >= 2:
            p.shared_scales.append(group)


def _plan_softmax_outputs(graph, p: Plan, config) -> None:
    """A Softmax output lies in [0, 1]; for FP8 its amax is 1 without calibration, which also spares
    calibrating the largest tensors of attention (batch x heads x tokens²)."""
    if config.mode != "fp8":
        return
    for name, uses in p.activations.items():
        t = uses[0][0].inputs[uses[0][1]]
        if t.inputs and t.inputs[0].op == "Softmax":
            p.fixed_amax[name] = 1.0


# ---------------------------------------------------------------- shared scales (after calibration)
MAX_SHARED_RANGE_RATIO = 16.0


def share_concat_scales(p: Plan, amax: dict) -> None:
    """Concat inputs share one scale only within a 16x range of each other (rule, in place on `amax`).
    TensorRT moves a Q across a Concat only when every input has the same scale, so sharing saves a
    requantization; but a scale stretched past a tensor's own range costs it 4 bits in INT8 and, in FP8,
    flushes it to zero below 2^-9 of the shared scale's step: the real terrain UNet's stem output (max 8)
    shared the scale of a decoder Concat reaching 1.7e10 (a UNet's last skip joins its largest stream) and
    was quantized to all zeros on its residual path. Tensors further apart keep their own scales (TensorRT then
    concatenates in high precision and quantizes the result for its readers)."""
    p.unshared = []
    for group in p.shared_scales:
        members = sorted((n for n in group if n in amax), key=lambda n: amax[n])
        clusters: list = []
        for n in members:
            if clusters and amax[n] <= MAX_SHARED_RANGE_RATIO * max(amax[clusters[-1][0]], 1e-30):
                clusters[-1].append(n)
            else:
                clusters.append([n])
        for c in clusters:
            shared = max(amax[n] for n in c)
            for n in c:
                amax[n] = shared
        if len(clusters) > 1:
            for c in clusters[:-1]:
                p.unshared.append((tuple(c), f"range {max(amax[n] for n in c):.3g} is over {MAX_SHARED_RANGE_RATIO:g}x "
                                             f"below the Concat group's {amax[clusters[-1][0]]:.3g}: own scale"))


# ---------------------------------------------------------------- helpers
def is_weight(t) -> bool:
    """A constant (through Cast/Transpose/Identity) that is not already quantized."""
    const, chain = G.weight_of(t)
    return const is not None and not any(n.op == "DequantizeLinear" for n in chain)


def _static(shape, i):
    try:
        d = shape[i]
    except (TypeError, IndexError):
        return None
    return d if isinstance(d, (int, np.integer)) and d > 0 else None


def _gemm_dims(node):
    """(K, N, M) where known statically."""
    a, b = node.inputs[0], node.inputs[1]
    ta = node.attrs.get("transA", 0) if node.op == "Gemm" else 0
    tb = node.attrs.get("transB", 0) if node.op == "Gemm" else 0
    bshape = b.shape if b.shape is not None else None
    ashape = a.shape
    k = n = m = None
    if bshape is not None and len(bshape) >= 2:
        k = _static(bshape, -1 if tb else -2)
        n = _static(bshape, -2 if tb else -1)
    if ashape is not None and len(ashape) >= 2:
        k = k or _static(ashape, -2 if ta else -1)
        dims = list(ashape[:-2]) + [ashape[-1] if ta else ashape[-2]]
        if all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            m = int(np.prod(dims))
    return k, n, m


def _head_size(node, k, n):
    """BMM1 (Q·Kᵀ) reduces over the head size; BMM2 (P·V) produces it."""
    a = node.inputs[0]
    if a.inputs and a.inputs[0].op == "Softmax":
        return n
    return k


def _seq_len(node, k, n):
    """Key length: BMM1 (Q·Kᵀ) produces it, BMM2 (P·V) reduces over it."""
    a = node.inputs[0]
    if a.inputs and a.inputs[0].op == "Softmax":
        return k
    return n


def _same_shape(tensors):
    shapes = [t.shape for t in tensors]
    if any(s is None for s in shapes):
        return None
    return all(len(s) == len(shapes[0]) for s in shapes)
