"""INT4 blockwise weight-only quantization of MatMul/Gemm weights (activations stay high precision).

Weights are symmetric INT4 in blocks of `block_size` along K (the reduction axis; 0 = one block per
output channel), stored packed (onnx INT4) and fed to a DequantizeLinear with `axis` and `block_size`
(opset 21). Optionally AWQ (onnxopt.awq) first scales input channels and searches per-block clip ratios.
Layers matching `int8_layers` keep per-channel INT8 weights instead.
"""
from __future__ import annotations

import logging
import re
import time

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .. import awq as awq_search
from .. import fold
from .. import graph as G
from .. import lowrank
from ..errors import OnnxoptError
from . import qdq
from .blockwise import INT8_MAX, QMAX, QMIN, block_scales, expand, fake_quant, fake_quant_int8, quantize_blocks, to_kn

__all__ = ["INT8_MAX", "QMAX", "QMIN", "block_scales", "fake_quant", "fake_quant_int8", "quantize_blocks", "to_kn",
           "select_layers", "fusable_block_size", "write_weight", "quantize_int4"]

log = logging.getLogger(__name__)

AWQ_METHODS = ("none", "lite", "clip", "full")
OPS = ("MatMul", "Gemm")
_expand = expand


# ---------------------------------------------------------------- layers
def select_layers(graph: gs.Graph, *, exclude=(), op_types=OPS, int8_layers: str | None = None
                  ) -> tuple[list[tuple[gs.Node, int]], dict[str, str]]:
    """(node, bits) for each MatMul/Gemm with a 2-D constant FP weight; bits 8 where int8_layers matches.
    Also returns node name -> reason for the layers left alone."""
    exclude = [re.compile(p) for p in exclude]
    try:
        int8 = re.compile(int8_layers) if int8_layers else None
    except re.error as e:
        raise OnnxoptError(f"--int8-layers '{int8_layers}' is not a valid regular expression ({e})") from None
    layers, skipped = [], {}
    for n in graph.nodes:
        if n.op not in OPS or n.op not in op_types:
            continue
        reason = None
        if lowrank.is_branch(n):
            reason = "low-rank branch GEMM stays high precision"
        elif any(p.search(n.name or "") for p in exclude):
            reason = "excluded by --exclude"
        elif len(n.inputs) < 2 or not G.is_float(n.inputs[0]):
            reason = "input is not a float tensor"
        elif n.op == "Gemm" and n.attrs.get("transA", 0):
            reason = "Gemm with transA"
        else:
            try:
                if len(fold.effective_shape(n)) != 2:
                    reason = "weight is not 2-D"
            except OnnxoptError as e:
                reason = "already quantized" if "already quantized" in str(e) else "weight is not a constant"
        if reason:
            skipped[n.name] = reason
            continue
        layers.append((n, 8 if int8 is not None and int8.search(n.name or "") else 4))
    return layers, skipped


def check_options(awq: str, block_size: int) -> None:
    if awq not in AWQ_METHODS:
        raise OnnxoptError(f"unknown --awq '{awq}'; use one of {', '.join(AWQ_METHODS)}")
    b = block_size
    if b < 0 or (b and (b < 16 or b & (b - 1))):
        raise OnnxoptError(f"--block-size {b}: use 128, 64, 32 (a power of two >= 16) or 0 for per-channel")


def _int4_constant(name: str, q: np.ndarray) -> gs.Constant:
    # onnx-graphsurgeon cannot serialize ml_dtypes.int4 arrays itself; hand it the packed TensorProto.
    return gs.Constant(name, gs.ir.tensor.LazyValues(numpy_helper.from_array(q.astype(ml_dtypes.int4), name)))


def fusable_block_size(k: int, block_size: int) -> int:
    """The DequantizeLinear block size TensorRT(-RTX) fuses into its weight-only INT4 GEMM for reduction size `k`.

    Its builder fuses only weights with at least two blocks along K: with one (per-channel, or K <= block
    size) the DequantizeLinear runs as its own kernel and the GEMM in FP16 (measured on TensorRT-RTX 1.7.1:
    K=64/128 with block 128, K=256 with block 256, per-channel at any K). One block is written as two halves
    with the same scale. Odd K has no such split (the parser rejects its blocked INT4 weights anyway)."""
    if (block_size and block_size < k) or k < 2 or k % 2:
        return block_size
    return k // 2


