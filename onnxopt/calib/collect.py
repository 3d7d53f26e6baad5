"""The collector: runs a model over calibration data with ONNX Runtime and feeds each named tensor to its reducers.

Every batch is reduced at once into running statistics, so memory does not grow with the number of samples;
most reductions run inside the graph. Models with more weights than the memory budget run in stages (see
`stages`). When the whole activations a reducer needs would exceed the budget in one batch, the tensors are
split into groups and each group gets its own pass.
"""
from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .. import lazyscale
from .. import ort as ortx
from .. import progress as progress_
from ..errors import OnnxoptError
from .data import CalibData
from .reducers import DEVICE_SORT_K, NonFiniteActivation, PreReduce, Reducer
from .stages import BoundaryCache, stage_model, tensor_names, needed_only, split_stages, stage_count, stage_index
from ..settings import MEMORY_BUDGET_MB

log = logging.getLogger(__name__)


def _inferred(model: onnx.ModelProto, feed: dict) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """({tensor: (elements, bytes per element)} for one batch, {tensor: (ONNX element type, rank)}), from shape
    inference with the batch's concrete shapes (sizes only where every dimension is known)."""
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
    out, types = {}, {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        tt = vi.type.tensor_type
        if tt.elem_type and tt.HasField("shape"):
            types[vi.name] = (tt.elem_type, len(tt.shape.dim))
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if tt.elem_type and all(d > 0 for d in dims):
            out[vi.name] = (int(np.prod(dims)), np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize)
    return out, types


def estimate_bytes(model: onnx.ModelProto, feed: dict, names: Sequence[str], inferred: dict | None = None) -> dict[str, int]:
    """Activation sizes for one batch, from shape inference with the batch's concrete input shapes."""
    inferred = _inferred(model, feed)[0] if inferred is None else inferred
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
            desc: str = "calibrating", stages: int | None = None, only_needed: bool = False,
            prefetch: int | None = None) -> None:
    """Run `model` over `data` and feed every batch of each named tensor to its reducers.

    Reducers with an in-graph reduction (max |x|, per-channel max |x|, per-channel mean, top |x|, histogram
    counts) get it added to the graph and fetch only its result, all in one pass. The others fetch whole tensors as extra graph
    outputs, split into groups so that one batch of one group stays within `memory_budget_mb`.
    Models whose weights exceed the budget (on CUDA: `weight_budget`) run in `stages` (None: as many as it needs): each
    stage holds only its own weights, and the tensors that cross into later stages wait on disk.
    Graph inputs are taken from the feeds. `only_needed` runs just the nodes the named tensors depend on.
    `prefetch` (default: `SESSIONS_AHEAD` of the provider) sessions of the following stages (or groups) are built on
    threads while the current one runs, so up to 1 + prefetch sessions are alive at once; the runs, and so the
    statistics, are the same.
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
    inferred, types = _inferred(model, first)
    full, reduced, aux_nodes, feeds = _attach(model, reducers, inputs, n_batches)
    if stages is None:
        stages = stage_count(model, weight_budget(provider, budget))
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
    reruns = 0
    ahead = min(len(passes) - 1, SESSIONS_AHEAD.get(provider, 0) if prefetch is None else int(prefetch))
    graph_inputs = {vi.name for vi in model.graph.input}
    # Sessions typed from shape inference can be built before the stages they read from have run.
    typed = ahead > 0 and all(n in graph_inputs or n in types for st in plan for n in st.inputs)
    with BoundaryCache(len(plan) > 1) as cache, ThreadPoolExecutor(max(ahead, 1), thread_name_prefix="onnxopt-session") as pool:

        def prepare(k: int) -> _StagePass:
            """Pass k's session and what it fetches."""
            si, gi, group = passes[k]
            st = plan[si]
            small = [(name, outs, r) for name, outs, r in reduced if gi == 0 and where.get(name, 0) == si]
            keep = st.outputs if gi == 0 else []
            aux = {n: v for n, v in aux_nodes.items() if gi == 0 and where.get(n, 0) == si}
            mine = {id(r) for _, _, r in small}
            fed = [(f, r) for f, r in feeds if id(r) in mine]
            names = list(dict.fromkeys(list(group) + [o for _, outs, _ in small for o in outs] + keep))
            extra = [helper.make_tensor_value_info(f, onnx.TensorProto.FLOAT, []) for f, _ in fed]
            shared = _histogram_constants({r.pre_reduce.bins for _, r in fed}) if fed else []
            sess = ortx.session(stage_model(model, st, names, aux, cache, extra, shared, types if typed else None),
                                provider=provider, level="basic", lean=True, shared=True)
            return _StagePass(st, group, small, keep, fed, names or [sess.get_outputs()[0].name], sess)

        building: dict = {}  # pass index -> its session being built on a worker thread
        started = [0]        # passes before this one are built or being built

        def build_until(last: int) -> None:
            for j in range(started[0], min(last, len(passes) - 1) + 1):
                building[j] = pool.submit(contextvars.copy_context().run, prepare, j)  # ort.device_weights' context
            started[0] = max(started[0], last + 1)

        for k in range(len(passes)):
            if typed:
                build_until(k + ahead)
            cur = building.pop(k).result() if k in building else prepare(k)
            started[0] = max(started[0], k + 1)
            st, group, small, keep, fed, names, sess = (cur.stage, cur.group, cur.small, cur.keep, cur.fed,
                                                        cur.names, cur.session)
            del cur
            for bi, feed in enumerate(data):
                feed = {k_: v for k_, v in feed.items() if k_ in st.inputs}
                feed.update(cache.load(bi, [n for n in st.inputs if n not in feed]))
                feed.update((f, r.feed_scale()) for f, r in fed)
                got = _run(sess, names, feed, data, bi)
                try:
                    for name in group:
                        for r in full[name]:
                            r.update(got[name])
                    again, outputs = small, got
                    for _ in range(MAX_RUNS):  # histograms that set or grew their range: the batch runs again
                        if outputs is not got:
                            feed.update((f, r.feed_scale()) for f, r in fed)
                            outputs = _run(sess, [o for _, outs, _ in again for o in outs], feed, data, bi)
                            reruns += 1
                        pending = []
                        for name, outs, r in again:
                            if r.reduced(*(outputs[o] for o in outs)) is False:
                                pending.append((name, outs, r))
                        again, outputs = pending, None
                        if not again:
                            break
                    if again:
                        raise OnnxoptError(f"tensor '{again[0][0]}' changed its range on every one of {MAX_RUNS} runs of "
                                           f"calibration batch {bi}; calibrate with --provider cpu")
                except NonFiniteActivation:
                    raise OnnxoptError(f"tensor '{name}' holds inf or NaN on calibration batch {bi} of {data.describe} "
                                       "although the inputs are finite (the FP32 model overflows there); calibrate "
                                       "on other data or --exclude the layers that read it") from None
                if keep:
                    cache.save(bi, {n: got[n] for n in keep})
                del got, feed
                bar.update(1)
                if bi == 0 and ahead and not typed:
                    # batch 0's boundaries are saved: the next session can be typed and built while this one runs
                    build_until(k + 1)
            del sess
    if reruns:
        log.info("in-graph histograms ran %d of %d stage batches again to set or grow their ranges", reruns,
                 n_batches * len(plan))
    for name, rs in full.items():
        if name in inputs:
            for feed in data:
                for r in rs:
                    r.update(feed[name])
    bar.close()


