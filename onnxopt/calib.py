"""Calibration with ONNX Runtime.

Data comes from an .npz (arrays keyed by input name, first axis = samples), a directory of .npz, an
.npy (single-input models), or is generated. Every batch is reduced at once into running statistics
(`Reducer`s), so memory does not grow with the number of samples; most reductions run inside the graph.
Models with more weights than the memory budget run in stages (one stage's weights in ONNX Runtime at a
time, boundary tensors on disk). When the whole activations a reducer needs would exceed the budget in one
batch, the tensors are split into groups and each group gets its own pass.
"""
from __future__ import annotations

import heapq
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from tqdm import tqdm

from . import io
from . import ort as ortx
from .errors import OnnxoptError

log = logging.getLogger(__name__)

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
METHODS = ("max", "percentile", "entropy", "mse")


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints, or str / None for dynamic dims
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`name:1x4x128x128` strings -> {name: shape}."""
    out = {}
    for item in items or ():
        m = re.fullmatch(r"(.+):(\d+(?:x\d+)*)?", item.strip())
        if not m:
            raise OnnxoptError(f"bad --shapes entry '{item}'; write name:1x4x128x128")
        out[m.group(1)] = tuple(int(v) for v in m.group(2).split("x")) if m.group(2) else ()
    return out


class CalibData:
    """An iterable of feed dicts. Sources are read lazily, one file at a time."""

    def __init__(self, specs: Sequence[InputSpec], sources: Sequence, batch_size: int = 1, limit: int | None = None,
                 describe: str = "data", max_batch: int | None = None):
        self.specs = list(specs)
        self._sources = list(sources)  # callables returning {name: array with leading sample axis}
        self.batch_size = batch_size
        self.limit = limit
        self.describe = describe
        self.max_batch = max_batch  # split feeds along a dynamic batch axis (e.g. CFG pairs) to bound activations
        self._n = None

    # -- constructors
    @classmethod
    def from_path(cls, path, specs: Sequence[InputSpec], batch_size: int = 1, limit: int | None = None,
                  max_batch: int | None = None) -> "CalibData":
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.npz"))
            if not files:
                raise OnnxoptError(f"{p}: directory has no .npz files; put one .npz per chunk of samples there")
        elif p.is_file():
            files = [p]
        else:
            raise OnnxoptError(f"{p}: calibration data not found; pass an .npz, .npy or a directory of .npz")
        for f in files:
            if f.suffix not in (".npz", ".npy"):
                raise OnnxoptError(f"{f}: calibration data must be .npz (arrays keyed by input name) or .npy")
        sources = [(lambda f=f: _read_file(f, specs)) for f in files]
        data = cls(specs, sources, batch_size, limit, describe=str(p), max_batch=max_batch)
        data._validate(sources[0]())
        return data

    @classmethod
    def random(cls, specs: Sequence[InputSpec], n: int, seed: int = 0, shapes: dict | None = None,
               batch_size: int = 1, max_batch: int | None = None) -> "CalibData":
        shapes = shapes or {}
        concrete = {}
        for s in specs:
            shp = shapes.get(s.name)
            if shp is None:
                if any(not isinstance(d, int) or d <= 0 for d in s.shape):
                    raise OnnxoptError(f"input '{s.name}' has dynamic shape {_fmt(s.shape)}; give --shapes {s.name}:1x...")
                shp = s.shape
            concrete[s.name] = tuple(shp)

        def gen():
            rng = np.random.default_rng(seed)
            out = {}
            for s in specs:
                shp = (n,) + concrete[s.name]
                if s.dtype.kind == "f":
                    out[s.name] = rng.standard_normal(shp).astype(s.dtype)
                elif s.dtype.kind == "b":
                    out[s.name] = np.ones(shp, dtype=s.dtype)
                else:  # token ids, masks, indices: small non-negative ints keep them valid
                    out[s.name] = rng.integers(0, 2, size=shp).astype(s.dtype)
            return out

        return cls(specs, [gen], batch_size, None, describe=f"random(n={n}, seed={seed})", max_batch=max_batch)

    # -- iteration
    def _validate(self, arrays: dict) -> None:
        names = {s.name for s in self.specs}
        missing = names - set(arrays)
        if missing:
            raise OnnxoptError(f"{self.describe}: no array for model input(s) {sorted(missing)}; keys found: {sorted(arrays)}")
        for s in self.specs:
            a = arrays[s.name]
            if a.dtype != s.dtype and not (a.dtype.kind == s.dtype.kind == "f"):
                raise OnnxoptError(f"{self.describe}: input '{s.name}' has dtype {a.dtype}, the model expects {s.dtype}; convert the array")
            if a.ndim == len(s.shape) + 1:  # [samples, *input shape]
                shp = a.shape[1:]
            elif a.ndim == len(s.shape):
                shp = a.shape
            else:
                raise OnnxoptError(f"{self.describe}: input '{s.name}' has shape {_fmt(a.shape)}, the model expects {_fmt(s.shape)} (optionally with a leading sample axis)")
            for i, (d, e) in enumerate(zip(shp, s.shape)):
                if isinstance(e, int) and e > 0 and d != e and not (i == 0 and a.ndim == len(s.shape)):
                    raise OnnxoptError(f"{self.describe}: input '{s.name}' has shape {_fmt(a.shape)}, the model expects {_fmt(s.shape)}; dimension {i} differs")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        produced = 0
        for src in self._sources:
            arrays = src()
            self._validate(arrays)
            for sample in self._split(arrays):
                if self.limit is not None and produced >= self.limit:
                    return
                produced += 1
                yield from self._chunks(sample)

    def _split(self, arrays: dict) -> Iterator[dict]:
        # With a leading sample axis, each sample is a whole feed; otherwise chunk along the batch axis.
        spec = self.specs[0]
        a0 = arrays[spec.name]
        stacked = a0.ndim == len(spec.shape) + 1
        n = a0.shape[0]
        step = 1 if stacked else self.batch_size
        for i in range(0, n, step):
            feed = {}
            for s in self.specs:
                a = arrays[s.name]
                v = a[i] if stacked else a[i:i + step]
                feed[s.name] = np.ascontiguousarray(v.astype(s.dtype, copy=False))
            yield feed

    def _chunks(self, feed: dict) -> Iterator[dict]:
        """Split a feed along axis 0 into batches of at most `max_batch`, for inputs whose batch axis is
        dynamic; inputs that do not carry the batch (a broadcast timestep, say) are passed whole."""
        dynamic = {s.name for s in self.specs if s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0)}
        sizes = {v.shape[0] for k, v in feed.items() if k in dynamic and v.ndim}
        n = max(sizes, default=0)
        if not self.max_batch or n <= self.max_batch:
            yield feed
            return
        for i in range(0, n, self.max_batch):
            yield {k: (v[i:i + self.max_batch] if k in dynamic and v.ndim and v.shape[0] == n else v)
                   for k, v in feed.items()}

    def __len__(self) -> int:
        if self._n is None:
            self._n = sum(1 for _ in self)
        return self._n


def _read_file(f: Path, specs) -> dict:
    try:
        if f.suffix == ".npy":
            if len(specs) != 1:
                raise OnnxoptError(f"{f}: an .npy serves single-input models only; this one has inputs {[s.name for s in specs]}, use .npz")
            return {specs[0].name: np.load(f, mmap_mode="r")}
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    except OnnxoptError:
        raise
    except Exception as e:
        raise OnnxoptError(f"{f}: cannot read calibration data ({type(e).__name__}); the file may be corrupt or truncated") from None


def _fmt(shape) -> str:
    return "x".join(str(d) if d not in (None, "") else "?" for d in shape) or "scalar"


# ---------------------------------------------------------------- reducers
@dataclass(frozen=True)
class PreReduce:
    """A reduction ONNX Runtime can run inside the graph, so that only its small result is fetched:
    `op` over every axis but `keep_axis` (None: all axes), of |x| when `absolute`."""
    op: str
    absolute: bool
    keep_axis: int | None = None
    rank: int | None = None  # the tensor's rank when shape inference may not know it (Conv inputs)
    fraction: float | None = None  # TopK: keep this fraction of the elements of all batches (and the count)


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
    so the memory is fixed whatever the number of batches."""

    def __init__(self, bins: int = 4096):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.range = 0.0
        self.amax = 0.0

    def update(self, x):
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if not a.size:
            return
        m = float(a.max())
        self.amax = max(self.amax, m)
        if m == 0.0 and self.range == 0.0:
            self.counts[0] += a.size
            return
        if self.range == 0.0:
            self.range = m * (1 + 1e-6)
        while m >= self.range:
            c = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([c, np.zeros(self.bins - c.size)])
            self.range *= 2
        idx = np.minimum((a * (self.bins / self.range)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

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


# ---------------------------------------------------------------- amax from statistics
def amax_from_histogram(h: Histogram, method: str, qtype: str = "int8", percentile: float = 99.99) -> float:
    """Clip range for symmetric quantization to `qtype` ('int8' or 'fp8'), chosen by `method`."""
    if h.amax == 0.0:
        return 0.0
    if method == "max":
        return h.amax
    total = h.counts.sum()
    centers = (h.edges[:-1] + h.edges[1:]) / 2
    if method == "percentile":
        cdf = np.cumsum(h.counts) / total
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(h.edges[min(i + 1, h.bins)], h.amax))
    candidates = _candidates(h)
    if method == "mse":
        errs = [_quant_mse(centers, h.counts, c, qtype) for c in candidates]
        return float(candidates[int(np.argmin(errs))])
    if method == "entropy":
        return _entropy_amax(h, qtype)
    raise OnnxoptError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")


def _candidates(h: Histogram) -> np.ndarray:
    last = int(np.nonzero(h.counts)[0].max()) + 1
    stop = min(h.edges[last], h.amax)
    return np.unique(np.concatenate([np.geomspace(stop * 1e-3, stop, 160), [h.amax]]))


def _quant_mse(x: np.ndarray, w: np.ndarray, amax: float, qtype: str) -> float:
    if qtype == "fp8":
        s = amax / FP8_MAX
        q = np.clip(x / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s
    else:
        s = amax / 127.0
        q = np.clip(np.round(x / s), -127, 127) * s
    return float(np.sum(w * (x - q) ** 2))


def _entropy_amax(h: Histogram, qtype: str) -> float:
    """TensorRT's KL-divergence calibration over the |x| histogram (128 levels for INT8)."""
    levels = 128
    counts = h.counts.copy()
    # A spike in the first bin (the zeros of a ReLU output) would make KL favour tiny ranges; TensorRT's
    # calibrator flattens it the same way.
    if counts.size > 1:
        counts[0] = counts[1]
    nz = np.nonzero(counts)[0]
    last = int(nz.max()) + 1
    # Work on 2048 bins like TensorRT; fold finer histograms.
    factor = max(1, h.bins // 2048)
    counts = counts.reshape(-1, factor).sum(axis=1)
    last = min(counts.size, math.ceil(last / factor))
    width = h.range / counts.size
    best, best_i = np.inf, last
    start = levels
    for i in range(start, last + 1, max(1, (last - start) // 256 or 1)):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        nzmask = p > 0
        # Quantize the first i bins into `levels` bins, spreading each back over its non-empty source bins.
        idx = (np.arange(i) * levels) // i
        qsum = np.bincount(idx, weights=counts[:i], minlength=levels)
        qnz = np.bincount(idx, weights=(counts[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(counts[:i] > 0, qsum[idx] / np.maximum(qnz[idx], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        pn, qn = p / ps, q / qs
        mask = nzmask & (qn > 0)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask]))) + (1e9 if np.any(nzmask & (qn == 0)) else 0.0)
        if kl < best:
            best, best_i = kl, i
    return float(min((best_i + 0.5) * width, h.amax))


# ---------------------------------------------------------------- running the model
def _estimate_bytes(model: onnx.ModelProto, feed: dict, names: Sequence[str]) -> dict[str, int]:
    """Activation sizes for one batch, from shape inference with the batch's concrete input shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name in feed:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in feed[vi.name].shape:
                dims.add().dim_value = int(d)
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        pass
    sizes = {}
    batch = max((int(np.prod(v.shape)) * v.itemsize for v in feed.values()), default=1)
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if tt.elem_type and all(d > 0 for d in dims):
            sizes[vi.name] = int(np.prod(dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    return {n: sizes.get(n, 4 * batch) for n in names}


def _groups(sizes: dict[str, int], budget: int) -> list[list[str]]:
    groups, cur, used = [], [], 0
    for name, b in sizes.items():
        if cur and used + b > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += b
    if cur:
        groups.append(cur)
    return groups


def collect(model: onnx.ModelProto, data: CalibData, reducers: dict[str, Sequence[Reducer]], *,
            provider: str = "cpu", memory_budget_mb: int = 4096, progress: bool = True,
            desc: str = "calibrating", stages: int | None = None) -> None:
    """Run `model` over `data` and feed every batch of each named tensor to its reducers.

    Reducers with an in-graph reduction (max |x|, per-channel max |x|, per-channel mean) get it added to
    the graph and fetch only its result, all in one pass. The others fetch whole tensors as extra graph
    outputs, split into groups so that one batch of one group stays within `memory_budget_mb`.
    Models whose weights exceed the budget run in `stages` (None: as many as the budget needs): each
    stage holds only its own weights, and the tensors that cross into later stages wait on disk.
    Graph inputs are taken from the feeds.
    """
    if not reducers:
        return
    inputs = {vi.name for vi in model.graph.input}
    first = next(iter(data), None)
    if first is None:
        raise OnnxoptError(f"{data.describe}: no calibration samples")
    budget = memory_budget_mb * 2**20
    ranks = _ranks(model)
    full: dict[str, list] = {}
    reduced, aux_nodes = [], {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    n_batches = len(data)
    for name, rs in reducers.items():
        for r in rs:
            r.start(n_batches)
            spec = r.pre_reduce
            rank = ranks.get(name) or (spec.rank if spec is not None else None)
            if name in inputs or spec is None or (spec.keep_axis is not None and rank is None):
                full.setdefault(name, []).append(r)
                continue
            nodes, outs = _reduce_nodes(name, f"{name}__calib{len(reduced)}", spec, rank, opset, n_batches)
            aux_nodes.setdefault(name, []).extend(nodes)
            reduced.append((name, outs, r))
    if stages is None:
        stages = stage_count(model, budget)
    fetch = [n for n in full if n not in inputs]
    # Bytes per tensor for one batch: to group fetched tensors under the budget and to place stage cuts.
    wanted = fetch + (_tensor_names(model) if stages > 1 else [])
    sizes = _estimate_bytes(model, first, wanted) if wanted else {}
    plan = split_stages(model, stages, sizes)
    where = stage_index(plan)
    # Per stage: the whole tensors it produces, in groups under the budget (one pass each).
    passes = []
    for si, st in enumerate(plan):
        mine = {n: sizes[n] for n in fetch if where.get(n, 0) == si}
        for gi, group in enumerate(_groups(mine, budget) or [[]]):
            passes.append((si, gi, group))
    if len(passes) > len(plan):
        log.info("calibrating %d whole tensors in %d passes to stay within %d MB", len(fetch), len(passes), memory_budget_mb)
    if len(plan) > 1:
        log.info("calibrating in %d stages of at most %.2f GB of weights (budget %d MB)", len(plan),
                 max(st.weight_bytes for st in plan) / 1e9, memory_budget_mb)
    bar = tqdm(total=n_batches * len(passes), desc=desc, unit="batch", disable=not progress, leave=False)
    with _BoundaryCache(len(plan) > 1) as cache:
        for si, gi, group in passes:
            st = plan[si]
            small = [(outs, r) for name, outs, r in reduced if gi == 0 and where.get(name, 0) == si]
            keep = st.outputs if gi == 0 else []
            aux = {n: v for n, v in aux_nodes.items() if gi == 0 and where.get(n, 0) == si}
            names = list(dict.fromkeys(list(group) + [o for outs, _ in small for o in outs] + keep))
            sess = ortx.session(_stage_model(model, st, names, aux, cache), provider=provider, level="basic", lean=True)
            if not names:
                names = [sess.get_outputs()[0].name]
            for bi, feed in enumerate(data):
                feed = {k: v for k, v in feed.items() if k in st.inputs}
                feed.update(cache.load(bi, [n for n in st.inputs if n not in feed]))
                got = dict(zip(names, sess.run(names, feed)))
                for name in group:
                    for r in full[name]:
                        r.update(got[name])
                for outs, r in small:
                    r.update(*(got[o] for o in outs))
                if keep:
                    cache.save(bi, {n: got[n] for n in keep})
                del got, feed
                bar.update(1)
            del sess
    for name, rs in full.items():
        if name in inputs:
            for feed in data:
                for r in rs:
                    r.update(feed[name])
    bar.close()


# ---------------------------------------------------------------- stages
STAGE_MIN_BYTES = 64 * 2**20
MAX_STAGES = 16


@dataclass
class Stage:
    """A run of nodes in topological order: `inputs` are what it reads from the graph inputs and from earlier
    stages, `outputs` what later stages read from it."""
    nodes: list
    inputs: list
    outputs: list
    weight_bytes: int
    produces: set


def stage_count(model: onnx.ModelProto, budget: int) -> int:
    """Stages needed so that each holds at most `budget` bytes of weights (1 for graphs with subgraphs)."""
    if io.has_subgraphs(model.graph):
        return 1
    total = sum(io.tensor_bytes(t) for t in model.graph.initializer)
    return int(min(MAX_STAGES, max(1, math.ceil(total / max(budget, STAGE_MIN_BYTES)))))


def split_stages(model: onnx.ModelProto, n: int, sizes: dict | None = None) -> list[Stage]:
    """Cut the graph into `n` stages of about equal weight bytes. Each cut is placed, among the positions
    near its target, where the fewest activation bytes cross it (`sizes`: tensor name -> bytes)."""
    nodes = _toposort(model.graph.node)
    inits = {t.name: io.tensor_bytes(t) for t in model.graph.initializer}
    w = np.array([sum(inits.get(i, 0) for i in set(nd.input)) for nd in nodes], dtype=np.float64)
    n = max(1, min(n, len(nodes)))
    cuts = [0]
    if n > 1:
        cum = np.cumsum(w)
        live = _live_bytes(model, nodes, sizes or {})
        for j in range(1, n):
            target = cum[-1] * j / n
            slack = cum[-1] / n * 0.15
            cand = [p for p in range(cuts[-1] + 1, len(nodes)) if abs(cum[p - 1] - target) <= slack]
            if not cand:
                cand = [int(np.searchsorted(cum, target)) + 1]
            p = min(cand, key=lambda p: (live[p], abs(cum[p - 1] - target)))
            if cuts[-1] < p < len(nodes):
                cuts.append(p)
    cuts.append(len(nodes))
    graph_inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
    later_use = {}  # tensor -> last stage that reads it
    stage_of_node = []
    for si in range(len(cuts) - 1):
        stage_of_node += [si] * (cuts[si + 1] - cuts[si])
    for nd, si in zip(nodes, stage_of_node):
        for i in _reads(nd):
            later_use[i] = max(later_use.get(i, -1), si)
    plan = []
    for si in range(len(cuts) - 1):
        part = nodes[cuts[si]:cuts[si + 1]]
        produces = {o for nd in part for o in nd.output if o}
        reads = []
        for nd in part:
            for i in _reads(nd):
                if i not in produces and i not in inits and i not in reads:
                    reads.append(i)
        outs = [o for o in sorted(produces) if later_use.get(o, -1) > si]
        wb = int(sum(inits.get(i, 0) for i in {i for nd in part for i in nd.input}))
        plan.append(Stage(part, [i for i in reads if i in graph_inputs] + [i for i in reads if i not in graph_inputs],
                          outs, wb, produces))
    return plan


def stage_index(plan: list[Stage]) -> dict[str, int]:
    """Tensor -> the stage that produces it, or else the first stage that reads it (initializers)."""
    where = {}
    for si, st in reversed(list(enumerate(plan))):
        for nd in st.nodes:
            where.update((i, si) for i in nd.input if i)
    for si, st in enumerate(plan):
        where.update((o, si) for o in st.produces)
    return where


def _reads(node) -> list[str]:
    return [i for i in node.input if i]


def _toposort(nodes) -> list:
    """Kahn's algorithm, keeping the given order where it is already valid (exporters emit module order)."""
    nodes = list(nodes)
    producer = {o: i for i, nd in enumerate(nodes) for o in nd.output if o}
    deps = [{producer[i] for i in _reads(nd) if i in producer and producer[i] != k} for k, nd in enumerate(nodes)]
    if all(all(d < k for d in ds) for k, ds in enumerate(deps)):
        return nodes
    users = [[] for _ in nodes]
    for k, ds in enumerate(deps):
        for d in ds:
            users[d].append(k)
    pending = [len(ds) for ds in deps]
    ready = [k for k, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users[k]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise OnnxoptError("the graph has a cycle; check the model with onnx.checker")
    return order


def _live_bytes(model, nodes, sizes: dict) -> np.ndarray:
    """live[p]: bytes of the tensors produced before node p and read at or after it (a cut before p)."""
    outputs = {vi.name for vi in model.graph.output}
    default = max(sizes.values(), default=4)
    made, last = {}, {}
    for k, nd in enumerate(nodes):
        for i in _reads(nd):
            last[i] = k
        for o in nd.output:
            if o:
                made[o] = k
    diff = np.zeros(len(nodes) + 2)
    for t, a in made.items():
        b = len(nodes) if t in outputs else last.get(t)
        if b is None or b <= a:
            continue
        diff[a + 1] += sizes.get(t, default)
        diff[b + 1] -= sizes.get(t, default)
    return np.cumsum(diff)


def _tensor_names(model) -> list[str]:
    return [o for nd in model.graph.node for o in nd.output if o]


def _stage_model(model: onnx.ModelProto, st: Stage, outputs: Sequence[str], after: dict, cache: "_BoundaryCache") -> onnx.ModelProto:
    """The sub-model of one stage: its nodes (plus reductions), the initializers they read, its inputs
    (typed from the model or from the cached arrays of the first batch) and `outputs`."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.name = model.graph.name
    m.graph.node.extend(st.nodes)
    used = {i for nd in st.nodes for i in nd.input}
    m.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    known = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    graph_inputs = {vi.name: vi for vi in model.graph.input}
    for name in st.inputs:
        if name in graph_inputs:
            m.graph.input.append(graph_inputs[name])
            continue
        # A tensor from an earlier stage: type and rank from its cached array, dims left free.
        a = cache.peek(name)
        m.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim))
    m.graph.value_info.extend(vi for n, vi in known.items() if n in st.produces and n not in outputs)
    out = outputs or [o.name for o in model.graph.output if o.name in st.produces] or [st.nodes[-1].output[0]]
    return _with_outputs(m, out, after)


class _BoundaryCache:
    """Tensors that cross from one stage into a later one, one .npy per tensor and batch in a temporary
    directory, read back memory-mapped."""

    def __init__(self, enabled: bool):
        self.dir = None
        self.enabled = enabled
        self.index: dict[str, int] = {}
        self.bytes = 0

    def __enter__(self):
        if self.enabled:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-stages-")
            self.dir = Path(self._tmp.name)
        return self

    def __exit__(self, *exc):
        if self.dir is not None:
            log.info("stage boundaries took %.2f GB on disk", self.bytes / 1e9)
            self._tmp.cleanup()

    def _path(self, batch: int, name: str) -> Path:
        k = self.index.setdefault(name, len(self.index))
        return self.dir / f"{batch}_{k}.npy"

    def save(self, batch: int, arrays: dict) -> None:
        for name, a in arrays.items():
            np.save(self._path(batch, name), a)
            self.bytes += a.nbytes

    def load(self, batch: int, names: Sequence[str]) -> dict:
        return {n: np.load(self._path(batch, n), mmap_mode="r") for n in names}

    def peek(self, name: str) -> np.ndarray:
        return np.load(self._path(0, name), mmap_mode="r")


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = len(tt.shape.dim)
    return out


def _reduce_nodes(name: str, out: str, spec: PreReduce, rank: int | None, opset: int, batches: int = 1):
    """Nodes computing `spec` of tensor `name`, and their output names (what the reducer's update takes)."""
    src = name
    nodes = []
    if spec.absolute:
        nodes.append(helper.make_node("Abs", [name], [f"{out}_abs"], name=f"{out}_Abs"))
        src = f"{out}_abs"
    if spec.op == "TopK":
        return nodes + _topk_nodes(src, out, spec.fraction * batches), [out, f"{out}_n"]
    if spec.keep_axis is None:
        nodes.append(helper.make_node(spec.op, [src], [out], name=f"{out}_{spec.op}", keepdims=1))
        return nodes, [out]
    axes = [i for i in range(rank) if i != spec.keep_axis % rank]
    if opset >= 18:
        nodes.append(_const(f"{out}_axes", np.array(axes, np.int64)))
        nodes.append(helper.make_node(spec.op, [src, f"{out}_axes"], [out], name=f"{out}_{spec.op}", keepdims=1))
    else:
        nodes.append(helper.make_node(spec.op, [src], [out], name=f"{out}_{spec.op}", axes=axes, keepdims=1))
    return nodes, [out]


def _topk_nodes(src: str, out: str, scale: float) -> list:
    """The k = min(n, ceil(scale * n) + 2) largest of the flattened `src` (`top_k` in the graph), and n."""
    p = f"{out}_"
    mk = helper.make_node
    return [
        _const(p + "flat_shape", np.array([-1], np.int64)),
        mk("Reshape", [src, p + "flat_shape"], [p + "flat"], name=p + "Reshape"),
        mk("Size", [src], [f"{out}_n"], name=p + "Size"),
        mk("Cast", [f"{out}_n"], [p + "nd"], name=p + "Cast", to=onnx.TensorProto.DOUBLE),
        _const(p + "scale", np.array(scale, np.float64)),
        mk("Mul", [p + "nd", p + "scale"], [p + "kd"], name=p + "Mul"),
        mk("Ceil", [p + "kd"], [p + "kc"], name=p + "Ceil"),
        mk("Cast", [p + "kc"], [p + "ki"], name=p + "CastK", to=onnx.TensorProto.INT64),
        _const(p + "two", np.array(2, np.int64)),
        mk("Add", [p + "ki", p + "two"], [p + "k2"], name=p + "Add"),
        mk("Min", [p + "k2", f"{out}_n"], [p + "km"], name=p + "Min"),
        _const(p + "k_shape", np.array([1], np.int64)),
        mk("Reshape", [p + "km", p + "k_shape"], [p + "k"], name=p + "ReshapeK"),
        mk("TopK", [p + "flat", p + "k"], [out, p + "idx"], name=p + "TopK", axis=0, largest=1, sorted=0),
    ]


def _const(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name + "_value"))


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], after: dict | None = None) -> onnx.ModelProto:
    """`model` with extra graph outputs; `after` maps a tensor to nodes placed right after its producer, so
    that (with priority-based execution) each reduction runs, and its input is freed, as early as possible."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if after:
        nodes = []
        for n in m.graph.node:
            nodes.append(n)
            for o in n.output:
                nodes.extend(after.get(o, ()))
        placed = {o for n in m.graph.node for o in n.output}
        for name, extra in after.items():  # tensors without a producer node (initializers)
            if name not in placed:
                nodes.extend(extra)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


def collect_graph(graph, data: CalibData, reducers: dict[str, Sequence[Reducer]], **kwargs) -> None:
    """`collect` over an onnx-graphsurgeon graph (exported without touching lazy weights)."""
    import onnx_graphsurgeon as gs
    model = gs.export_onnx(graph, do_type_check=False)
    collect(model, data, reducers, **kwargs)