def write_weight(graph: gs.Graph, node: gs.Node, w_kn: np.ndarray, bits: int, block_size: int, clip, high_precision: str,
                 names: set) -> tuple[gs.Variable, dict]:
    """Quantized weight + DequantizeLinear in the node's own weight layout; returns the DQ output."""
    trans = node.op == "Gemm" and node.attrs.get("transB", 0)
    k, n = w_kn.shape
    base = G.unique_name(f"{node.inputs[1].name}_int{bits}", names)
    if bits == 4:
        # `clip` is either per-block clip ratios, or the (values, scales) that error-feedback rounding chose.
        q, scale = clip if isinstance(clip, tuple) else quantize_blocks(w_kn, block_size, clip, high_precision)
        info = {"bits": 4, "block_size": block_size, "blocks": int(scale.shape[0])}
        split = fusable_block_size(k, block_size)
        if split != block_size:  # one block along K: the same scale written for two half blocks (same numbers)
            scale, block_size = np.repeat(scale[:1], 2, axis=0), split
            info["dq_block_size"] = split
        if block_size:
            attrs = {"axis": 1 if trans else 0, "block_size": int(block_size)}
        else:  # one block per output channel: per-axis scales
            scale = scale[0]
            attrs = {"axis": 0 if trans else 1}
        if trans:
            q, scale = q.T, scale.T
        qc = _int4_constant(base, np.ascontiguousarray(q))
        packed = (q.size + 1) // 2
    else:
        amax = np.abs(w_kn).max(axis=0)
        scale = qdq.round_scale(np.where(amax > 0, amax / INT8_MAX, 1.0), high_precision)
        q = np.clip(np.rint(w_kn / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        attrs = {"axis": 0 if trans else 1}
        if trans:
            q = q.T
        qc = gs.Constant(base, np.ascontiguousarray(q))
        info = {"bits": 8, "per_channel": True}
        packed = q.size
    dtype = node.inputs[1].dtype if G.is_float(node.inputs[1]) else np.float32
    sc = gs.Constant(G.unique_name(base + "_scale", names), np.ascontiguousarray(scale.astype(np.float32)))
    out = gs.Variable(G.unique_name(base + "_dequantized", names), dtype=dtype, shape=list(q.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=G.unique_name(base + "_DequantizeLinear", names),
                               inputs=[qc, sc], outputs=[out], attrs=attrs))
    info["bytes"] = int(packed + sc.values.nbytes)
    return out, info


# ---------------------------------------------------------------- entry point
def quantize_int4(graph: gs.Graph, data=None, *, block_size: int = 128, awq: str = "none", int8_layers: str | None = None,
                  exclude=(), op_types=OPS, high_precision: str = "fp16", clips: dict | None = None, provider: str = "cpu",
                  memory_budget_mb: int = 4096, progress: bool = True) -> dict:
    """INT4 weight-only quantization of `graph` in place. `clips` are what a preceding AWQ pass chose
    (node name -> clip ratios or (q, scale)); `awq` other than "none" runs AWQ here first. Returns the report."""
    check_options(awq, block_size)
    t0 = time.perf_counter()
    layers, skipped = select_layers(graph, exclude=exclude, op_types=op_types, int8_layers=int8_layers)
    if not layers:
        raise OnnxoptError("nothing to quantize to INT4: no MatMul or Gemm with a constant 2-D weight"
                           + (f" ({'; '.join(sorted(set(skipped.values()))[:3])})" if skipped else ""))
    hp = high_precision
    report: dict = {"block_size": block_size, "awq": awq, "layers": {}, "skipped": skipped}
    clips = dict(clips or {})
    if awq != "none":
        if data is None:
            raise OnnxoptError(f"--awq {awq} needs calibration data; pass --calib (or --calib-random N), or use --awq none")
        awq_report, clips = awq_search.apply(graph, data, layers, method=awq, block_size=block_size, high_precision=hp,
                                          provider=provider, memory_budget_mb=memory_budget_mb, progress=progress)
        report["awq_search"] = awq_report
    names = G.taken_names(graph)
    done: dict[int, tuple[gs.Variable, dict]] = {}
    before = after = 0
    for node, bits in layers:
        key = id(node.inputs[1])
        if key not in done:
            w = to_kn(node, fold.effective_weight(node))
            before += w.size * np.dtype(node.inputs[1].dtype or np.float32).itemsize
            done[key] = write_weight(graph, node, w, bits, block_size, clips.get(node.name), hp, names)
            after += done[key][1]["bytes"]
        out, info = done[key]
        node.inputs[1] = out
        report["layers"][node.name] = {"op": node.op, **info}
    report["weight_bytes"] = {"before": int(before), "after": int(after)}
    report["time_s"] = round(time.perf_counter() - t0, 3)
    log.info("int4: %d layers (%d kept INT8), weights %.1f -> %.1f MB in %.1f s", len(layers),
             sum(b == 8 for _, b in layers), before / 2**20, after / 2**20, report["time_s"])
    return report
