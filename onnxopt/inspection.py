"""What a graph holds: op histogram, Q/DQ coverage of the layers TensorRT quantizes, and a lint of
placements TensorRT cannot fuse."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from . import formats, modelfile

# Ops that may consume a DequantizeLinear output without breaking TensorRT's fusions: the quantized layers,
# a residual Add, and the data-movement / pooling ops that TensorRT propagates Q/DQ through.
_QDQ_CONSUMERS = set(G.WEIGHT_OPS) | {"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Reshape",
                                      "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather",
                                      "Resize", "Pad", "Identity", "Relu"}


@dataclass
class LayerInfo:
    name: str
    op: str
    inputs_quantized: list
    weight_params: int
    weight_quantized: bool
    format: str = ""  # "int8", "fp8", "int4" (W and A quantized), "W4A16"/"W8A16" (weight-only), "" (not quantized)

    @property
    def quantized(self) -> bool:
        return all(self.inputs_quantized) or self.weight_only

    @property
    def weight_only(self) -> bool:
        return self.format.startswith("W")


@dataclass
class Inspection:
    ops: Counter
    layers: list
    lint: list = field(default_factory=list)

    def summary(self) -> dict:
        q = [l for l in self.layers if l.quantized]
        wp = sum(l.weight_params for l in self.layers)
        wq = sum(l.weight_params for l in self.layers if l.weight_quantized)
        return {"layers": len(self.layers), "quantized_layers": len(q),
                "weight_only_layers": sum(l.weight_only for l in q),
                "formats": dict(Counter(l.format for l in q).most_common()),
                "weight_params": wp, "quantized_weight_params": wq,
                "quantized_weight_share": (wq / wp) if wp else 0.0, "lint": list(self.lint),
                "ops": dict(self.ops.most_common())}


def _is_dq(t) -> bool:
    """A DequantizeLinear output, also seen through the Cast (and Reshape) of a block format's FP32 output."""
    p = t.inputs[0] if t.inputs else None
    for _ in range(3):
        if p is None:
            return False
        if p.op in formats.dequantize_ops():
            return True
        if p.op not in ("Cast", "Reshape"):
            return False
        p = p.inputs[0].inputs[0] if p.inputs and p.inputs[0].inputs else None
    return False


def block_format(node) -> str:
    """The block format's name ('nvfp4', 'mxfp8') when the layer's weight is stored in one (else '')."""
    if len(node.inputs) < 2:
        return ""
    const, chain = G.weight_of(node.inputs[1])
    if const is None:
        return ""
    f = formats.block_format_of(_type_name(const.dtype), [c.op for c in chain])
    return f.name if f is not None else ""


def _in_block_form(dq) -> bool:
    """A DequantizeLinear of a block format's form (NVFP4): of its codes (constant or from its dynamic quantizer),
    or of block scales feeding one."""
    src = dq.inputs[0]
    if formats.block_format_of(_type_name(src.dtype)) is not None or (src.inputs and formats.from_dynamic_op(src.inputs[0].op)):
        return True
    return any(c.op == "DequantizeLinear" and c.inputs[1] is dq.outputs[0] for c in dq.outputs[0].outputs)


def _weight_params(node) -> tuple[int, bool]:
    """(parameters of the layer's weight input, whether they are stored quantized)."""
    if len(node.inputs) < 2:
        return 0, False
    t = node.inputs[1]
    const, chain = G.weight_of(t)
    if const is None:
        return 0, False
    n = int(np.prod(const.shape)) if const.shape is not None else 0
    quantized = any(c.op == "DequantizeLinear" for c in chain)
    return n, bool(quantized)


def _format_of(stored: str):
    """The registered format stored as numpy dtype name `stored` (None if none)."""
    return formats.from_storage(stored or "")


def _type_name(dtype) -> str:
    """numpy/ml_dtypes name of a graphsurgeon dtype (which is an ONNX enum for FP8 constants)."""
    try:
        if isinstance(dtype, int):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        return np.dtype(dtype).name
    except (TypeError, KeyError, ValueError):
        return str(dtype)


def _stored_type(node) -> str:
    """Type the layer's weight is stored in behind its DequantizeLinear ('' when it is not)."""
    if len(node.inputs) < 2:
        return ""
    const, chain = G.weight_of(node.inputs[1])
    if const is None or not any(c.op == "DequantizeLinear" for c in chain):
        return ""
    return _type_name(const.dtype)


