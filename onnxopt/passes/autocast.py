"""Autocast pass: FP16/BF16 for everything not quantized (onnxopt.autocast)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import autocast
from ..errors import OnnxoptError
from .base import PassBase, check_choice

IO_DTYPES = ("fp16", "bf16")


@dataclass
class Autocast(PassBase):
    dtype: str = "fp16"                # "fp16" | "bf16" | "fp32" (leave everything in FP32)
    io_dtype: str | None = None        # also convert graph inputs/outputs; None keeps them
    keep_fp32_ops: tuple = ()          # op types left in FP32
    name = "autocast"

    def __post_init__(self):
        check_choice(self.dtype, tuple(autocast.DTYPES), "precision")
        if self.io_dtype is not None:
            check_choice(self.io_dtype, IO_DTYPES, "--io-dtype")
        self.keep_fp32_ops = (self.keep_fp32_ops,) if isinstance(self.keep_fp32_ops, str) else tuple(self.keep_fp32_ops)

    @property
    def high_precision(self) -> str:
        """Scales of the quantization passes are rounded to what the rest of the graph runs in."""
        return self.dtype

    def check_recipe(self, recipe, index: int) -> None:
        if index != len(recipe) - 1:
            raise OnnxoptError("Autocast must be the last pass: the passes before it work on the FP32 graph")

    def run(self, ctx) -> dict:
        # Slot for range-aware autocast: ranges other passes measured, in ctx.stats["ranges"].
        return autocast.to_low_precision(ctx.graph, self.dtype, io_dtype=self.io_dtype, keep_fp32_ops=self.keep_fp32_ops)
