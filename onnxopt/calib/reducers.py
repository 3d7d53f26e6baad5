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
    bins: int | None = None  # Histogram: bins of the graph's grid, at the scale the host feeds (see Histogram)
    sorted: bool = False  # TopK: ask for sorted values (ORT's CUDA TopK then sorts device-wide, see TopAbs)


class NonFiniteActivation(OnnxoptError):
    """A tensor reached a reducer holding inf or NaN; `collect` names the tensor and the batch."""


class Reducer:
    """Folds each batch of one tensor into a running statistic."""

    pre_reduce: PreReduce | None = None  # set by reducers whose statistic survives an in-graph reduction

    def start(self, batches: int) -> None:
        """Called once before the first batch with the number of batches to come."""

    def update(self, x: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def reduced(self, *outputs: np.ndarray) -> bool:
        """Fold in the outputs of the in-graph reduction (`pre_reduce`) of one batch; False: run the batch
        again (with the values the reducer feeds the graph now) and fold that instead."""
        self.update(*outputs)
        return True


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


class ChannelExtreme(Reducer):
    """Per-channel max (`lowest=False`) or min (`lowest=True`) of x along `axis`, signed: with its partner,
    the range each channel spans (the activation shift centres it, rewrite/shift.py)."""

    def __init__(self, axis: int = -1, rank: int | None = None, lowest: bool = False):
        self.axis, self.lowest = axis, lowest
        self.value = None
        self.pre_reduce = PreReduce("ReduceMin" if lowest else "ReduceMax", False, axis, rank)

    def update(self, x):
        x = np.moveaxis(np.asarray(x), self.axis, -1).reshape(-1, x.shape[self.axis])
        if not len(x):
            return
        m = (x.min(axis=0) if self.lowest else x.max(axis=0)).astype(np.float64)
        self.value = m if self.value is None else (np.minimum if self.lowest else np.maximum)(self.value, m)


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


HIST_GROWTH = 2  # range doublings one in-graph batch absorbs (its counts come on a grid 2^this times as long)


class Histogram(Reducer):
    """Histogram of |x| over [0, range): the first batch sets range = max |x| * (1 + 1e-6); a batch beyond it
    doubles the range (merging bin pairs) as often as it needs, so the memory is fixed whatever the number of
    batches. Bin of v: min(floor(float32(v) * float32(bins / range)), bins - 1).

    `in_graph`: ONNX Runtime bins every element inside the graph (ScatterElements add, float64 counts) with the
    scale the host feeds before each batch (`feed_scale`), on a grid of bins * 2^HIST_GROWTH + 1 bins of the
    same width, and only the counts and the batch's max come back (`reduced`). A range that grows by up to
    2^HIST_GROWTH is bin pairs merged on that grid; the first batch, and one growing more, runs again at the
    range its max sets (`reduced` says so). The same counts as `update` on the whole tensor, bit for bit."""

    def __init__(self, bins: int = 4096, in_graph: bool = False):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.range = 0.0
        self.amax = 0.0
        self.pre_reduce = PreReduce("Histogram", True, bins=(bins << HIST_GROWTH) + 1) if in_graph else None

    @classmethod
    def for_provider(cls, provider: str) -> "Histogram":
        """Binned in the graph on CUDA, where fetching whole activations to the host is the cost (full-size
        SDXL: GBs a batch); whole tensors on the CPU, where numpy's bincount measured faster than ORT's
        ScatterElements (5 M elements: 0.14 s against 0.31 s)."""
        return cls(in_graph=provider == "cuda")

    def feed_scale(self) -> np.ndarray:
        """float32(bins / range), what the graph multiplies |x| by for the next batch (0 before the first)."""
        return np.array(self.bins / self.range if self.range else 0.0, np.float32)

    def update(self, x):
        """Fold the whole tensor `x` in."""
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if not a.size:
            return
        m = float(a.max())
        self._check(m)
        if m == 0.0 and self.range == 0.0:
            self.counts[0] += a.size
            return
        self._grow(m, m * (1 + 1e-6) if self.range == 0.0 else grown_range(self.range, m))
        idx = np.minimum((a * (self.bins / self.range)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    def reduced(self, counts, amax) -> bool:
        """Fold in a batch binned in the graph at `feed_scale()` (its fine-grid `counts` and max); False when
        the batch must run again at the range it set (the first one) or grew beyond HIST_GROWTH doublings."""
        m = float(np.asarray(amax).ravel()[0])
        self._check(m)
        counts = np.asarray(counts, dtype=np.float64).ravel()
        if self.range == 0.0:
            if m == 0.0:
                self.counts[0] += counts.sum()
                return True
            self._grow(m, m * (1 + 1e-6))
            return False
        grown = grown_range(self.range, m)
        d = round(math.log2(grown / self.range))
        self._grow(m, grown)
        if d > HIST_GROWTH:
            return False
        k = self.bins << d  # floor(v * s / 2^d) = floor(floor(v * s) / 2^d): 2^d fine bins make one
        merged = counts[:k].reshape(self.bins, 1 << d).sum(axis=1)
        merged[-1] += counts[k:].sum()  # beyond the range by rounding only: the last bin, as `update` clamps
        self.counts += merged
        return True

    def _check(self, m: float):
        if not math.isfinite(m):  # inf would double the range forever, NaN would index a negative bin
            raise NonFiniteActivation("holds inf or NaN")

    def _grow(self, m: float, new_range: float):
        """Take max `m` and move to `new_range` (the first range, or this one times a power of two)."""
        self.amax = max(self.amax, m)
        if self.range == 0.0:
            self.range = new_range
            return
        doublings = round(math.log2(new_range / self.range))
        for _ in range(min(doublings, int(math.log2(self.bins)) + 1)):
            c = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([c, np.zeros(self.bins - c.size)])
        self.range = new_range

    @property
    def edges(self):
        return np.linspace(0.0, self.range, self.bins + 1)


def grown_range(r: float, m: float) -> float:
    """r times the smallest power of two (2^0 included) that puts m strictly below it (exact in float64)."""
    if m < r:
        return r
    d = max(1, math.ceil(math.log2(m / r)))
    while m >= r * 2.0 ** d:  # log2 rounding: correct upwards, then downwards, with exact comparisons
        d += 1
    while d > 1 and m < r * 2.0 ** (d - 1):
        d -= 1
    return r * 2.0 ** d


class TopAbs(Reducer):
    """The largest |x| over all batches, as many as the `percentile` of all elements needs: an exact
    percentile from a few values per tensor. In the graph, TopK keeps them per batch (with the element
    count), so one pass fetches kilobytes instead of whole activations.

    `device_sort` (CUDA): ORT's CUDA TopK gives one thread block to a whole (flattened) tensor unless it is
    asked for sorted values and K > 4096, where it sorts on the whole device (cub); so the graph asks for
    sorted values and at least DEVICE_SORT_K of them. More values than needed change nothing: the host keeps
    the largest `cap`."""

    def __init__(self, percentile: float = 99.99, device_sort: bool = False):
        if not 0.0 < percentile <= 100.0:
            raise OnnxoptError(f"percentile {percentile} is out of range; use a value in (0, 100], e.g. 99.99")
        self.percentile = percentile
        self.fraction = 1.0 - percentile / 100.0
        self.pre_reduce = PreReduce("TopK", True, fraction=self.fraction, sorted=device_sort)
        self.batches = 1
        self.count = 0
        self.cap = 1
        self.top = np.zeros(0, np.float32)

    @classmethod
    def for_provider(cls, percentile: float, provider: str) -> "TopAbs":
        """Device-wide sorted TopK on CUDA; ORT's CPU TopK is fast unsorted."""
        return cls(percentile, device_sort=provider == "cuda")

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


DEVICE_SORT_K = 16 * 256 + 1  # ORT's CUDA TopK: above this K, sorted output takes cub's device-wide radix sort


def top_k(n: int, fraction: float, batches: int) -> int:
    """Values a batch of `n` elements contributes to a percentile over `batches` such batches."""
    return math.ceil(fraction * n * batches) + 2


# ---------------------------------------------------------------- second moments (SparseGPT, AWQ, GPTQ-style rounding)
class Hessian(Reducer):
    """The one streaming H = XᵀX of a layer input seen as rows X[rows, dim] (SparseGPT, shared rounding, AWQ's
    Gram, error-feedback rounding). Rows: the channel `axis` moved last (a MatMul input: -1; the first axis with
    `trans`, Gemm transA), or the im2col patches of a Conv input (`conv`, (kernel position, channel) order). All rows, or with `sample` (a
    RowSample or PatchSample) only the rows it draws, folded in as each batch arrives and not kept. Streamed rows
    and sampled rows alike: their products are float32 (BLAS, 1.7x float64's speed), summed in `dtype` (float64;
    AWQ's float32 halves the memory). `dim` None: taken from the first rows."""

    def __init__(self, dim: int | None = None, conv: ConvView | None = None, trans: bool = False, *, axis: int = -1,
                 sample: "RowSample | None" = None, dtype=np.float64, chunk_bytes: int = CHUNK_BYTES):
        self.dim, self.conv, self.trans, self.axis, self.sample = dim, conv, trans, axis, sample
        self.dtype, self.chunk_bytes = np.dtype(dtype), chunk_bytes
        self.H = None if dim is None else np.zeros((dim, dim), dtype=self.dtype)
        self.n = 0
        self._buf, self._buf_rows = [], 0  # small batches are gathered into one product (fewer BLAS calls)

    def update(self, x):
        if self.sample is not None:
            self.sample.update(x)
            while self.sample.parts:
                self._add(self.sample.parts.pop())
            return
        for rows in self._rows(np.asarray(x)):
            self._buf.append(np.asarray(rows, dtype=np.float32))
            self._buf_rows += rows.shape[0]
            if self._buf_rows * rows.shape[1] * 4 >= self.chunk_bytes:
                self._flush()

    def _flush(self):
        if self._buf:
            rows = np.concatenate(self._buf) if len(self._buf) > 1 else np.ascontiguousarray(self._buf[0])
            self._buf, self._buf_rows = [], 0
            self._add(rows)

    def _add(self, rows: np.ndarray) -> None:
        g = rows.T @ rows
        if self.H is None:
            self.dim, self.H = rows.shape[1], g.astype(self.dtype)
        else:
            self.H += g if g.dtype == self.dtype else g.astype(self.dtype)
        self.n += rows.shape[0]

    def _rows(self, x):
        if self.conv is None:
            if self.trans:
                x = x.T
            else:
                x = np.moveaxis(x, self.axis, -1) if self.axis not in (-1, x.ndim - 1) else x
                x = x.reshape(-1, x.shape[-1])
            step = max(1, self.chunk_bytes // (4 * x.shape[1]))
            for i in range(0, x.shape[0], step):
                yield x[i:i + step]
            return
        yield from im2col(x, self.conv, self.dim)

    @property
    def rows(self) -> int:
        return self.n + self._buf_rows

    @property
    def value(self) -> np.ndarray | None:
        """H = Σ xᵀx over the rows seen (None before any row when `dim` was not given)."""
        self._flush()
        return self.H

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


class Gram(Hessian):
    """AWQ's H = XᵀX over all rows of the channel `axis`: the one Hessian in float32, rows gathered about 8 MB at a
    time (what AWQ's memory budget counts). The layer output error of any weight change D is tr(Dᵀ H D), so
    searches need no stored activations."""

    def __init__(self, axis: int = -1):
        super().__init__(axis=axis, dtype=np.float32, chunk_bytes=2**23)

    @property
    def total_rows(self) -> int:
        return self.rows


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
        # One gather of k contiguous channel rows per kernel position (channels last), stacked kernel-minor: the
        # (channel, kernel position) order, ~10x faster than indexing all k x C x prod(kernel) elements at once.
        xt = np.ascontiguousarray(np.moveaxis(xp, 1, -1), dtype=np.float32)
        cols = [xt[(coords[0],) + tuple(coords[1 + d] * self.strides[d] + kpos[d] * self.dilations[d] for d in range(nd))]
                for kpos in np.ndindex(*self.kernel)]
        self.parts.append(np.stack(cols, axis=-1).reshape(k, c * len(cols)))