def _activation_type(t) -> str:
    """Type behind an activation's DequantizeLinear: its QuantizeLinear's zero point (uint8 without one)."""
    src = t.inputs[0].inputs[0]
    q = src.inputs[0] if src.inputs else None
    if q is None or q.op != "QuantizeLinear":
        return ""
    if len(q.inputs) > 2 and q.inputs[2] is not None and q.inputs[2].dtype is not None:
        return _type_name(q.inputs[2].dtype)
    return "uint8"


def layer_format(node) -> str:
    """"int8"/"fp8"/"int4" when weight and activation are quantized; "W4A16"/"W8A16" for a quantized
    weight feeding a MatMul/Gemm whose activation has no Q/DQ (weight-only: TensorRT dequantizes the
    weight into the FP16 GEMM); "" otherwise."""
    stored = _stored_type(node)
    data = [t for t in node.inputs[:2] if t is not None and t.name]
    block = block_format(node)
    if block:
        f = formats.get(block)
        return (f"{block}/{f.block_size}" if _is_dq(node.inputs[0]) else f"W{f.bits}A16-{block}/{f.block_size}")
    if data and all(_is_dq(t) for t in data):
        kind = stored or _activation_type(node.inputs[0])  # no weight: an attention BMM
        f = _format_of(kind)
        return f.name if f is not None else kind
    if node.op in ("MatMul", "Gemm") and not _is_dq(node.inputs[0]) and _format_of(stored) is not None:
        return f"W{_format_of(stored).bits}A16"
    return ""


def weight_only(node) -> bool:
    """A weight-only quantized layer (W4A16, W8A16): Q/DQ on the weight alone is the intended placement."""
    return layer_format(node).startswith("W")


def inspect_graph(graph: gs.Graph) -> Inspection:
    ops = Counter(n.op for n in graph.nodes)
    layers = []
    for node in graph.nodes:
        if node.op not in G.WEIGHT_OPS:
            continue
        data_inputs = [t for t in node.inputs[:2] if t is not None and t.name]
        n, wq = _weight_params(node)
        layers.append(LayerInfo(node.name, node.op, [_is_dq(t) for t in data_inputs], n, wq, layer_format(node)))
    return Inspection(ops, layers, lint(graph))


# What the TensorRT(-RTX) builder showed (see onnxopt.trt.report; tests/test_rtx.py checks that this lint
# and the engine report agree): fused quantized attention needs the Softmax to feed its QuantizeLinear
# directly and softmax·V to reach the next QuantizeLinear through layout ops only; INT8 depthwise convs
# are padded to 4 channels per group with activation-sized constants.
_LAYOUT = ("Transpose", "Reshape")


@dataclass
class EngineFindings:
    attention_unfused: dict = field(default_factory=dict)  # softmax node name -> why
    fp16_layers: dict = field(default_factory=dict)        # layer name -> why it stays FP16 despite Q/DQ
    depthwise_bloat: set = field(default_factory=set)      # INT8 depthwise conv names


def _quant_type(dq) -> str | None:
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    dt = getattr(zp, "dtype", None) if zp is not None else None
    if dt is None and isinstance(dq.inputs[0], gs.Constant):
        dt = dq.inputs[0].dtype
    try:
        return np.dtype(dt).name if dt is not None and not isinstance(dt, int) else str(dt)
    except TypeError:
        return str(dt)


def engine_findings(graph: gs.Graph) -> EngineFindings:
    """Where the builder will not do what the Q/DQ ask: unfused quantized attention, layers left in FP16,
    INT8 depthwise padding."""
    f = EngineFindings()
    for node in graph.nodes:
        if node.op in G.WEIGHT_OPS:
            flags = [_is_dq(t) for t in node.inputs[:2] if t is not None and t.name]
            if any(flags) and not all(flags):
                why = _int4_one_block(node) if weight_only(node) else "only some data inputs have Q/DQ"
                if why:
                    f.fp16_layers[node.name] = why
            if node.op == "Conv" and all(flags) and flags and int(node.attrs.get("group", 1)) > 1:
                w, _ = G.weight_of(node.inputs[1])
                dq = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
                if w is not None and w.shape is not None and len(w.shape) > 1 and w.shape[1] == 1 and dq is not None \
                        and _format_of(_quant_type(dq)) is formats.INT8:  # TensorRT pads INT8 depthwise
                    f.depthwise_bloat.add(node.name)
        elif node.op == "Softmax":
            why = _attention_break(node)
            if why:
                f.attention_unfused[node.name] = why
    return f


