"""Tensors between `--auto`'s stages (`autoquant.staged`): boundary tensors per batch in memory or in .npy files
mapped for each use, one batch's tensors in memory, OrtValues bound on a device, and the relative squared error
arithmetic of the staged sensitivities."""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .stage_plan import StagePlan

SPILL = 1 << 20                                     # boundary arrays above this go to disk
PER_TENSOR = True


class Store:
    """Tensors of one stream of stage runs, per batch: small ones in memory, big ones as .npy read memory-mapped
    for each use (a mapping held for the evaluator's life kept every page read in the process's RSS: the full-size
    run reached 13.7 GiB at stage 13 of 32); a tensor is dropped once no later stage reads it."""

    def __init__(self, root: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="stream-", dir=root))
        self.data: dict[str, dict] = {}
        self.paths: dict[str, list] = {}
        self.files = 0

    def save(self, batch: int, arrays: dict) -> None:
        for name, a in arrays.items():
            if a.nbytes > SPILL:
                p = self.dir / f"{self.files}.npy"
                self.files += 1
                np.save(p, a)
                self.paths.setdefault(name, []).append(p)
                a = p
            self.data.setdefault(name, {})[batch] = a

    def get(self, batch: int, name: str):
        a = self.data[name][batch]
        return np.load(a, mmap_mode="r") if isinstance(a, Path) else a

    def has(self, name: str) -> bool:
        return name in self.data

    def drop_dead(self, plan: StagePlan, after: int, keep=()) -> None:
        for name in [n for n in self.data if plan.last_use.get(n, -1) <= after and n not in keep]:
            del self.data[name]
            for p in self.paths.pop(name, ()):
                p.unlink(missing_ok=True)  # disk holds one stage's boundary per stream, not the whole model's

    def close(self) -> None:
        self.data.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class BatchTensors:
    """One batch's tensors between stages, in memory (`Store`'s get, for chains batch by batch)."""

    def __init__(self):
        self.data: dict = {}

    def get(self, batch: int, name: str):
        return self.data[name]


def onnxruntime_value(a: np.ndarray, device: str):
    import onnxruntime
    # np.ascontiguousarray makes a 0-d array 1-d: a scalar crossing stages (a Shape's Gather) kept its rank
    # only on the If path; the full-size SDXL run failed on it at a cut inside an attention's shape math.
    return onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a).reshape(np.shape(a)), device, 0)


def sq_lead(a) -> np.ndarray:
    """Sums of squares per leading index (rank 0: the one value), in float64, a few MB at a time."""
    a = np.asarray(a)
    if a.ndim < 2:
        return np.square(a.astype(np.float64))
    flat, step = a.reshape(a.shape[0], -1), max(1, (1 << 22) // max(1, a[0].size))
    return np.concatenate([np.einsum("ij,ij->i", c, c) for c in
                           (flat[i:i + step].astype(np.float64) for i in range(0, len(flat), step))])


def per_sample(v: np.ndarray, k: int) -> np.ndarray:
    """Per-leading-index sums -> per-sample sums over the `k` samples of a batch (leading dims of k * m are
    sample-major, as in [B * heads, ...]); anything else is spread evenly."""
    v = np.asarray(v, np.float64)
    if v.ndim == 1 and v.size % k == 0:
        return v.reshape(k, -1).sum(1)
    return np.full(k, float(v.sum()) / k)


def relative(num: dict, den: dict) -> float:
    """Relative squared error of each output tensor, averaged over the tensors (each counts alike: a small tensor,
    say a time-embedding projection, can matter downstream as much as a big one) and over the samples (the metric,
    1 - cosine, is a mean over samples too). num/den: batch -> [tensors, samples]."""
    n, d = np.concatenate([num[b] for b in num], axis=1), np.concatenate([den[b] for b in num], axis=1)
    if not np.all(np.isfinite(n)):
        return math.inf
    if not PER_TENSOR:  # pooled over the tensors: the big ones dominate
        n, d = n.sum(0, keepdims=True), d.sum(0, keepdims=True)
    ok = d > 0
    r = np.where(ok, n / np.where(ok, d, 1.0), 0.0)
    return float(np.mean(r.sum(0) / np.maximum(ok.sum(0), 1))) if ok.any() else 0.0
