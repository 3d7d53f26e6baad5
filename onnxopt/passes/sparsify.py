"""Sparsify pass: N:M (2:4) structured pruning by magnitude or SparseGPT (onnxopt.sparsity)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import sparsity
from ..errors import OnnxoptError
from .base import PassBase, check_choice, check_regexes


@dataclass
class Sparsify(PassBase):
    pattern: str = "2:4"
    method: str = "magnitude"        # "magnitude" | "sparsegpt" (needs calibration data)
    exclude: tuple = ()              # regexes on node names left dense
    min_params: int = 4096           # skip weights with fewer values
    damp: float = 0.01               # SparseGPT damping, a fraction of mean diag(H)
    block: int = 128                 # SparseGPT lazy-update block (columns)
    sequential: bool = True          # SparseGPT: calibrate each stage on the already pruned graph
    name = "sparsity"

    def __post_init__(self):
        n, m = sparsity.parse_pattern(self.pattern)
        check_choice(self.method, sparsity.METHODS, "--sparsity-method")
        self.exclude = check_regexes(self.exclude, "--exclude")
        if self.min_params < 0:
            raise OnnxoptError(f"--min-params must be >= 0, got {self.min_params}")
        if self.damp < 0:
            raise OnnxoptError(f"--damp must be >= 0, got {self.damp}")
        if self.block <= 0 or self.block % m:
            raise OnnxoptError(f"--block must be a positive multiple of {m}, got {self.block}")

    @property
    def needs_data(self) -> bool:
        return self.method == "sparsegpt"

    def run(self, ctx) -> dict:
        data = ctx.require_data("--sparsity-method sparsegpt") if self.needs_data else ctx.data
        return sparsity.sparsify(ctx.graph, pattern=self.pattern, method=self.method, data=data, exclude=self.exclude,
                                 min_params=self.min_params, damp=self.damp, block=self.block,
                                 provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress,
                                 sequential=self.sequential)
