"""SmoothQuant pass: move activation outliers into the weights before INT8 (or, at a given alpha, FP8) Q/DQ
(onnxopt.smoothquant)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import fold, formats, smoothquant
from ..errors import OnnxoptError
from ..quant import rules
from .base import PassBase, after, check_regexes


@dataclass
class SmoothQuant(PassBase):
    """Before a QDQ("int8") pass, smooths exactly the layers that pass will quantize; alone, every weight
    layer of `op_types` not matching `exclude`."""
    alpha: float | str = "auto"      # migration strength in [0, 1], or "auto" (per-activation search)
    exclude: tuple = ()
    op_types: tuple = fold.CONSUMER_OPS
    name = "smoothquant"

    def __post_init__(self):
        self.alpha = smoothquant.parse_alpha(self.alpha)
        self.exclude = check_regexes(self.exclude, "--exclude")
        self.op_types = tuple(self.op_types)

    @property
    def needs_data(self) -> bool:
        return True

    def check_recipe(self, recipe, index: int) -> None:
        from .int4 import Int4
        from .qdq import QDQ
        nxt = after(recipe, index, (QDQ, Int4))
        if nxt and not (isinstance(nxt[0], QDQ) and formats.get(nxt[0].mode).smoothquant):
            sq = [m for m in formats.modes() if formats.get(m).smoothquant]
            raise OnnxoptError(f"--smoothquant applies to {'/'.join('--' + m for m in sq)} only; drop it or quantize with --{sq[0]}")
        target = smoothquant.TARGET.name
        if nxt and self.alpha == "auto" and nxt[0].mode != target:
            # the alpha search simulates the target format's rounding; another format needs a given alpha
            raise OnnxoptError(f"--smoothquant auto searches alpha for --{target} only; with --{nxt[0].mode} give an "
                               f"alpha in [0, 1], e.g. --smoothquant 1.0")

    def run(self, ctx) -> dict:
        from .qdq import QDQ
        data = ctx.require_data("SmoothQuant")
        qdq = ctx.following(QDQ, self)
        plan = rules.plan(ctx.graph, qdq) if qdq is not None else None
        return smoothquant.smooth(ctx.graph, data, plan, alpha=self.alpha, exclude=self.exclude, op_types=self.op_types,
                                  provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
