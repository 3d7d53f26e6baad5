"""The engine report: what the TensorRT-RTX builder made of a graph, read from the builder's own log.

The log (VERBOSE, ProfilingVerbosity.DETAILED) ends with a per-kernel dump, one line per kernel:

    Name: v_proj_myl0_2, LayerType: gemm, Inputs: [ { ..., Datatype: FP8, ... }], Constants: [ { ...,
    Datatype: FP8, ... }, ...], Outputs: [ {...} ], TacticName: ..., StreamId: 0, Metadata: [ONNX Layer: v_proj]...

Metadata names the ONNX nodes fused into the kernel; fused attention kernels are named `_gemm_mha_v2`.
"Total Weights Memory: N bytes" and the builder's warnings (e.g. "Converting conv activation scales to
fp32") come from the same log. Everything here is pure text + ONNX; no TensorRT import.

For each quantized Conv/ConvTranspose/MatMul/Gemm the report gives the precision of the kernel it runs in
(the kernel's activation and weight datatypes), the fused attention kernels by precision against the
graph's attention blocks, INT4 weights whose DequantizeLinear runs as its own kernel, and weights memory
against the file's quantized bytes and an FP16 graph's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .. import formats
from ..rewrite import lowrank
from .. import graph as G

_KERNEL = re.compile(r"^\s*Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), Inputs: \[(?P<inputs>.*?)\], Constants: \[(?P<consts>.*?)\], "
                     r"Outputs: \[(?P<outputs>.*?)\], TacticName: (?P<tactic>[^,]*),.*?Metadata: (?P<meta>.*)$")
_DTYPE = re.compile(r"Dimensions: \[([-0-9,]*)\][^}]*?Datatype: (\w+)")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_WEIGHTS = re.compile(r"Total Weights Memory: (\d+) bytes")


def _engine_format(datatype: str, quantized: bool, weight_only: bool = False):
    """The registered format of a kernel datatype string ("Int8", "FP8", "Half"), if it is (not) quantized;
    `weight_only` for a weight constant beside high-precision activations (Int8: W8A16, not W8A8)."""
    f = formats.from_engine(datatype, weight_only=weight_only)
    return f if f is not None and f.quantized == quantized else None


def _is_quantized(name: str) -> bool:
    return name in formats.names() and formats.get(name).quantized
_COMPUTE = ("gemm", "correlation", "convolution", "conv", "deconvolution", "runtime", "runtime_fusion")
PADDING_MIN_BYTES = 4096  # a smaller quantized constant in an elementwise kernel is noise, not bloat
SCALE_WARNING = re.compile(r"[Cc]onverting .*scales? to fp32")
ATTENTION_KERNEL = "_gemm_mha"


@dataclass
class Kernel:
    name: str
    type: str
    inputs: list[str]       # datatypes of the activation inputs
    constants: list[str]    # datatypes of the non-scalar constants (weights)
    outputs: list[str]
    tactic: str
    layers: list[str]       # ONNX nodes fused into it
    quantized_constant_bytes: int = 0  # INT8/FP8 constants; in a non-GEMM/conv kernel these are padding, not weights

    @property
    def computes(self) -> bool:
        """A GEMM / convolution kernel (its constants are weights), not a fused elementwise one."""
        return self.type in _COMPUTE or self.attention

    @property
    def attention(self) -> bool:
        return ATTENTION_KERNEL in self.name or ATTENTION_KERNEL in self.tactic

    @property
    def precision(self) -> str:
        """'int8'/'fp8'/'nvfp4'/'mxfp8' (quantized activations), 'int4-weight' (weight-only), else the float type."""
        for dt in self.inputs:  # block scales name the format first (MXFP8's E8M0 beside its FP8 codes)
            f = _engine_format(dt, True)
            if f is not None and f.activations == "dynamic":
                return f.name
        for dt in self.inputs:
            if _engine_format(dt, True):
                return _engine_format(dt, True).name
        for dt in self.constants:
            if _engine_format(dt, True, True):
                return _engine_format(dt, True, True).name + "-weight"
        return next((_engine_format(dt, False).name for dt in self.inputs if _engine_format(dt, False)), "other")


@dataclass
class BuildLog:
    kernels: list[Kernel] = field(default_factory=list)
    weights_memory: int | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _dtypes(section: str, drop_scalars: bool) -> list[str]:
    out = []
    for dims, dt in _DTYPE.findall(section):
        if drop_scalars and dims.count(",") == 0 and dims in ("", "1"):
            continue  # alpha/beta scalars of a GEMM
        out.append(dt)
    return out


def parse_log(lines) -> BuildLog:
    """Kernels, Total Weights Memory, warnings and errors of a builder log (lines or one text)."""
    text = lines if isinstance(lines, str) else "\n".join(lines)
    out = BuildLog()
    for line in text.splitlines():
        m = _KERNEL.match(line)
        if m:
            if m["type"] in ("signal", "wait"):
                continue
            qbytes = sum(int(np.prod([max(int(d), 0) for d in dims.split(",") if d])) for dims, dt in _DTYPE.findall(m["consts"])
                         if (f := _engine_format(dt, True)) is not None and f.activations == "static")
            out.kernels.append(Kernel(m["name"], m["type"], _dtypes(m["inputs"], False), _dtypes(m["consts"], True),
                                      _dtypes(m["outputs"], False), m["tactic"].strip(), _ONNX_LAYER.findall(m["meta"]), qbytes))
            continue
        w = _WEIGHTS.search(line)
        if w:
            out.weights_memory = int(w.group(1))
        elif line.startswith("[W] "):
            out.warnings.append(line[4:].strip())
        elif line.startswith(("[E] ", "[!] ")):
            out.errors.append(line[4:].strip())
    return out


# ---------------------------------------------------------------- what the graph holds
@dataclass
class QuantLayer:
    name: str
    op: str
    kind: str                     # "w8a8" (both inputs Q/DQ, incl. attention BMMs) or "weight-only"
    dtype: str                    # int8 / fp8 / int4
    attention: bool = False       # a Q·Kᵀ or softmax·V BMM


def _dq_dtype(t, weight_only: bool = False) -> str | None:
    """Quantized type behind a DequantizeLinear feeding `t` (looking through Transpose/Cast/Reshape); `weight_only`
    names it as the weight of a layer whose activation has no Q/DQ (`formats.from_storage`)."""
    for _ in range(4):
        p = G.producer(t)
        if p is None:
            return None
        if formats.from_dequantize_op(p.op) is not None:  # a format's own dequantize op (MXFP8's) names it
            return formats.from_dequantize_op(p.op).name
        if p.op == "DequantizeLinear":
            src = p.inputs[0]
            if isinstance(src, gs.Constant):
                return _np_kind(src.dtype, weight_only)
            q = G.producer(src)
            if len(p.inputs) > 2 and p.inputs[2] is not None and p.inputs[2].name:
                return _np_kind(p.inputs[2].dtype)
            if q is not None and len(q.inputs) > 2 and q.inputs[2].name:
                return _np_kind(q.inputs[2].dtype)
            return _np_kind(src.dtype) if src.dtype is not None else _np_kind(np.uint8)  # ONNX's default without a zero point
        if p.op not in ("Transpose", "Cast", "Reshape", "Identity"):
            return None
        t = p.inputs[0]
    return None


def _np_kind(dt, weight_only: bool = False) -> str:
    if dt is None:
        return "?"
    try:
        s = np.dtype(helper.tensor_dtype_to_np_dtype(dt) if isinstance(dt, int) else dt).name
    except (TypeError, KeyError, ValueError):
        s = TensorProto.DataType.Name(dt).lower() if isinstance(dt, int) else str(dt)
    f = formats.from_storage(s, weight_only=weight_only)
    return f.name if f is not None else (s or "?")


def attention_blocks(graph: gs.Graph) -> list[dict]:
    """Softmax nodes between two MatMuls (Q·Kᵀ -> [scale/mask/guard] -> Softmax -> [guard, Q/DQ] -> ·V)."""
    skip = {"Mul", "Div", "Add", "Where", "Cast", "QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose"}
    blocks = []
    for sm in (n for n in graph.nodes if n.op == "Softmax"):
        qk = _walk(sm, skip, up=True)
        pv = _walk(sm, skip, up=False)
        if qk is not None and pv is not None:
            blocks.append({"softmax": sm.name, "qk": qk.name, "pv": pv.name,
                           "quantized": all(G.producer(t) is not None and G.producer(t).op == "DequantizeLinear" for t in qk.inputs[:2] + pv.inputs[:2])})
    return blocks


def _walk(node, skip, up: bool, depth: int = 6):
    for _ in range(depth):
        if up:
            nxt = [G.producer(t) for t in node.inputs if not isinstance(t, gs.Constant)]
            nxt = [n for n in nxt if n is not None]
        else:
            nxt = [c for t in node.outputs for c in t.outputs]
        mm = [n for n in nxt if n.op == "MatMul"]
        if mm:
            return mm[0]
        nxt = [n for n in nxt if n.op in skip]
        if not nxt:
            return None
        node = nxt[0]
    return None


def depthwise_convs(graph: gs.Graph) -> set[str]:
    """Conv nodes with one input channel per group (group > 1 and weight shape[1] == 1)."""
    out = set()
    for n in graph.nodes:
        if n.op == "Conv" and n.attrs.get("group", 1) > 1:
            w, _ = G.weight_of(n.inputs[1])
            if w is not None and w.shape is not None and len(w.shape) > 1 and w.shape[1] == 1:
                out.add(n.name)
    return out


def quantized_layers(graph: gs.Graph) -> list[QuantLayer]:
    attn = {b[k] for b in attention_blocks(graph) for k in ("qk", "pv")}
    out = []
    for n in graph.nodes:
        if n.op not in G.WEIGHT_OPS:
            continue
        kinds = [_dq_dtype(t) for t in n.inputs[:2] if t is not None and t.name]
        if len(kinds) == 2 and all(kinds):
            out.append(QuantLayer(n.name, n.op, "w8a8", kinds[0], n.name in attn))
        elif len(kinds) == 2 and kinds[1] and (w := _dq_dtype(n.inputs[1], True)) in formats.weight_only() + formats.with_weight_only_variant():
            out.append(QuantLayer(n.name, n.op, "weight-only", w))
    return out


def weight_bytes(model: onnx.ModelProto) -> dict:
    """Bytes of the file's weights: quantized (INT8/FP8/INT4), all, and the same weights in FP16."""
    from .. import modelfile
    quant = total = fp16 = 0
    qtypes = {helper.np_dtype_to_tensor_dtype(np.dtype(s)) for f in map(formats.get, formats.names()) if f.quantized
              for s in f.storage_names}
    floats = {formats.get(n).onnx_type for n in formats.high_precision()}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        b = modelfile.tensor_bytes(t)
        total += b
        if t.data_type in qtypes:
            quant += b
        if t.data_type in qtypes | floats and n > 1:
            fp16 += 2 * n
    return {"quantized": quant, "all": total, "fp16": fp16}