# Sessions a staged pass builds ahead, on threads, while the current one runs (`collect(prefetch=N)`): on CUDA the
# weights of a session should live on the device, so set-ups could overlap the forwards. Off by default on every
# provider until the host RSS of two live CUDA sessions is measured at full size (tools/calib_sessions.py on the GPU
# machine): --memory-budget promises the host's memory, and it was measured only one session at a time.
SESSIONS_AHEAD: dict = {}


@dataclass
class _StagePass:
    """One pass of `collect` over one stage: its session and what it fetches and reduces."""
    stage: object
    group: list
    small: list
    keep: list
    fed: list
    names: list
    session: object


def weight_budget(provider: str, budget: int) -> int:
    """Bytes of weights one calibration session may hold: `budget` (--memory-budget, the host's) on every provider.
    A CUDA session may need no host copy of its weights (ORT copies them to the device a tensor at a time), which
    would allow one session for full-size SDXL instead of 3 stages; until tools/calib_sessions.py measures that
    session's host RSS on the GPU machine, CUDA keeps the budget that was measured (1.47 GiB peak for --fp8)."""
    del provider   # the same on every provider for now (see above)
    return budget


def _attach(model: onnx.ModelProto, reducers: dict, inputs: set, n_batches: int):
    """Split reducers into those fed whole tensors ({name: [reducer]}) and those fed an in-graph reduction
    ([(name, reduction outputs, reducer)], with {name: reduction nodes} to place after each producer and
    [(graph input, reducer)]: the values the host feeds those nodes before each batch). In-graph histograms
    need ScatterElements' reduction (opset 16); older models fetch those tensors whole."""
    ranks = _ranks(model)
    full: dict[str, list] = {}
    reduced, aux_nodes, feeds = [], {}, []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for name, rs in reducers.items():
        for r in rs:
            r.start(n_batches)
            spec = r.pre_reduce
            rank = ranks.get(name) or (spec.rank if spec is not None else None)
            if (name in inputs or spec is None or (spec.keep_axis is not None and rank is None)
                    or (spec.op == "Histogram" and opset < HISTOGRAM_OPSET)):
                full.setdefault(name, []).append(r)
                continue
            nodes, outs, fed = _reduce_nodes(name, f"{name}__calib{len(reduced)}", spec, rank, opset, n_batches)
            aux_nodes.setdefault(name, []).extend(nodes)
            reduced.append((name, outs, r))
            feeds.extend((f, r) for f in fed)
    return full, reduced, aux_nodes, feeds


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
    """Nodes computing `spec` of tensor `name`, their output names (what the reducer's `reduced` takes) and
    the graph inputs they read (fed by the host each batch)."""
    src = name
    nodes = []
    if spec.absolute:
        nodes.append(helper.make_node("Abs", [name], [f"{out}_abs"], name=f"{out}_Abs"))
        src = f"{out}_abs"
    if spec.op == "TopK":
        return nodes + _topk_nodes(src, out, spec.fraction * batches, spec.sorted), [out, f"{out}_n"], []
    if spec.op == "Histogram":
        return nodes + _histogram_nodes(src, out, spec.bins), [out, f"{out}_max"], [f"{out}_in"]
    if spec.keep_axis is None:
        nodes.append(helper.make_node(spec.op, [src], [out], name=f"{out}_{spec.op}", keepdims=1))
        return nodes, [out], []
    axes = [i for i in range(rank) if i != spec.keep_axis % rank]
    if opset >= 18:
        nodes.append(_const(f"{out}_axes", np.array(axes, np.int64)))
        nodes.append(helper.make_node(spec.op, [src, f"{out}_axes"], [out], name=f"{out}_{spec.op}", keepdims=1))
    else:
        nodes.append(helper.make_node(spec.op, [src], [out], name=f"{out}_{spec.op}", axes=axes, keepdims=1))
    return nodes, [out], []


