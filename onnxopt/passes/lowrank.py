"""LowRank pass: SVDQuant-style low-rank branch before the quantizing pass (onnxopt.lowrank)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import lowrank
from ..errors import OnnxoptError
from .. import formats
from ..quant import rules
from .base import PassBase, after



@dataclass
class LowRank(PassBase):
    """Before a QDQ (INT8/FP8), BlockFP (NVFP4/MXFP8 layers) or Int4 pass, splits each layer it will quantize into a 16-bit rank-r branch
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
            raise OnnxoptError("--lowrank needs a quantizing pass after it (--int8, --fp8, --int4, --nvfp4 or --mxfp8)")
        if any(isinstance(p, AWQ) for p in recipe):
            # AWQ's scales and rounded weights are searched for the whole weight, not the residual.
            raise OnnxoptError("--lowrank with --int4 needs --awq none (AWQ is not combined with the branch yet)")

    def run(self, ctx) -> dict:
        from .int4 import Int4
        from .qdq import QDQ
        from .blockfp import BlockFP
        q = ctx.following(QDQ, self) or ctx.following(Int4, self)
        hp = ctx.high_precision
        if isinstance(q, BlockFP):  # block weights (e.g. NVFP4): the residual is written by the format's own writer
            nodes, f = q.block_nodes(ctx.graph), q.fmt
            bits, noise, block = f.bits, 0.0 if q.weight_only else lowrank.act_noise(f), f.block_size
        elif isinstance(q, QDQ):
            nodes = rules.plan(ctx.graph, q).nodes
            f = formats.get(q.mode)
            bits, noise, block = f.bits, lowrank.act_noise(f), 0
        else:
            layers, _ = q.select(ctx.graph)
            f = formats.get(q.format)
            nodes = [n for n, b in layers if b != 8]
            bits, noise, block = f.bits, 0.0, q.block_size

        def fake(w_kn, f=f, block=block):  # the registry format's exact quantize-dequantize, per output column
            return f.fake_quant(w_kn, 1, hp, block_size=block)
        return lowrank.split(ctx.graph, nodes, fake_quant=fake, bits=bits, act_noise=noise, rank=self.rank,
                             budget=self.budget, progress=ctx.progress)

