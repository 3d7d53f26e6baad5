"""The collector: runs a model over calibration data with ONNX Runtime and feeds each named tensor to its reducers.

Every batch is reduced at once into running statistics, so memory does not grow with the number of samples;
most reductions run inside the graph. Models with more weights than the memory budget run in stages (see
`stages`). When the whole activations a reducer needs would exceed the budget in one batch, the tensors are
split into groups and each group gets its own pass.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .. import ort as ortx
from .. import progress as progress_
from ..errors import OnnxoptError
from .data import CalibData
from .reducers import NonFiniteActivation, PreReduce, Reducer
from .stages import BoundaryCache, stage_model, tensor_names, needed_only, split_stages, stage_count, stage_index
from ..settings import MEMORY_BUDGET_MB

log = logging.getLogger(__name__)


def _inferred(model: onnx.ModelProto, feed: dict) -> dict[str, tuple[int, int]]:
    """{tensor: (elements, bytes per element)} for one batch, from shape inference with its concrete shapes."""
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
    out = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if tt.elem_type and all(d > 0 for d in dims):
            out[vi.name] = (int(np.prod(dims)), np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize)
    return out


def estimate_bytes(model: onnx.ModelProto, feed: dict, names: Sequence[str], inferred: dict | None = None) -> dict[str, int]:
    """Activation sizes for one batch, from shape inference with the batch's concrete input shapes."""
    inferred = _inferred(model, feed) if inferred is None else inferred
    batch = max((int(np.prod(v.shape)) * v.itemsize for v in feed.values()), default=1)
    return {n: inferred[n][0] * inferred[n][1] if n in inferred else 4 * batch for n in names}


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
            provider: str = "cpu", memory_budget_mb: int = MEMORY_BUDGET_MB, progress: bool = True,
            desc: str = "calibrating", stages: int | None = None, only_needed: bool = False) -> None:
    """Run `model` over `data` and feed every batch of each named tensor to its reducers.

    Reducers with an in-graph reduction (max |x|, per-channel max |x|, per-channel mean, top |x|, histogram
    samples) get it added to the graph and fetch only its result, all in one pass. The others fetch whole tensors as extra graph
    outputs, split into groups so that one batch of one group stays within `memory_budget_mb`.
    Models whose weights exceed the budget run in `stages` (None: as many as the budget needs): each
    stage holds only its own weights, and the tensors that cross into later stages wait on disk.
    Graph inputs are taken from the feeds. `only_needed` runs just the nodes the named tensors depend on.
    """
    if not reducers:
        return
    if only_needed:
        model = needed_only(model, list(reducers))
    inputs = {vi.name for vi in model.graph.input}
    first = next(iter(data), None)
    if first is None:
        raise OnnxoptError(f"{data.describe}: no calibration samples")
    budget = memory_budget_mb * 2**20
    n_batches = len(data)
    inferred = _inferred(model, first)
    full, reduced, aux_nodes = _attach(model, reducers, inputs, n_batches, {n: e for n, (e, _) in inferred.items()})
    if stages is None:
        stages = stage_count(model, budget)
    fetch = [n for n in full if n not in inputs]
    # Bytes per tensor for one batch: to group fetched tensors under the budget and to place stage cuts.
    wanted = fetch + (tensor_names(model) if stages > 1 else [])
    sizes = estimate_bytes(model, first, wanted, inferred) if wanted else {}
    plan = split_stages(model, stages, sizes)
    where = stage_index(plan)
    # Per stage: the whole tensors it produces, in groups under the budget (one pass each).
    passes = []
    for si, st in enumerate(plan):
        mine = {n: sizes[n] for n in fetch if where.get(n, 0) == si}
        for gi, group in enumerate(_groups(mine, budget) or [[]]):
            passes.append((si, gi, group))
    if not fetch and not reduced:  # every tensor is a graph input: nothing to run
        passes = []
    if len(passes) > len(plan):
        log.info("calibrating %d whole tensors in %d passes to stay within %d MB", len(fetch), len(passes), memory_budget_mb)
    if len(plan) > 1:
        log.info("calibrating in %d stages of at most %.2f GB of weights (budget %d MB)", len(plan),
                 max(st.weight_bytes for st in plan) / 1e9, memory_budget_mb)
    bar = progress_.bar(total=n_batches * len(passes), desc=desc, unit="batch", enabled=progress)
    with BoundaryCache(len(plan) > 1) as cache:
        for si, gi, group in passes:
            st = plan[si]
            small = [(name, outs, r) for name, outs, r in reduced if gi == 0 and where.get(name, 0) == si]
            keep = st.outputs if gi == 0 else []
            aux = {n: v for n, v in aux_nodes.items() if gi == 0 and where.get(n, 0) == si}
            names = list(dict.fromkeys(list(group) + [o for _, outs, _ in small for o in outs] + keep))
            sess = ortx.session(stage_model(model, st, names, aux, cache), provider=provider, level="basic", lean=True)
            if not names:
                names = [sess.get_outputs()[0].name]
            for bi, feed in enumerate(data):
                feed = {k: v for k, v in feed.items() if k in st.inputs}
                feed.update(cache.load(bi, [n for n in st.inputs if n not in feed]))
                got = _run(sess, names, feed, data, bi)
                try:
                    for name in group:
                        for r in full[name]:
                            r.update(got[name])
                    for name, outs, r in small:
                        r.update(*(got[o] for o in outs))
                except NonFiniteActivation:
                    raise OnnxoptError(f"tensor '{name}' holds inf or NaN on calibration batch {bi} of {data.describe} "
                                       "although the inputs are finite (the FP32 model overflows there); calibrate "
                                       "on other data or --exclude the layers that read it") from None
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