def _topk_nodes(src: str, out: str, scale: float, device_sort: bool = False) -> list:
    """The k = min(n, ceil(scale * n) + 2) largest of the flattened `src` (`top_k` in the graph), and n;
    `device_sort`: k = min(n, max(that, DEVICE_SORT_K)), sorted (see TopAbs)."""
    p = f"{out}_"
    mk = helper.make_node
    k = [_const(p + "two", np.array(2, np.int64)), mk("Add", [p + "ki", p + "two"], [p + "k2"], name=p + "Add")]
    if device_sort:
        k += [_const(p + "kmin", np.array(DEVICE_SORT_K, np.int64)),
              mk("Max", [p + "k2", p + "kmin"], [p + "k3"], name=p + "Max")]
    return [
        _const(p + "flat_shape", np.array([-1], np.int64)),
        mk("Reshape", [src, p + "flat_shape"], [p + "flat"], name=p + "Reshape"),
        mk("Size", [src], [f"{out}_n"], name=p + "Size"),
        mk("Cast", [f"{out}_n"], [p + "nd"], name=p + "Cast", to=onnx.TensorProto.DOUBLE),
        _const(p + "scale", np.array(scale, np.float64)),
        mk("Mul", [p + "nd", p + "scale"], [p + "kd"], name=p + "Mul"),
        mk("Ceil", [p + "kd"], [p + "kc"], name=p + "Ceil"),
        mk("Cast", [p + "kc"], [p + "ki"], name=p + "CastK", to=onnx.TensorProto.INT64),
        *k,
        mk("Min", [p + ("k3" if device_sort else "k2"), f"{out}_n"], [p + "km"], name=p + "Min"),
        _const(p + "k_shape", np.array([1], np.int64)),
        mk("Reshape", [p + "km", p + "k_shape"], [p + "k"], name=p + "ReshapeK"),
        mk("TopK", [p + "flat", p + "k"], [out, p + "idx"], name=p + "TopK", axis=0, largest=1,
           sorted=int(device_sort)),
    ]