def _int4_one_block(node) -> str | None:
    """Why a weight-only INT4 layer will not get the builder's fused INT4 GEMM, or None.

    TensorRT-RTX fuses the weight's DequantizeLinear only with two or more blocks along K; with one
    (per-channel scales, or block_size >= K) it dequantizes in a kernel of its own and runs the GEMM in FP16."""
    const, chain = G.weight_of(node.inputs[1])
    dq = next((c for c in chain if c.op == "DequantizeLinear"), None)
    f = _format_of(_type_name(const.dtype)) if const is not None else None
    if dq is None or f is None or f.weights != "per-block" or const.shape is None or len(const.shape) != 2:
        return None
    axis = int(dq.attrs.get("axis", 1)) % 2
    bs = int(dq.attrs.get("block_size", 0))
    trans = node.op == "Gemm" and node.attrs.get("transB", 0)
    k = const.shape[1 if trans else 0]
    if bs and axis == (1 if trans else 0) and bs < k:
        return None
    return f"INT4 weight with one block along K={k}: its DequantizeLinear runs as its own kernel, the GEMM in FP16"


def _attention_break(sm) -> str | None:
    """Why a quantized attention block around Softmax `sm` will not fuse, or None."""
    outs = [c for t in sm.outputs for c in t.outputs]
    direct_q = any(c.op == "QuantizeLinear" for c in outs)
    # Quantized attention: a QuantizeLinear reads the probabilities, directly or behind other ops.
    seen, frontier, hops = [], list(outs), 0
    while frontier and hops < 4 and not direct_q:
        nxt = []
        for c in frontier:
            if c.op == "QuantizeLinear":
                return f"{'/'.join(dict.fromkeys(n.op for n in seen))} between Softmax and its QuantizeLinear"
            if c.op in ("MatMul",):
                continue
            seen.append(c)
            nxt += [cc for t in c.outputs for cc in t.outputs]
        frontier, hops = nxt, hops + 1
    if not direct_q:
        return None
    pv = next((c.outputs[0].outputs[0] for c in outs if c.op == "QuantizeLinear" and c.outputs[0].outputs
               and c.outputs[0].outputs[0].op == "DequantizeLinear" and c.outputs[0].outputs[0].outputs[0].outputs), None)
    mm = next((c for c in pv.outputs[0].outputs if c.op == "MatMul"), None) if pv is not None else None
    t = mm.outputs[0] if mm is not None else None
    while t is not None and len(t.outputs) == 1 and t.outputs[0].op in _LAYOUT:
        t = t.outputs[0].outputs[0]
    if t is not None and len(t.outputs) == 1 and t.outputs[0].op in ("Mul", "Div", "Add") and \
            any(c.op == "QuantizeLinear" for o in t.outputs[0].outputs for c in o.outputs):
        return f"{t.outputs[0].op} '{t.outputs[0].name}' between softmax·V and its QuantizeLinear"
    return None