# ---------------------------------------------------------------- the report
def engine_report(model: onnx.ModelProto, build_log: BuildLog, engine_bytes: int | None = None,
                  dropped_targets: dict | None = None) -> dict:
    """JSON-able report of the engine built from `model` (its builder log parsed into `build_log`)."""
    from .. import modelfile
    graph = modelfile.import_graph(model)
    layers = quantized_layers(graph)
    blocks = attention_blocks(graph)
    by_layer: dict[str, list[Kernel]] = {}
    for k in build_log.kernels:
        for name in k.layers:
            by_layer.setdefault(name, []).append(k)
    rows = []
    for l in layers:
        k = _main_kernel(l, by_layer.get(l.name, []))
        prec = k.precision if k else "none"
        ok = prec == (l.dtype if l.kind == "w8a8" else f"{l.dtype}-weight")
        rows.append({"name": l.name, "op": l.op, "graph": f"{l.dtype} {l.kind}", "attention": l.attention,
                     "kernel": k.name if k else None, "engine": prec, "quantized_kernel": bool(ok)})
    fused = {}
    fused_blocks = set()
    for k in build_log.kernels:
        if k.attention:
            fused[k.precision] = fused.get(k.precision, 0) + 1
            fused_blocks |= {b["softmax"] for b in blocks if b["softmax"] in k.layers}
    quant_blocks = [b for b in blocks if b["quantized"]]
    qfused = sum(v for p, v in fused.items() if _is_quantized(p))
    standalone_dq = [k.name for k in build_log.kernels
                     if any((f := _engine_format(c, True, True)) is not None and f.weight_only for c in k.constants) and k.layers and all(n.endswith("DequantizeLinear") or "DequantizeLinear" in n for n in k.layers)]
    dw = depthwise_convs(graph)
    padding = [k for k in build_log.kernels if not k.computes and k.quantized_constant_bytes >= PADDING_MIN_BYTES
               and k.name not in standalone_dq]  # a weight-only weight's own dequantize kernel holds the weight
    bloat = sorted({n for k in padding for n in k.layers if n in dw})
    wb = weight_bytes(model)
    branch = [n.name for n in graph.nodes if lowrank.is_branch(n) and n.op in lowrank.OPS]
    branch_kernels = {n: k for n in branch if (k := next((k for k in by_layer.get(n, []) if k.computes), None))}
    scale_warnings = [w for w in build_log.warnings if SCALE_WARNING.search(w)]
    return {
        "layers": rows,
        "quantized_layers": len(rows),
        "quantized_in_quantized_kernels": sum(r["quantized_kernel"] for r in rows),
        "fallbacks": [r["name"] for r in rows if not r["quantized_kernel"]],
        # per graph form ("nvfp4 w8a8", "nvfp4-wo weight-only"): TensorRT-RTX 1.7.1 runs weight-only NVFP4 as an FP16
        # GEMM after a dequantizing kernel, which must not hide a W4A4 layer that left its FP4 kernel
        "fallbacks_by_format": _count(r["graph"] for r in rows if not r["quantized_kernel"]),
        "kernel_precisions": _count(r["engine"] for r in rows if r["quantized_kernel"]),
        "attention": {"blocks": len(blocks), "quantized_blocks": len(quant_blocks), "fused_by_precision": fused,
                      "fused_quantized": qfused, "unfused": [b["softmax"] for b in blocks if b["softmax"] not in fused_blocks],
                      "quantized_unfused": [b["softmax"] for b in quant_blocks if b["softmax"] not in fused_blocks]},
        "int4_dq_kernels": standalone_dq,
        "padding": {"bytes": sum(k.quantized_constant_bytes for k in padding), "depthwise_layers": bloat},
        "weights": {"engine_weights_memory": build_log.weights_memory, "file_quantized_bytes": wb["quantized"],
                    "file_bytes": wb["all"], "fp16_bytes": wb["fp16"],
                    "vs_fp16": round(build_log.weights_memory / wb["fp16"], 4) if build_log.weights_memory and wb["fp16"] else None},
        # JIT-generated elementwise kernels: the engine carries ~130 KB of CUDA source for each one (an INT8
        # conv's separate FP32 epilogue is one of them)
        # the SVDQuant branch's GEMMs (onnxopt.rewrite.lowrank): high-precision kernels beside the quantized layer
        # (a rank-4 GEMM may become a generated elementwise kernel: `in_elementwise_kernels`)
        "lowrank_branch": {"gemms": len(branch), "in_gemm_kernels": len(branch_kernels),
                           "in_elementwise_kernels": sum(n not in branch_kernels and bool(by_layer.get(n)) for n in branch),
                           "precisions": _count(k.precision for k in branch_kernels.values())},
        "generated_kernels": sum(k.type == "kgen" for k in build_log.kernels),
        "engine_bytes": engine_bytes,
        "dropped_targets": dict(dropped_targets or {}),
        "scale_warnings": len(scale_warnings),
        "errors": build_log.errors,
    }


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _main_kernel(layer: QuantLayer, kernels: list[Kernel]) -> Kernel | None:
    """The kernel that computes the layer (not an epilogue that also lists it in its metadata)."""
    if not kernels:
        return None
    def rank(k: Kernel):
        own = k.name.split("_myl")[0].split("+")
        return (layer.name in own, k.attention and layer.attention, k.computes, k.precision not in formats.high_precision())
    return max(kernels, key=rank)


