"""Calibration data: model input specs, feeds read lazily from .npz/.npy files or generated."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import OnnxoptError
from .inputs import IntRange, integer_ranges


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints, or str / None for dynamic dims
    dtype: np.dtype
    values: IntRange | None = None  # integer inputs of a model: what they accept (None: not known, e.g. an engine's)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    ranges = integer_ranges(model)
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), ranges.get(vi.name)))
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


def check_shapes(specs: Sequence[InputSpec], shapes: dict) -> None:
    """--shapes entries name real inputs and keep their static dimensions."""
    names = [s.name for s in specs]
    for name, shp in shapes.items():
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            raise OnnxoptError(f"--shapes names input '{name}', which the model does not have; its inputs: {', '.join(names) or 'none'}")
        if len(shp) != len(spec.shape):
            raise OnnxoptError(f"--shapes {name}:{_fmt(shp)} has {len(shp)} dimensions, input '{name}' has {len(spec.shape)} "
                               f"(the model expects {_fmt(spec.shape)}); e.g. --shapes {name}:{_example(spec.shape)}")
        for i, (d, e) in enumerate(zip(shp, spec.shape)):
            if d <= 0 or (isinstance(e, int) and e > 0 and d != e):
                raise OnnxoptError(f"--shapes {name}:{_fmt(shp)}: dimension {i} must be "
                                   f"{e if isinstance(e, int) and e > 0 else 'a positive size'} (the model expects {name}:{_fmt(spec.shape)})")


def _example(shape) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in shape) or "1"


class CalibData:
    """An iterable of feed dicts. Sources are read lazily, one file at a time."""

    def __init__(self, specs: Sequence[InputSpec], sources: Sequence, batch_size: int = 1, limit: int | None = None,
                 describe: str = "data", max_batch: int | None = None):
        self.specs = list(specs)
        self.bad: dict[int, set[int]] = {}  # source index -> rows (samples) holding inf/NaN, left out when skipped
        self._sources = list(sources)  # callables returning {name: array with leading sample axis}
        self.batch_size = batch_size
        self.limit = limit
        self.describe = describe
        self.max_batch = max_batch  # split feeds along a dynamic batch axis (e.g. CFG pairs) to bound activations
        self._n = None

    # -- constructors
    @classmethod
    def from_path(cls, path, specs: Sequence[InputSpec], batch_size: int = 1, limit: int | None = None,
                  max_batch: int | None = None, skip_nonfinite: bool = False) -> "CalibData":
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
        data._scan_nonfinite(files if len(files) > 1 else None, skip_nonfinite)
        return data

    @classmethod
    def random(cls, specs: Sequence[InputSpec], n: int, seed: int = 0, shapes: dict | None = None,
               batch_size: int = 1, max_batch: int | None = None) -> "CalibData":
        shapes = shapes or {}
        check_shapes(specs, shapes)
        concrete = {}
        for s in specs:
            shp = shapes.get(s.name)
            if shp is None:
                if any(not isinstance(d, int) or d <= 0 for d in s.shape):
                    raise OnnxoptError(f"input '{s.name}' has dynamic shape {_fmt(s.shape)}; give its shape, e.g. "
                                       f"--shapes {s.name}:{_example(s.shape)}")
                shp = s.shape
            concrete[s.name] = tuple(shp)

        for s in specs:
            if s.dtype.kind in "iu" and s.values is not None and s.values.kind == "unknown":
                raise OnnxoptError(f"integer input '{s.name}': no valid range found for random values (it indexes no "
                                   f"embedding table and is no mask); calibrate on real data with --calib FILE")

        def gen():
            rng = np.random.default_rng(seed)
            out = {}
            for s in specs:
                shp = (n,) + concrete[s.name]
                if s.dtype.kind == "f":
                    out[s.name] = rng.standard_normal(shp).astype(s.dtype)
                elif s.dtype.kind == "b":
                    out[s.name] = np.ones(shp, dtype=s.dtype)
                else:
                    out[s.name] = _random_ints(rng, s, shp)
            return out

        return cls(specs, [gen], batch_size, None, describe=f"random(n={n}, seed={seed})", max_batch=max_batch)

    @property
    def skipped(self) -> int:
        """Samples left out because they hold inf or NaN (`skip_nonfinite`)."""
        return sum(len(rows) for rows in self.bad.values())

    def _scan_nonfinite(self, files, skip: bool) -> None:
        """Every file read once before any work: a float sample holding inf/NaN is an error naming the input
        and the sample, or (with `skip`) left out of every pass and counted in `skipped`."""
        for si, src in enumerate(self._sources):
            arrays = src()
            for s in self.specs:
                a = arrays.get(s.name)
                if a is None or a.dtype.kind != "f" or not a.size:
                    continue
                bad = ~np.isfinite(a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)).all(axis=1)
                rows = np.flatnonzero(bad)
                if rows.size and not skip:
                    where = f"{files[si]}: " if files else f"{self.describe}: "
                    kind = "NaN" if np.isnan(a[rows[0]]).any() else "inf"
                    raise OnnxoptError(f"{where}input '{s.name}' sample {int(rows[0])} holds {kind} "
                                       f"({rows.size} sample(s) in all); fix the data or pass --skip-nonfinite to leave them out")
                self.bad.setdefault(si, set()).update(int(r) for r in rows)
            del arrays
        if skip and self.skipped:
            total = sum(_rows(src(), self.specs) for src in self._sources)
            if self.skipped >= total:
                raise OnnxoptError(f"{self.describe}: every sample holds inf or NaN; nothing is left to calibrate on")

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
        _check_ranges(self.specs, arrays, self.describe)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        produced = 0
        for si, src in enumerate(self._sources):
            arrays = src()
            self._validate(arrays)
            for sample in self._split(arrays, self.bad.get(si, ())):
                if self.limit is not None and produced >= self.limit:
                    return
                produced += 1
                yield from self._chunks(sample)

    def _split(self, arrays: dict, bad=()) -> Iterator[dict]:
        # With a leading sample axis, each sample is a whole feed; otherwise chunk along the batch axis.
        spec = self.specs[0]
        a0 = arrays[spec.name]
        stacked = a0.ndim == len(spec.shape) + 1
        n = a0.shape[0]
        step = 1 if stacked else self.batch_size
        for i in range(0, n, step):
            if any(j in bad for j in range(i, i + step)):
                continue
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


def _rows(arrays: dict, specs) -> int:
    a = arrays.get(specs[0].name) if specs else None
    return 1 if a is None or not a.ndim else a.shape[0]


def _random_ints(rng, s: InputSpec, shape) -> np.ndarray:
    """Token ids from the embedding's rows; masks mostly 1 (a padded tail of 0s on the last axis); 0/1 when the
    model was not analysed."""
    r = s.values
    if r is not None and r.kind in ("index", "range"):
        return rng.integers(r.low, r.high, size=shape).astype(s.dtype)
    if r is not None and r.kind == "mask" and len(shape) > 1:
        keep = rng.integers(-(-shape[-1] // 2), shape[-1] + 1, size=shape[:-1] + (1,))
        return (np.arange(shape[-1]) < keep).astype(s.dtype)
    if r is not None and r.kind == "mask":
        return np.ones(shape, dtype=s.dtype)
    return rng.integers(0, 2, size=shape).astype(s.dtype)


def _check_ranges(specs, arrays: dict, describe: str) -> None:
    """Integer inputs that index an embedding must hold valid rows: ONNX Runtime would fail mid-run otherwise."""
    for s in specs:
        r = s.values
        a = arrays.get(s.name)
        if r is None or r.kind != "index" or a is None or not a.size or a.dtype.kind not in "iu":
            continue
        lo, hi = int(a.min()), int(a.max())
        if lo < r.low or hi >= r.high:
            raise OnnxoptError(f"{describe}: input '{s.name}' holds values in [{lo}, {hi}], the model accepts "
                               f"{r.describe()}; fix the calibration data")


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