HISTOGRAM_OPSET = 16  # ScatterElements' reduction attribute
MAX_RUNS = 4  # runs of one batch while in-graph histograms set or grow their ranges (2 in practice)


def _histogram_nodes(src: str, out: str, bins: int) -> list:
    """Bin counts (float64, `out`) of the flattened |x| `src` and its max (`out`_max): bin of v =
    min(trunc(float32(v) * s), bins - 1), s the float32 the host feeds in `out`_in (Histogram.feed_scale).
    ScatterElements(reduction='add') counts; float64 keeps counts above 2^24 exact. Few nodes (10): ORT's
    priority-based session set-up grows about quadratically with the node count. NaN (the host raises on
    the max) casts to a negative index on the CPU: Max(., 0) keeps it inside."""
    p = f"{out}_"
    mk = helper.make_node
    return [
        mk("Reshape", [src, HIST_CONST + "flat"], [p + "flat0"], name=p + "Reshape"),
        mk("Cast", [p + "flat0"], [p + "flat"], name=p + "CastF", to=onnx.TensorProto.FLOAT),  # FP16/BF16 models
        mk("ReduceMax", [p + "flat"], [f"{out}_max"], name=p + "ReduceMax", keepdims=0),
        mk("Mul", [p + "flat", f"{out}_in"], [p + "xs"], name=p + "Mul"),
        mk("Min", [p + "xs", HIST_CONST + f"last{bins}"], [p + "xb"], name=p + "Min"),
        mk("Cast", [p + "xb"], [p + "i0"], name=p + "Cast", to=onnx.TensorProto.INT32),
        mk("Max", [p + "i0", HIST_CONST + "zero"], [p + "idx"], name=p + "Max"),
        mk("Shape", [p + "idx"], [p + "shape"], name=p + "Shape"),
        mk("ConstantOfShape", [p + "shape"], [p + "ones"], name=p + "Ones",
           value=numpy_helper.from_array(np.array([1.0]), p + "one")),
        mk("ScatterElements", [HIST_CONST + f"empty{bins}", p + "idx", p + "ones"], [out], name=p + "Scatter",
           axis=0, reduction="add"),
    ]


HIST_CONST = "__onnxopt_hist_"  # prefix of the constants all histograms of a stage share


def _histogram_constants(bins: set) -> list:
    """The shared initializers of `_histogram_nodes` for grids of `bins` bins."""
    t = [numpy_helper.from_array(np.array([-1], np.int64), HIST_CONST + "flat"),
         numpy_helper.from_array(np.array(0, np.int32), HIST_CONST + "zero")]
    for b in sorted(bins):
        t += [numpy_helper.from_array(np.array(b - 1, np.float32), HIST_CONST + f"last{b}"),
              numpy_helper.from_array(np.zeros(b), HIST_CONST + f"empty{b}")]
    return t


def _const(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name + "_value"))


def collect_graph(graph, data: CalibData, reducers: dict[str, Sequence[Reducer]], **kwargs) -> None:
    """`collect` over an onnx-graphsurgeon graph (exported without touching lazy weights; weights a fold scaled
    lazily are multiplied in the session's graph where `lazyscale.in_graph`, else computed once here)."""
    import onnx_graphsurgeon as gs
    if lazyscale.in_graph(kwargs.get("provider", "cpu")):
        with lazyscale.exported() as found:
            model = gs.export_onnx(graph, do_type_check=False)
        model = lazyscale.expand(model, found)
    else:
        lazyscale.compute_all(graph)
        model = gs.export_onnx(graph, do_type_check=False)
    collect(model, data, reducers, **kwargs)