def format_report(rep: dict, all_layers: bool = False) -> str:
    """A readable table of the report: the layers not in quantized kernels (every layer with `all_layers`)."""
    rows = [r for r in rep["layers"] if all_layers or not r["quantized_kernel"]]
    lines = [f"{'layer':<40}{'op':<10}{'graph':<22}{'engine kernel':<18}ok"] if rows else []
    for r in rows:
        lines.append(f"{r['name'][:39]:<40}{r['op']:<10}{r['graph']:<22}{r['engine']:<18}{'yes' if r['quantized_kernel'] else 'NO'}")
    a, w = rep["attention"], rep["weights"]
    fused = ", ".join(f"{v} {p}" for p, v in sorted(a["fused_by_precision"].items())) or "none"
    by = ", ".join(f"{v} {p}" for p, v in sorted(rep.get("kernel_precisions", {}).items()))
    lines.append(f"quantized layers in quantized kernels: {rep['quantized_in_quantized_kernels']}/{rep['quantized_layers']}"
                 + (f" ({by})" if by else ""))
    if rep.get("fallbacks_by_format"):
        lines.append("not in quantized kernels: " + ", ".join(
            f"{v} {g}" + (" (dequantized into high-precision GEMMs)" if g.endswith("weight-only") else "")
            for g, v in sorted(rep["fallbacks_by_format"].items())))
    lines.append(f"attention blocks: {a['blocks']} ({a['quantized_blocks']} quantized); fused attention kernels: {fused}"
                 + (f"; quantized not fused: {len(a['quantized_unfused'])}" if a["quantized_unfused"] else ""))
    if rep["int4_dq_kernels"]:
        lines.append(f"weight-only DequantizeLinear as its own kernel: {len(rep['int4_dq_kernels'])}")
    if rep["padding"]["bytes"]:
        lines.append(f"quantized padding constants: {rep['padding']['bytes'] / 1e6:.2f} MB "
                     f"({len(rep['padding']['depthwise_layers'])} INT8 depthwise conv(s) padded to 4 channels)")
    if w["engine_weights_memory"] is not None:
        lines.append(f"Total Weights Memory: {w['engine_weights_memory'] / 1e6:.2f} MB (file quantized weights {w['file_quantized_bytes'] / 1e6:.2f} MB, "
                     f"FP16 weights {w['fp16_bytes'] / 1e6:.2f} MB, {w['vs_fp16']}x FP16)")
    if rep["engine_bytes"] is not None:
        lines.append(f"engine: {rep['engine_bytes'] / 1e6:.2f} MB ({rep.get('generated_kernels', 0)} generated elementwise kernels)")
    if rep["dropped_targets"]:
        lines.append("dropped GPU targets: " + ", ".join(f"SM {k} ({v})" for k, v in rep["dropped_targets"].items()))
    if rep["scale_warnings"]:
        lines.append(f"builder converted Q/DQ scales to fp32 {rep['scale_warnings']} time(s)")
    return "\n".join(lines)


