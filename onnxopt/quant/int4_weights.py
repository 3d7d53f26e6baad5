"""INT4 blockwise weight-only quantization of MatMul/Gemm weights (activations stay high precision).

Weights are symmetric INT4 in blocks of `block_size` along K (the reduction axis; 0 = one block per
output channel), stored packed (onnx INT4) and fed to a DequantizeLinear with `axis` and `block_size`
(opset 21). Optionally AWQ (onnxopt.rewrite.awq) first scales input channels and searches per-block clip ratios.
Layers matching `int8_layers` keep per-channel INT8 weights instead.
"""
from __future__ import annotations

import logging
import re
import time

import onnx_graphsurgeon as gs

from ..rewrite import awq as awq_search
from ..rewrite import fold
from .. import graph as G
from ..rewrite import lowrank
from ..errors import OnnxoptError
from ..formats import FP16, INT4, INT8, Format
from .writer import WEIGHT_ONLY_OPS, fusable_block_size, write_per_layer, write_weight
from ..settings import MEMORY_BUDGET_MB

__all__ = ["select_layers", "fusable_block_size", "write_weight", "quantize_int4"]

log = logging.getLogger(__name__)

AWQ_METHODS = ("none", "lite", "clip", "full")
OPS = WEIGHT_ONLY_OPS


# ---------------------------------------------------------------- layers
def select_layers(graph: gs.Graph, *, exclude=(), op_types=OPS, int8_layers: str | None = None, fmt: Format = INT4
                  ) -> tuple[list[tuple[gs.Node, Format]], dict[str, str]]:
    """(node, format) for each MatMul/Gemm with a 2-D constant FP weight: `fmt`, or INT8 where int8_layers matches.
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
        layers.append((n, INT8 if int8 is not None and int8.search(n.name or "") else fmt))
    return layers, skipped


def check_options(awq: str, block_size: int) -> None:
    if awq not in AWQ_METHODS:
        raise OnnxoptError(f"unknown --awq '{awq}'; use one of {', '.join(AWQ_METHODS)}")
    b = block_size
    if b < 0 or (b and (b < 16 or b & (b - 1))):
        raise OnnxoptError(f"--block-size {b}: use 128, 64, 32 (a power of two >= 16) or 0 for per-channel")


# ---------------------------------------------------------------- entry point
def quantize_int4(graph: gs.Graph, data=None, *, fmt: Format = INT4, block_size: int = 128, awq: str = "none", int8_layers: str | None = None,
                  exclude=(), op_types=OPS, high_precision: str = FP16.name, clips: dict | None = None, provider: str = "cpu",
                  memory_budget_mb: int = MEMORY_BUDGET_MB, progress: bool = True) -> dict:
    """Per-layer quantization of `graph` in place to `fmt` (INT4 weight-only by default). `clips` are what a preceding AWQ pass chose
    (node name -> clip ratios or (q, scale)); `awq` other than "none" runs AWQ here first. Returns the report."""
    check_options(awq, block_size)
    t0 = time.perf_counter()
    layers, skipped = select_layers(graph, exclude=exclude, op_types=op_types, int8_layers=int8_layers, fmt=fmt)
    if not layers:
        raise OnnxoptError(f"nothing to quantize to {fmt.name}: no MatMul or Gemm with a constant 2-D weight"
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
    written, before, after = write_per_layer(graph, layers, block_size, clips, hp, G.taken_names(graph))
    report["layers"] = {node.name: {"op": node.op, **written[node.name]} for node, _ in layers}
    report["weight_bytes"] = {"before": int(before), "after": int(after)}
    report["time_s"] = round(time.perf_counter() - t0, 3)
    log.info("%s: %d layers (%d kept INT8), weights %.1f -> %.1f MB in %.1f s", fmt.name, len(layers),
             sum(f is not fmt for _, f in layers), before / 2**20, after / 2**20, report["time_s"])
    return report
