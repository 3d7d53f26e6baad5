"""Run settings: how a run may use the machine (provider, memory budget, progress, seed), made once from the
command line or the API and handed to every pass through the pipeline's Context. The memory budget's default
is defined here and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import OnnxoptError

MEMORY_BUDGET_MB = 4096   # calibration: weights ORT holds at once (else stages), whole activations per pass, Hessians
PROVIDERS = ("cpu", "cuda")


@dataclass(frozen=True)
class RunSettings:
    """Resources of one run, checked when made (before any model is read)."""
    provider: str = "cpu"                 # ONNX Runtime execution provider for calibration and checks
    allow_cpu_fallback: bool = False      # an unavailable provider falls back to the CPU instead of failing
    memory_budget_mb: int = MEMORY_BUDGET_MB
    progress: bool = True                 # progress bars on a terminal, periodic log lines elsewhere
    seed: int = 0                         # generated calibration data and sampled statistics
    threads: int = 0                      # worker threads for per-weight numpy work (0: one per core); results do not depend on it

    def __post_init__(self):
        if self.memory_budget_mb is None or self.memory_budget_mb <= 0:
            raise OnnxoptError(f"--memory-budget must be > 0, got {self.memory_budget_mb}")
        if self.seed is None or self.seed < 0:
            raise OnnxoptError(f"--seed must be >= 0, got {self.seed}")
        if self.threads is None or self.threads < 0:
            raise OnnxoptError(f"--threads must be >= 0 (0: one per core), got {self.threads}")
        if self.provider not in PROVIDERS:
            raise OnnxoptError(f"unknown provider '{self.provider}'; use one of {', '.join(PROVIDERS)}")


RUN_SETTINGS = tuple(RunSettings.__dataclass_fields__)   # the field names, for APIs taking them as keywords
