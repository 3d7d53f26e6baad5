"""Weights scaled lazily: a fold (SmoothQuant's W ⊙ s) gives a big weight the values W ⊙ f, f a per-channel factor
and the product taken in float64 and rounded to W's type (`scaled`), without computing or writing them when folded.

- Read (`graph.read_values`: the writer, the fold's own weight maxima), the product is computed then.
- In the graph a calibration session is built from (`exported`, on CUDA), the product is computed by the session
  itself: Cast to float64, Mul by f, Cast back, the same IEEE operations as `scaled`, reading W from the model's
  own file; so a fold writes no new weight file and ORT copies the same bytes it would have read from one.
  (The weight and the factor are overridable initializers, so ORT's constant folding does not build the products,
  or the float64 copies, on the host when the session is made.)
- Exported any other way (a save, a check session), the values are computed and spilled once (`Scaled.tensor`).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from . import modelfile
from . import threads as threads_

SCALE_ROWS_BYTES = 4 << 20  # a weight of 4 such parts or more is scaled on worker threads, in parts of rows
LAZY_BYTES = modelfile.SPILL_BYTES  # smaller weights are scaled at once, in memory, as before
# Calibration sessions that compute folded products in their graph (else the products are computed as read).
# Meant for CUDA (no product on the host); none until a GPU run measures it (float64 Cast/Mul placement on the CUDA
# EP, host RSS). ONNXOPT_SCALE_IN_GRAPH=1 or 0 forces it on or off (a check of the in-graph form).
IN_GRAPH_PROVIDERS: tuple = ()

_EXPORTING: contextvars.ContextVar = contextvars.ContextVar("onnxopt_lazyscale", default=None)


def scaled(values: np.ndarray, f: np.ndarray, threads: int = 0) -> np.ndarray:
    """values * f (broadcast) as the float64 product rounded to values' type, computed in buffered chunks (no
    float64 copy of the weight), big weights in parts of rows on worker threads: elementwise, so the same bytes."""
    new = np.empty(values.shape, dtype=values.dtype)
    rows = values.shape[0] if values.ndim else 1
    step = max(1, SCALE_ROWS_BYTES // max(1, values.nbytes // max(rows, 1)))
    n = threads if threads > 0 else (threads_.count(0) if values.nbytes >= 4 * SCALE_ROWS_BYTES else 1)
    if values.ndim == 0 or n <= 1 or rows <= step:
        np.multiply(values, f, out=new, dtype=np.float64, casting="unsafe")
        return new
    fb = np.broadcast_to(f, values.shape)

    def part(i: int) -> None:
        np.multiply(values[i:i + step], fb[i:i + step], out=new[i:i + step], dtype=np.float64, casting="unsafe")
    for _ in threads_.ordered_map(part, range(0, rows, step), n):
        pass
    return new


class Scaled(gs.ir.tensor.LazyValues):
    """Lazy values `source` ⊙ `factor` (a float64 array of the source's rank that broadcasts against it)."""

    def __init__(self, source, factor: np.ndarray, name: str):
        self.source = source
        self.factor = np.asarray(factor, dtype=np.float64)
        self.name = name
        self.shape = tuple(source.shape)
        self.dtype = source.dtype
        self.nbytes = getattr(source, "nbytes", int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize)
        self._made = None

    def load(self) -> np.ndarray:
        if self._made is not None:  # computed for a session already (compute_all): read back, not multiplied again
            return modelfile.to_array(self._made)
        src = self.source.load() if isinstance(self.source, gs.ir.tensor.LazyValues) else np.asarray(self.source)
        # parts on threads from the main thread only: a worker of another pool (the writer's) keeps to itself
        return scaled(src, self.factor, threads=0 if threading.current_thread() is threading.main_thread() else 1)

    def chain(self) -> tuple:
        """(the unscaled base values, [factors in the order they apply])."""
        factors, v = [], self
        while isinstance(v, Scaled):
            factors.append(v.factor)
            v = v.source
        return v, factors[::-1]

    @property
    def tensor(self) -> onnx.TensorProto:
        """What graphsurgeon exports: inside `exported` the base tensor (the session multiplies); else the
        product, computed and spilled once."""
        if _EXPORTING.get() is not None:
            base, _ = self.chain()
            t = onnx.TensorProto()
            t.CopyFrom(base.tensor if isinstance(base, gs.ir.tensor.LazyValues) else numpy_helper.from_array(np.asarray(base)))
            _EXPORTING.get().append((t, self))
            return t
        if self._made is None:
            self.keep(self.load())
        return self._made

    def keep(self, values: np.ndarray) -> None:
        """Take `values` (this product, computed elsewhere) as what `tensor` exports: spilled once."""
        v = modelfile.constant(self.name, values)._values
        self._made = v.tensor if isinstance(v, gs.ir.tensor.LazyValues) else numpy_helper.from_array(np.asarray(v), self.name)


def scale(const: gs.Constant, factor: np.ndarray) -> bool:
    """Give a big lazy constant the values `const` ⊙ `factor` lazily; False (nothing done) for constants in memory or
    under LAZY_BYTES, which the caller scales at once."""
    v = const._values
    if not isinstance(v, gs.ir.tensor.LazyValues) or v.nbytes < LAZY_BYTES:
        return False
    const._values = Scaled(v, factor, const.name)
    return True


def lazy_copy(name: str, const: gs.Constant, factor: np.ndarray) -> gs.Constant | None:
    """A new constant `name` holding `const` ⊙ `factor` lazily (None where `scale` would not apply)."""
    v = const._values
    if not isinstance(v, gs.ir.tensor.LazyValues) or v.nbytes < LAZY_BYTES:
        return None
    return gs.Constant(name, Scaled(v, factor, name))


def compute_all(graph: gs.Graph, threads: int = 0) -> int:
    """Compute the lazy products of `graph` an export would make one at a time on the main thread (SmoothQuant's
    folds, before the INT8 calibration session: 9 s of a full-size SDXL `--int8` run on an H100 host), several at
    once on worker threads, each product on one; spilled in graph order, so the bytes are the same. Returns the
    number computed."""
    todo = [t._values for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and isinstance(t._values, Scaled) and t._values._made is None]
    if len(todo) < 2:
        return 0
    n = threads_.for_bytes(sum(v.nbytes for v in todo), threads)
    # a product in flight holds its source and itself
    for v, values in zip(todo, threads_.ordered_map(Scaled.load, todo, n, cost=lambda v: 2 * v.nbytes)):
        v.keep(values)
    return len(todo)


def in_graph(provider: str) -> bool:
    """Whether calibration sessions on `provider` compute folded products in their graph."""
    forced = os.environ.get("ONNXOPT_SCALE_IN_GRAPH", "")
    return forced == "1" if forced in ("0", "1") else provider in IN_GRAPH_PROVIDERS


@contextlib.contextmanager
def exported():
    """Around a graphsurgeon export: lazy products export their base tensor; `expand` then adds the nodes."""
    found: list = []
    token = _EXPORTING.set(found)
    try:
        yield found
    finally:
        _EXPORTING.reset(token)


def expand(model: onnx.ModelProto, found: list) -> onnx.ModelProto:
    """Rewrite `model` (exported inside `exported`, which gave `found`) so that each lazy product is computed by
    the graph: base initializer `name__unscaled`, then per factor Cast(float64) -> Mul(factor) -> Cast(type), the
    factors overridable initializers (graph inputs), nodes just before the first reader."""
    if not found:
        return model
    g = model.graph
    by_name = {t.name: s for t, s in found}
    made: dict[str, list] = {}
    for t in g.initializer:
        s = by_name.get(t.name)
        if s is None:
            continue
        name = t.name
        t.name = f"{name}__unscaled"
        # overridable (a graph input too): ORT's constant folding would otherwise build every float64 copy on the host
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        _, factors = s.chain()
        nodes, src = [], t.name
        for k, f in enumerate(factors):
            fname = f"{name}__factor{k}"
            g.initializer.append(numpy_helper.from_array(f, fname))
            g.input.append(helper.make_tensor_value_info(fname, onnx.TensorProto.DOUBLE, list(f.shape)))
            out = name if k == len(factors) - 1 else f"{name}__scaled{k}"
            nodes += [helper.make_node("Cast", [src], [f"{out}__f64"], name=f"{out}__CastUp", to=onnx.TensorProto.DOUBLE),
                      helper.make_node("Mul", [f"{out}__f64", fname], [f"{out}__prod"], name=f"{out}__Mul"),
                      helper.make_node("Cast", [f"{out}__prod"], [out], name=f"{out}__CastDown", to=t.data_type)]
            src = out
        made[name] = nodes
    order = []
    for n in g.node:
        for i in n.input:
            order.extend(made.pop(i, ()))
        order.append(n)
    for nodes in made.values():  # read by no node (a graph output): at the end
        order.extend(nodes)
    del g.node[:]
    g.node.extend(order)
    return model
