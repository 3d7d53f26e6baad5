"""Int4 pass: per-layer quantization of MatMul/Gemm weights to a format without a static activation placement
(INT4 blockwise weight-only, W4A16, by default; a format with dynamic activation blocks also gets its
activation nodes), onnxopt.quant.int4_weights."""
from __future__ import annotations

from dataclasses import dataclass

from .. import formats
from ..formats import INT4
from ..quant import int4_weights
from ..pass_protocol import WeightOnlyQuantizer, check_choice, check_regexes, one_quantizer


@dataclass
class Int4(WeightOnlyQuantizer):
    block_size: int | None = None      # along K: 128, 64, 32 (a power of two >= 16), 0 per-channel; None: the format's
    int8_layers: str | None = None     # regex: matching layers keep per-channel INT8 weights
    exclude: tuple = ()
    op_types: tuple = int4_weights.OPS
    format: str = INT4.name            # a mode whose layers are chosen one by one (formats.modes(), not planned)
    quantizes = True

    def __post_init__(self):
        check_choice(self.format, [m for m in formats.modes() if not formats.get(m).planned], "per-layer format")
        if self.block_size is None:
            self.block_size = formats.get(self.format).block_size
        int4_weights.check_options("none", self.block_size)
        self.exclude = check_regexes(self.exclude, "--exclude")
        if self.int8_layers:
            check_regexes(self.int8_layers, "--int8-layers")
        self.op_types = tuple(self.op_types)

    @property
    def min_opset(self) -> int:
        """The format's own (INT4's blocked 4-bit DequantizeLinear: 21; per-channel INT8 with FP16 scales: 19)."""
        return max(formats.get(self.format).min_opset, formats.INT8.min_opset)

    @property
    def name(self) -> str:
        """Report section and timing key: the format's name."""
        return self.format

    def check_recipe(self, recipe, index: int) -> None:
        one_quantizer(recipe)

    def select(self, graph):
        return int4_weights.select_layers(graph, exclude=self.exclude, op_types=self.op_types, int8_layers=self.int8_layers,
                                  fmt=formats.get(self.format))

    def run(self, ctx) -> dict:
        # Clip ratios (or error-feedback rounded weights) that a preceding AWQ pass chose for these layers.
        chosen, ctx.awq = ctx.awq, None
        clips = chosen.clips if chosen else None
        report = int4_weights.quantize_int4(ctx.graph, ctx.data, fmt=formats.get(self.format), block_size=self.block_size,
                                    int8_layers=self.int8_layers,
                                  exclude=self.exclude, op_types=self.op_types, high_precision=ctx.high_precision,
                                  clips=clips, provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb,
                                  progress=ctx.progress)
        report["awq"] = chosen.method if chosen else "none"
        report["coverage"] = {"quantized": len(report["layers"]), "skipped": len(report["skipped"]),
                              "int8": sum(v["format"] != self.format for v in report["layers"].values())}
        return report
