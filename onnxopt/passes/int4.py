"""Int4 pass: INT4 blockwise weight-only quantization of MatMul/Gemm (W4A16, onnxopt.quant.int4)."""
from __future__ import annotations

from dataclasses import dataclass

from ..formats import INT4
from ..quant import int4
from .base import PassBase, check_regexes, one_quantizer


@dataclass
class Int4(PassBase):
    block_size: int = 128              # along K: 128, 64, 32 (a power of two >= 16), or 0 for per-channel
    int8_layers: str | None = None     # regex: matching layers keep per-channel INT8 weights
    exclude: tuple = ()
    op_types: tuple = int4.OPS
    name = "int4"
    min_opset = 21                     # blocked DequantizeLinear and INT4 tensors
    quantizes = True

    def __post_init__(self):
        int4.check_options("none", self.block_size)
        self.exclude = check_regexes(self.exclude, "--exclude")
        if self.int8_layers:
            check_regexes(self.int8_layers, "--int8-layers")
        self.op_types = tuple(self.op_types)

    def check_recipe(self, recipe, index: int) -> None:
        one_quantizer(recipe)

    def select(self, graph):
        return int4.select_layers(graph, exclude=self.exclude, op_types=self.op_types, int8_layers=self.int8_layers)

    def run(self, ctx) -> dict:
        # Clip ratios (or error-feedback rounded weights) that a preceding AWQ pass chose for these layers.
        chosen, ctx.awq = ctx.awq, None
        clips = chosen.clips if chosen else None
        report = int4.quantize_int4(ctx.graph, ctx.data, block_size=self.block_size, int8_layers=self.int8_layers,
                                  exclude=self.exclude, op_types=self.op_types, high_precision=ctx.high_precision,
                                  clips=clips, provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb,
                                  progress=ctx.progress)
        report["awq"] = chosen.method if chosen else "none"
        report["coverage"] = {"quantized": len(report["layers"]), "skipped": len(report["skipped"]),
                              "int8": sum(v["format"] != INT4.name for v in report["layers"].values())}
        return report