def _attach(model: onnx.ModelProto, reducers: dict, inputs: set, n_batches: int, elements: dict):
    """Split reducers into those fed whole tensors ({name: [reducer]}) and those fed an in-graph reduction
    ([(name, reduction outputs, reducer)], with {name: reduction nodes} to place after each producer).
    Histograms of tensors known (`elements`: counts of the first batch) to be at or below the sample cap
    take them whole, without sampling nodes."""
    ranks = _ranks(model)
    full: dict[str, list] = {}
    reduced, aux_nodes = [], {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for name, rs in reducers.items():
        for r in rs:
            r.start(n_batches)
            spec = r.pre_reduce
            rank = ranks.get(name) or (spec.rank if spec is not None else None)
            small = spec is not None and spec.op == "Sample" and 0 < elements.get(name, 0) <= spec.sample
            if name in inputs or spec is None or small or (spec.keep_axis is not None and rank is None):
                full.setdefault(name, []).append(r)
                continue
            nodes, outs = _reduce_nodes(name, f"{name}__calib{len(reduced)}", spec, rank, opset, n_batches)
            aux_nodes.setdefault(name, []).extend(nodes)
            reduced.append((name, outs, r))
    return full, reduced, aux_nodes


def _run(sess, names, feed, data, batch: int) -> dict:
    """One ORT run; a failure (token ids out of an embedding's range, say) becomes one error line."""
    try:
        return dict(zip(names, sess.run(names, feed)))
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        ranges = "; ".join(f"'{s.name}' accepts {s.values.describe()}" for s in getattr(data, "specs", ())
                           if s.values is not None and s.values.kind != "unknown")
        raise OnnxoptError(f"ONNX Runtime failed on calibration batch {batch} of {data.describe}: {' '.join(l.strip() for l in lines)[:400]}; "
                           f"check that the data fits the model's inputs" + (f" ({ranges})" if ranges else "")) from None


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
    if spec.op == "Sample":
        return nodes + _sample_nodes(src, out, spec.sample), [out, f"{out}_n", f"{out}_top"]
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


def _sample_nodes(src: str, out: str, cap: int) -> list:
    """Every p-th element of the flattened `src`, with n and the cap // 16 largest (unsorted); p = 1 (all
    elements, no tail) when n <= cap, else the smallest prime >= max(n / cap, 11): no aliasing with channel
    strides, whose factors are 2, 3, 5 and 7. p and the tail size come from small tables indexed by
    ceil(n / cap), since shape inference often leaves n unknown. Few nodes: ORT's allocation planner slows
    down sharply with thousands of extra nodes."""
    p = f"{out}_"
    mk = helper.make_node
    strides, tails = _tables(cap)
    return [
        _const(p + "flat_shape", np.array([-1], np.int64)),
        mk("Reshape", [src, p + "flat_shape"], [p + "flat"], name=p + "Reshape"),
        mk("Size", [src], [f"{out}_n"], name=p + "Size"),
        _const(p + "cap_m1", np.array([cap - 1], np.int64)),
        mk("Add", [f"{out}_n", p + "cap_m1"], [p + "n_up"], name=p + "Add"),
        _const(p + "cap", np.array([cap], np.int64)),
        mk("Div", [p + "n_up", p + "cap"], [p + "q_all"], name=p + "Div"),
        _const(p + "q_max", np.array([_STRIDES - 1], np.int64)),
        mk("Min", [p + "q_all", p + "q_max"], [p + "q"], name=p + "Min"),
        _const(p + "strides", strides),
        mk("Gather", [p + "strides", p + "q"], [p + "step"], name=p + "Step", axis=0),
        _const(p + "tails", tails),
        mk("Gather", [p + "tails", p + "q"], [p + "t"], name=p + "Tail", axis=0),
        mk("TopK", [p + "flat", p + "t"], [f"{out}_top", p + "top_idx"], name=p + "TopK", axis=0, largest=1, sorted=0),
        _const(p + "start", np.array([0], np.int64)),
        _const(p + "end", np.array([np.iinfo(np.int64).max], np.int64)),
        _const(p + "axis", np.array([0], np.int64)),
        mk("Slice", [p + "flat", p + "start", p + "end", p + "axis", p + "step"], [out], name=p + "Slice"),
    ]


_STRIDES = 1024  # stride table size: tensors up to 1023 * cap elements get a sample of at most cap


@functools.lru_cache(maxsize=4)
def _tables(cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Stride and tail size by ceil(n / cap) (see `_sample_nodes`)."""
    q = np.arange(_STRIDES)
    strides = np.array([1 if i <= 1 else _prime_at_least(max(i, 11)) for i in q], np.int64)
    return strides, np.where(q <= 1, 0, max(1, cap // 16)).astype(np.int64)


def _prime_at_least(n: int) -> int:
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


def _const(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name + "_value"))


def collect_graph(graph, data: CalibData, reducers: dict[str, Sequence[Reducer]], **kwargs) -> None:
    """`collect` over an onnx-graphsurgeon graph (exported without touching lazy weights)."""
    import onnx_graphsurgeon as gs
    model = gs.export_onnx(graph, do_type_check=False)
    collect(model, data, reducers, **kwargs)
