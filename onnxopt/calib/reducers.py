"""Reducers: streaming statistics of one tensor, folded batch by batch (memory independent of the data size).

A reducer whose statistic survives an in-graph reduction declares it (`PreReduce`), so that ONNX Runtime computes
it right after the tensor's producer and only the small result is fetched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import OnnxoptError
from .im2col import CHUNK_BYTES, ConvView, im2col


@dataclass(frozen=True)
class PreReduce:
    """A reduction ONNX Runtime can run inside the graph, so that only its small result is fetched:
    `op` over every axis but `keep_axis` (None: all axes), of |x| when `absolute`."""
    op: str
    absolute: bool
    keep_axis: int | None = None
    rank: int | None = None  # the tensor's rank when shape inference may not know it (Conv inputs)
    fraction: float | None = None  # TopK: keep this fraction of the elements of all batches (and the count)
    sample: int | None = None  # Sample: at most this many elements (strided), with the count and the exact tail


# Elements of one tensor a histogram takes per batch (a strided sample plus the exact tail above it, the whole
# tensor at or below): measured MSE clips within one step of the candidate grid (4.4%) of the whole tensor's.
HIST_SAMPLE = 2**18


class NonFiniteActivation(OnnxoptError):
    """A tensor reached a reducer holding inf or NaN; `collect` names the tensor and the batch."""


class Reducer:
    """Folds each batch of one tensor into a running statistic."""

    pre_reduce: PreReduce | None = None  # set by reducers whose statistic survives an in-graph reduction

    def start(self, batches: int) -> None:
        """Called once before the first batch with the number of batches to come."""

    def update(self, x: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class AbsMax(Reducer):
    pre_reduce = PreReduce("ReduceMax", True)

    def __init__(self):
        self.value = 0.0

    def update(self, x):
        if x.size:
            self.value = max(self.value, float(np.max(np.abs(x))))


class ChannelAbsMax(Reducer):
    """Per-channel max |x| along `axis` (-1 for MatMul inputs, 1 for Conv inputs)."""

    def __init__(self, axis: int = -1, rank: int | None = None):
        self.axis = axis
        self.value = None
        self.pre_reduce = PreReduce("ReduceMax", True, axis, rank)

    def update(self, x):
        x = np.moveaxis(np.abs(x), self.axis, -1).reshape(-1, x.shape[self.axis])
        m = x.max(axis=0).astype(np.float64)
        self.value = m if self.value is None else np.maximum(self.value, m)


class ChannelMean(Reducer):
    """Per-channel mean along `axis` (running sum and count)."""

    def __init__(self, axis: int = -1, rank: int | None = None):
        self.axis = axis
        self.sum = None
        self.count = 0
        self.pre_reduce = PreReduce("ReduceMean", False, axis, rank)  # a mean of equal-sized batch means

    def update(self, x):
        x = np.moveaxis(np.asarray(x, dtype=np.float64), self.axis, -1)
        flat = x.reshape(-1, x.shape[-1])
        s = flat.sum(axis=0)
        self.sum = s if self.sum is None else self.sum + s
        self.count += flat.shape[0]

    @property
    def value(self):
        return None if self.sum is None else self.sum / max(self.count, 1)


class Histogram(Reducer):
    """Histogram of |x| over [0, range); the range doubles (merging bin pairs) when a batch exceeds it,
    so the memory is fixed whatever the number of batches.

    In the graph, a tensor of more than `sample` elements is cut to its `sample // 16` largest |x| (exact: the
    tail decides an MSE clip, and a sample would miss most of it), every p-th element (p prime, at most
    `sample` of them) standing for the rest, and the element count. Smaller tensors come whole (the same counts as `update` on the array). `sample=None` fetches
    whole tensors."""

    def __init__(self, bins: int = 4096, sample: int | None = HIST_SAMPLE):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.range = 0.0
        self.amax = 0.0
        self.pre_reduce = PreReduce("Sample", True, sample=sample) if sample else None

    @classmethod
    def for_provider(cls, provider: str) -> "Histogram":
        """Sampled in the graph on CUDA, where fetching whole activations to the host is the cost (full-size
        SDXL: ~100 s a batch for 1090 tensors); whole tensors on the CPU, where the graph's TopK costs more
        than it saves (half-size SDXL UNet at 256x256, 4 batches: 69 s sampled, 40 s whole)."""
        return cls(sample=HIST_SAMPLE if provider == "cuda" else None)

    def update(self, x, n=None, top=None):
        """Fold |x| in; from the graph, `x` is a sample of `n` elements whose largest |x| are `top`."""
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        n = a.size if n is None else int(np.asarray(n).ravel()[0])
        if not a.size:
            return
        parts = [(a, 1.0)]
        if n > a.size and top is not None:  # exact tail, the sample's values below it stand for the rest
            top = np.abs(np.asarray(top, dtype=np.float32)).ravel()
            below = a[a < top.min()]
            rest = n - top.size
            parts = [(top, 1.0)] + ([(below, rest / below.size)] if below.size else [(top[:1] * 0 + top.min(), rest)])
        elif n > a.size:
            parts = [(a, n / a.size)]
        m = float(max(p.max() for p, _ in parts))
        if not math.isfinite(m):  # inf would double the range forever, NaN would index a negative bin
            raise NonFiniteActivation("holds inf or NaN")
        self.amax = max(self.amax, m)
        if m == 0.0 and self.range == 0.0:
            self.counts[0] += n
            return
        if self.range == 0.0:
            self.range = m * (1 + 1e-6)
        # Doublings needed, computed rather than looped: at most ~2100 between float32's tiniest and largest.
        doublings = max(0, math.ceil(math.log2(m / self.range) + 1e-12)) if m >= self.range else 0
        if doublings and m >= self.range * 2.0 ** doublings:
            doublings += 1
        for _ in range(min(doublings, int(math.log2(self.bins)) + 1)):
            c = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([c, np.zeros(self.bins - c.size)])
        self.range *= 2.0 ** doublings
        for p, w in parts:
            idx = np.minimum((p * (self.bins / self.range)).astype(np.int64), self.bins - 1)
            c = np.bincount(idx, minlength=self.bins)
            self.counts += c if w == 1.0 else c * w

    @property
    def edges(self):
        return np.linspace(0.0, self.range, self.bins + 1)


class TopAbs(Reducer):
    """The largest |x| over all batches, as many as the `percentile` of all elements needs: an exact
    percentile from a few values per tensor. In the graph, TopK keeps them per batch (with the element
    count), so one pass fetches kilobytes instead of whole activations."""

    def __init__(self, percentile: float = 99.99):
        if not 0.0 < percentile <= 100.0:
            raise OnnxoptError(f"percentile {percentile} is out of range; use a value in (0, 100], e.g. 99.99")
        self.percentile = percentile
        self.fraction = 1.0 - percentile / 100.0
        self.pre_reduce = PreReduce("TopK", True, fraction=self.fraction)
        self.batches = 1
        self.count = 0
        self.cap = 1
        self.top = np.zeros(0, np.float32)

    def start(self, batches: int) -> None:
        self.batches = max(1, batches)

    def update(self, x, n=None):
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        n = a.size if n is None else int(np.asarray(n).ravel()[0])
        self.count += n
        # Enough for any total count: no batch holds more than the largest one seen.
        self.cap = max(self.cap, top_k(n, self.fraction, self.batches))
        a = np.concatenate([self.top, a])
        self.top = a if a.size <= self.cap else np.partition(a, a.size - self.cap)[a.size - self.cap:]

    @property
    def value(self) -> float:
        if not self.count or not self.top.size:
            return 0.0
        rank = self.count - max(1, math.ceil(self.percentile / 100.0 * self.count - 1e-9))  # 0 = the largest
        top = np.sort(self.top)[::-1]
        return float(top[min(rank, top.size - 1)])


def top_k(n: int, fraction: float, batches: int) -> int:
    """Values a batch of `n` elements contributes to a percentile over `batches` such batches."""
    return math.ceil(fraction * n * batches) + 2


# ---------------------------------------------------------------- second moments (SparseGPT, AWQ)
class Hessian(Reducer):
    """Streaming H = XᵀX (float64) of a layer input seen as rows X[rows, dim]: the last axis of a MatMul input
    (the first with `trans`, Gemm transA), the im2col patches of a Conv input (`conv`)."""

    def __init__(self, dim: int, conv: ConvView | None = None, trans: bool = False):
        self.dim, self.conv, self.trans = dim, conv, trans
        self.H = np.zeros((dim, dim), dtype=np.float64)
        self.n = 0
        self._buf, self._buf_rows = [], 0  # small batches are gathered into one product (fewer BLAS calls)

    def update(self, x):
        for rows in self._rows(np.asarray(x)):
            self._buf.append(np.asarray(rows, dtype=np.float32))
            self._buf_rows += rows.shape[0]
            if self._buf_rows * self.dim * 4 >= CHUNK_BYTES:
                self._flush()

    def _flush(self):
        if self._buf:
            rows = np.concatenate(self._buf) if len(self._buf) > 1 else np.ascontiguousarray(self._buf[0])
            self._buf, self._buf_rows = [], 0
            self.H += (rows.T @ rows).astype(np.float64)
            self.n += rows.shape[0]

    def _rows(self, x):
        if self.conv is None:
            x = x.T if self.trans else x.reshape(-1, x.shape[-1])
            step = max(1, CHUNK_BYTES // (4 * x.shape[1]))
            for i in range(0, x.shape[0], step):
                yield x[i:i + step]
            return
        yield from im2col(x, self.conv, self.dim)

    @property
    def rows(self) -> int:
        return self.n + self._buf_rows

    @property
    def mean(self) -> np.ndarray:
        self._flush()
        return self.H / max(self.n, 1)


class ChannelMeanAbs(Reducer):
    """Mean |x| per channel along `axis`, streaming."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.sum = None
        self.count = 0

    def update(self, x):
        x = np.moveaxis(np.abs(np.asarray(x, dtype=np.float32)), self.axis, -1)
        x = x.reshape(-1, x.shape[-1])
        s = x.sum(axis=0, dtype=np.float64)
        self.sum = s if self.sum is None else self.sum + s
        self.count += len(x)

    @property
    def value(self) -> np.ndarray | None:
        return None if self.sum is None else self.sum / max(self.count, 1)