def disagreements(findings, rep: dict) -> list[str]:
    """Where `inspect.engine_findings` (the lint) and the engine report disagree; empty when they agree."""
    out = []
    lint_att, eng_att = set(findings.attention_unfused), set(rep["attention"]["quantized_unfused"])
    if lint_att != eng_att:
        out.append(f"unfused quantized attention: lint {sorted(lint_att)}, engine {sorted(eng_att)}")
    lint_dw, eng_dw = set(findings.depthwise_bloat), set(rep["padding"]["depthwise_layers"])
    if lint_dw != eng_dw:
        out.append(f"INT8 depthwise padding: lint {sorted(lint_dw)}, engine {sorted(eng_dw)}")
    missed = set(rep["fallbacks"]) - set(findings.fp16_layers)
    if missed:
        out.append(f"quantized layers the engine runs unquantized, not flagged by the lint: {sorted(missed)}")
    wrong = set(findings.fp16_layers) & {r["name"] for r in rep["layers"] if r["quantized_kernel"]}
    if wrong:
        out.append(f"layers the lint says stay FP16 but the engine runs quantized: {sorted(wrong)}")
    return out


def report_for(model_path, result) -> dict:
    """The engine report of an `rtx.build` result for the ONNX file it was built from."""
    from .. import modelfile
    rep = engine_report(modelfile.load(model_path), parse_log(result.log), result.engine_bytes, result.dropped)
    rep["targets"] = [f"{a}.{b}" for a, b in result.targets]
    rep["build_seconds"] = round(result.seconds, 2)
    rep["tensorrt_rtx"] = result.tensorrt_rtx
    return rep


def engine_report_of(model_path, config=None, targets=None) -> dict:
    """Build a TensorRT-RTX engine of `model_path` in a temporary folder and return its report."""
    import tempfile
    from pathlib import Path

    from . import rtx
    with tempfile.TemporaryDirectory(prefix="onnxopt-engine-") as d:
        res = rtx.build(model_path, Path(d) / "model.plan", config=config, targets=targets)
        return report_for(model_path, res)


def summary_line(rep: dict) -> str:
    """One line: quantized layers in quantized kernels, fused attention, weights memory."""
    a = rep["attention"]
    fused = ", ".join(f"{v} {p}" for p, v in sorted(a["fused_by_precision"].items())) or "no"
    tw = rep["weights"]["engine_weights_memory"]
    by = ", ".join(f"{v} {p}" for p, v in sorted(rep.get("kernel_precisions", {}).items()))
    return (f"{rep['quantized_in_quantized_kernels']}/{rep['quantized_layers']} quantized layers in quantized kernels"
            + (f" ({by})" if by else "") + ", "
            f"{fused} fused attention of {a['blocks']} blocks" + (f", weights {tw / 1e6:.1f} MB" if tw is not None else ""))
