"""LowRank pass: SVDQuant-style low-rank branch before the quantizing pass (onnxopt.lowrank)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import lowrank
from ..errors import OnnxoptError
from ..quant import blockwise, qdq, rules
from .base import PassBase, after

# Relative noise power that 8-bit per-tensor activation quantization adds (E|ΔX|² / E|X|²), assumed for the
# rank choice (no calibration pass here): step² / 12 with max|x| / rms(x) ≈ 16 (INT8); FP8 E4M3's relative
# rounding error (2^-4 / sqrt(3))² is of the same order.
ACT_NOISE = {"int8": (16 / 127) ** 2 / 12, "fp8": (2 ** -4) ** 2 / 3}


@dataclass
class LowRank(PassBase):
    """Before a QDQ (INT8/FP8) or Int4 pass, splits each layer it will quantize into a 16-bit rank-r branch
    and a residual it quantizes. rank: a positive integer, or "auto" (per layer, within `budget` times the
    quantized weight bytes of those layers)."""
    rank: int | str = "auto"
    budget: float = 0.1
    name = "lowrank"

    def __post_init__(self):
        self.rank = lowrank.parse_rank(self.rank)
        lowrank.check_rank(self.rank, self.budget)

    def check_recipe(self, recipe, index: int) -> None:
        from .int4 import Int4
        from .qdq import QDQ
        from .awq import AWQ
        if not after(recipe, index, (QDQ, Int4)):
            raise OnnxoptError("--lowrank needs a quantizing pass after it (--int8, --fp8 or --int4)")
        if any(isinstance(p, AWQ) for p in recipe):
            # AWQ's scales and rounded weights are searched for the whole weight, not the residual.
            raise OnnxoptError("--lowrank with --int4 needs --awq none (AWQ is not combined with the branch yet)")

    def run(self, ctx) -> dict:
        from .int4 import Int4
        from .qdq import QDQ
        q = ctx.following(QDQ, self) or ctx.following(Int4, self)
        hp = ctx.high_precision
        if isinstance(q, QDQ):
            nodes = rules.plan(ctx.graph, q).nodes
            bits, noise = 8, ACT_NOISE[q.mode]
            fake = _per_column_8bit(q.mode, hp)
        else:
            layers, _ = q.select(ctx.graph)
            nodes = [n for n, b in layers if b == 4]
            bits, noise = 4, 0.0
            fake = lambda w, bs=q.block_size: blockwise.fake_quant(w, bs, high_precision=hp)  # noqa: E731
        return lowrank.split(ctx.graph, nodes, fake_quant=fake, bits=bits, act_noise=noise, rank=self.rank,
                             budget=self.budget, progress=ctx.progress)


def _per_column_8bit(mode: str, hp: str):
    """Quantize-dequantize of a [K, N] weight per output column, as quant.qdq.quantize_weight writes it."""
    f = qdq.FORMATS[mode]

    def fake(w: np.ndarray) -> np.ndarray:
        amax = np.abs(w).max(axis=0)
        scale = qdq.round_scale(np.where(amax > 0, amax / f.QMAX, 1.0), hp)
        return f.to_float(f.cast(w / scale)) * scale
    return fake