class Gram(Reducer):
    """H = X^T X over all rows (channel axis last), float32, streaming: the layer output error of any weight
    change D is tr(D^T H D), so searches need no stored activations. Rows are buffered (about 8 MB)
    so that the products are few and large."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.h = None
        self.buf: list[np.ndarray] = []
        self.rows = 0
        self.total_rows = 0

    def update(self, x):
        x = np.moveaxis(np.asarray(x, dtype=np.float32), self.axis, -1)
        x = x.reshape(-1, x.shape[-1])
        self.buf.append(x)
        self.rows += len(x)
        self.total_rows += len(x)
        if self.rows * x.shape[1] >= 2**21:
            self._flush()

    def _flush(self):
        if not self.buf:
            return
        x = np.concatenate(self.buf)
        self.buf, self.rows = [], 0
        g = x.T @ x
        if self.h is None:
            self.h = g
        else:
            self.h += g

    @property
    def value(self) -> np.ndarray | None:
        self._flush()
        return self.h


# ---------------------------------------------------------------- row samples (SmoothQuant's alpha search, AWQ)
class RowSample(Reducer):
    """Up to `rows` rows of the activation (channel axis last), drawn evenly from the first `batches`
    batches; the rest of the data is ignored, so memory is bounded."""

    def __init__(self, axis: int, rows: int, batches: int, seed: int = 0):
        self.axis, self.rows, self.batches = axis, rows, max(1, batches)
        self.rng = np.random.default_rng(seed)
        self.parts: list[np.ndarray] = []
        self.seen = 0

    def update(self, x):
        if self.seen >= self.batches or x.size == 0:
            return
        self.seen += 1
        x2 = np.moveaxis(np.asarray(x), self.axis, -1)
        x2 = x2.reshape(-1, x2.shape[-1])
        k = min(len(x2), math.ceil(self.rows / self.batches))
        idx = np.sort(self.rng.choice(len(x2), k, replace=False))
        self.parts.append(x2[idx].astype(np.float32))

    @property
    def value(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros((0, 0), np.float32)


class PatchSample(RowSample):
    """Like RowSample, for a Conv input: im2col patches [rows, C * prod(kernel)] at random output positions,
    in the weight's (channel, kernel position) order."""

    def __init__(self, node, kernel: tuple[int, ...], rows: int, batches: int, seed: int = 0):
        super().__init__(1, rows, batches, seed)
        nd = len(kernel)
        self.kernel = tuple(kernel)
        self.strides = list(node.attrs.get("strides", [1] * nd))
        self.dilations = list(node.attrs.get("dilations", [1] * nd))
        self.pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        self.auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(self.auto_pad, bytes):
            self.auto_pad = self.auto_pad.decode()

    def _pads(self, sp):
        view = ConvView(self.kernel, tuple(self.strides), tuple(self.pads), tuple(self.dilations), self.auto_pad)
        return view.padding(sp)  # the padding rule of im2col

    def update(self, x):
        if self.seen >= self.batches or x.size == 0:
            return
        self.seen += 1
        x = np.asarray(x)
        n, c, sp = x.shape[0], x.shape[1], x.shape[2:]
        nd = len(sp)
        begin, end = self._pads(sp)
        xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
        out = [(sp[d] + begin[d] + end[d] - self.dilations[d] * (self.kernel[d] - 1) - 1) // self.strides[d] + 1
               for d in range(nd)]
        total = n * int(np.prod(out))
        k = min(total, math.ceil(self.rows / self.batches))
        coords = np.unravel_index(self.rng.choice(total, k, replace=False), (n, *out))
        kgrid = np.indices(self.kernel).reshape(nd, -1)
        idx = (coords[0][:, None, None], np.arange(c)[None, :, None]) + tuple(
            (coords[1 + d] * self.strides[d])[:, None, None] + (kgrid[d] * self.dilations[d])[None, None, :]
            for d in range(nd))
        self.parts.append(xp[idx].reshape(k, -1).astype(np.float32))
