"""AWQ pass: activation-aware scale and clip search for the INT4 pass that follows it (onnxopt.awq).
Scales are folded into the graph here; clip ratios (or error-feedback rounded weights, `full`) go to the
Int4 pass through `ctx.awq`."""
from __future__ import annotations

from dataclasses import dataclass

from .. import awq
from ..pipeline import AwqChoice
from ..errors import OnnxoptError
from .base import PassBase, after, check_choice

METHODS = ("lite", "clip", "full")


@dataclass
class AWQ(PassBase):
    method: str = "full"   # lite: scale search; clip: clip search; full: both, then error-feedback rounding
    name = "awq"

    def __post_init__(self):
        check_choice(self.method, METHODS, "--awq")

    @property
    def needs_data(self) -> bool:
        return True

    def check_recipe(self, recipe, index: int) -> None:
        from .int4 import Int4
        from .qdq import QDQ
        nxt = after(recipe, index, (Int4, QDQ))
        if not nxt or not isinstance(nxt[0], Int4):
            raise OnnxoptError("--awq applies to --int4 only (it searches INT4 scales); drop it or quantize with --int4")

    def run(self, ctx) -> dict:
        from .int4 import Int4
        target = ctx.following(Int4, self)
        layers, _ = target.select(ctx.graph)
        report, clips = awq.apply(ctx.graph, ctx.require_data(f"--awq {self.method}"), layers, method=self.method,
                                  block_size=target.block_size, high_precision=ctx.high_precision,
                                  provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
        ctx.awq = AwqChoice(clips, self.method)
        return report