def lint(graph: gs.Graph) -> list[str]:
    """Placements that TensorRT cannot fuse or will reject, one line each."""
    issues = []
    found = engine_findings(graph)
    issues += [f"{n} (Softmax): quantized attention will not fuse: {why}" for n, why in found.attention_unfused.items()]
    issues += [f"{n} (Conv): INT8 depthwise conv: TensorRT pads it to 4 channels per group (an engine larger than FP16)"
               for n in sorted(found.depthwise_bloat)]
    issues += _small_int8_convs(graph)
    for node in graph.nodes:
        if node.op in G.WEIGHT_OPS:
            flags = [_is_dq(t) for t in node.inputs[:2] if t is not None and t.name]
            if any(flags) and not all(flags) and not weight_only(node):
                issues.append(f"{node.name} ({node.op}): only some data inputs have Q/DQ; TensorRT runs it unquantized")
            elif node.name in found.fp16_layers and weight_only(node):
                issues.append(f"{node.name} ({node.op}): {found.fp16_layers[node.name]}")
        elif node.op == "QuantizeLinear":
            outs = node.outputs[0].outputs
            if not outs or any(c.op != "DequantizeLinear" for c in outs):
                issues.append(f"{node.name}: QuantizeLinear not followed by DequantizeLinear")
            scale = node.inputs[1]
            if isinstance(scale, gs.Constant) and scale.shape is not None and int(np.prod(scale.shape)) != 1:
                issues.append(f"{node.name}: activation scale is not per-tensor")
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and np.any(np.asarray(node.inputs[2].values, dtype=np.float32) != 0):
                issues.append(f"{node.name}: non-zero zero point; TensorRT needs symmetric quantization")
        elif node.op == "DequantizeLinear" and _in_block_form(node):
            continue  # the block formats' own form (formats.nvfp4), checked by the TensorRT-RTX probe
        elif node.op == "DequantizeLinear":
            src = node.inputs[0]
            if not isinstance(src, gs.Constant) and not (src.inputs and src.inputs[0].op == "QuantizeLinear"):
                issues.append(f"{node.name}: DequantizeLinear input is neither a constant nor a QuantizeLinear")
            for c in node.outputs[0].outputs:
                if c.op not in _QDQ_CONSUMERS:
                    issues.append(f"{node.name}: feeds {c.op} '{c.name}', which TensorRT does not fuse with Q/DQ")
            if isinstance(src, gs.Constant):
                for c in node.outputs[0].outputs:
                    if c.op in G.WEIGHT_OPS and c.inputs.index(node.outputs[0]) == 1:
                        axis = node.attrs.get("axis", 1)
                        want = G.weight_output_channel_axis(c) % max(len(src.shape), 1)
                        bs = node.attrs.get("block_size", 0)
                        scale = node.inputs[1]
                        per_channel = scale.shape is not None and len(scale.shape) >= 1 and int(np.prod(scale.shape)) > 1
                        if per_channel and not bs and axis % len(src.shape) != want:
                            issues.append(f"{node.name}: weight scale axis {axis} is not the output-channel axis {want} of {c.name}")
    return issues


def _small_int8_convs(graph: gs.Graph) -> list[str]:
    """INT8 convs that quant.rules.rule_int8_small_conv would leave in FP16 (small ones next to large ones)."""
    from .quant.rules import MIN_INT8_CONV_WEIGHTS
    convs = []
    for n in graph.nodes:
        const, chain = G.weight_of(n.inputs[1]) if n.op in ("Conv", "ConvTranspose") and len(n.inputs) > 1 else (None, [])
        if const is not None and const.shape is not None:
            dq = next((c for c in chain if c.op == "DequantizeLinear"), None)
            convs.append((n, int(np.prod(const.shape)), dq is not None and _format_of(_quant_type(dq)) is formats.INT8))
    if not any(w >= MIN_INT8_CONV_WEIGHTS for _, w, _ in convs):
        return []
    return [f"{n.name} ({n.op}): INT8 conv with {w} weights next to larger ones: TensorRT-RTX adds a separate FP32 "
            "epilogue kernel that costs more engine bytes than INT8 saves" for n, w, int8 in convs if int8 and w < MIN_INT8_CONV_WEIGHTS]


def inspect_path(path) -> Inspection:
    model = modelfile.load(path)
    return inspect_graph(modelfile.import_graph(model))


def format_report(ins: Inspection, show_layers: bool = False) -> str:
    s = ins.summary()
    lines = ["ops:"]
    lines += [f"  {op:<24}{n:>6}" for op, n in s["ops"].items()]
    formats = ", ".join(f"{f} {n}" for f, n in s["formats"].items())
    with_weights = sum(1 for l in ins.layers if l.weight_params)
    lines.append(f"quantizable layers (Conv/ConvTranspose/MatMul/Gemm): {s['layers']} ({with_weights} with weights), "
                 f"quantized: {s['quantized_layers']}"
                 + (f" ({formats})" if formats else ""))
    lines.append(f"weight parameters: {s['weight_params']:,}, stored quantized: {s['quantized_weight_params']:,} "
                 f"({100 * s['quantized_weight_share']:.1f}%)")
    if show_layers:
        for l in ins.layers:
            lines.append(f"  {'Q' if l.quantized else '-'} {l.op:<14} {l.format or 'float':<6} {l.name}  params={l.weight_params:,}")
    if ins.lint:
        lines.append(f"lint: {len(ins.lint)} issue(s)")
        lines += [f"  {x}" for x in ins.lint]
    else:
        lines.append("lint: clean")
    return "\n".join(lines)
