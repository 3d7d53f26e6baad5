"""Autocast: everything that is not quantized runs in FP16 (or BF16), because TensorRT 10/11 networks
are strongly typed and take each layer's precision from its tensor types.

`to_low_precision` relabels float32 tensors of the data path, converts float32 constants, and inserts
Casts at the borders of FP32 islands (ops that must stay FP32, shape subgraphs) and at graph I/O.
`fp32_view` is the inverse for evaluation on CPUs: Q/DQ semantics are unchanged, only the FP16
rounding of unquantized ops is not simulated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from ..toposort import toposort
from .. import graph as G
from .. import formats, modelfile, threads
from . import precision, prescale
from .. import calib
from ..errors import OnnxoptError
from ..pass_protocol import PassBase, check_choice

log = logging.getLogger(__name__)

DTYPES = {n: formats.get(n).np_dtype for n in formats.high_precision()}
_ONNX = {n: formats.get(n).onnx_type for n in formats.high_precision()}
_FMAX = {formats.get(n).np_dtype: formats.get(n).qmax for n in formats.high_precision()}  # saturation of each type
_F32 = np.dtype(np.float32)
# Inputs that ONNX pins to float32 whatever the data type (op, input index).
_FIXED_FP32_INPUTS = {("Resize", 2), ("Upsample", 1)}
_SHAPE_SOURCES = ("Shape", "Size")
# Ops whose float attribute tensors follow the data type.
_DTYPE_ATTR_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike")


def _is_f32(t: gs.Tensor) -> bool:
    return _dtype(t) == _F32


def shape_nodes(graph: gs.Graph) -> set[int]:
    """Nodes that compute shapes: fed by Shape/Size (directly or through other shape nodes) and by
    nothing but constants otherwise. They stay untouched by quantization and autocast."""
    derived: set[str] = set()
    nodes: set[int] = set()
    for node in toposort(graph).nodes:  # toposort is stable and needed for the forward walk
        if node.op in _SHAPE_SOURCES:
            derived.update(o.name for o in node.outputs)
            nodes.add(id(node))
            continue
        var_inputs = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if var_inputs and all(t.name in derived for t in var_inputs):
            derived.update(o.name for o in node.outputs)
            nodes.add(id(node))
    return nodes


def to_low_precision(graph: gs.Graph, dtype: str = formats.FP16.name, *, ranges: dict | None = None, keep_fp32_ops=(),
                     keep_fp32_nodes=(), io_dtype: str | None = None) -> dict:
    """Convert the float32 data path of `graph` to `dtype` in place. Returns a small report.
    `ranges` (max |x| per tensor from calibration, see precision.range_reducers) keeps nodes that would
    overflow or lose precision in FP32; without it the ranges are not checked."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown precision {dtype}")
    if dtype == formats.FP32.name:
        return {"dtype": dtype, "casts": 0}
    low = DTYPES[dtype]
    plan = None
    if ranges is not None:  # tensors that only normalisations rescale: divided down into range, not kept FP32
        ranges, plan = prescale.rescale(graph, ranges, dtype)
        keep_fp32_nodes = tuple(keep_fp32_nodes) + tuple(plan.fp32_nodes)
    keep, chosen = _fp32_nodes(graph, dtype, ranges, keep_fp32_ops, keep_fp32_nodes)
    graph_inputs = {t.name for t in graph.inputs}
    names = {n.name for n in graph.nodes} | set(graph.tensors())
    unique = lambda base: G.unique_name(base, names)  # noqa: E731
    orig_outputs = {t.name: t.dtype for t in graph.outputs}
    _relabel(graph, keep, dtype)
    casts = _fix_edges(graph, keep, dtype, graph_inputs if io_dtype == dtype else set(), unique)

    # 3. Graph I/O keeps its dtype unless io_dtype says otherwise.
    for t in graph.inputs:
        if io_dtype == dtype and _is_f32(t):
            t.dtype = low
    casts += _restore_output_dtypes(graph, orig_outputs, io_dtype == dtype, unique)
    toposort(graph.cleanup())
    log.info("autocast to %s: %d casts, %d nodes kept in fp32 (%d by measured range)", dtype, casts, len(keep), len(chosen))
    for name, why in chosen.items():
        log.info("kept in fp32: %s (%s): %s", name, why["op"], why["reason"])
    total = max(1, len(graph.nodes))
    return {"dtype": dtype, "casts": casts, "fp32_nodes": len(keep), "ranges_checked": ranges is not None,
            "fp32_share": len(keep) / total, "range_fp32_share": len(chosen) / total, "kept_fp32": chosen,
            "prescaled_tensors": plan.tensors if plan else 0}


def _fp32_nodes(graph: gs.Graph, dtype: str, ranges, keep_fp32_ops, keep_fp32_nodes) -> tuple[set[int], dict]:
    """Ids of the nodes that stay FP32 (shape subgraphs, named ops/nodes, measured ranges, their DQ feeders), and
    the range-chosen ones with their reasons."""
    keep = shape_nodes(graph)
    named = {id(n) for n in graph.nodes if n.op in keep_fp32_ops or n.name in keep_fp32_nodes}
    keep |= named
    chosen = precision.plan_fp32(graph, ranges, dtype, skip=keep) if ranges is not None else {}
    keep |= _with_dq_feeders(graph, named | {id(n) for n in graph.nodes if n.name in chosen})
    return keep, chosen


def _relabel(graph: gs.Graph, keep: set[int], dtype: str) -> None:
    """Step 1: outputs of converted nodes and their dtype attributes become `dtype`."""
    low, low_onnx = DTYPES[dtype], _ONNX[dtype]
    for node in graph.nodes:
        if id(node) in keep:
            continue
        if node.op == "Cast" and node.attrs.get("to") == TensorProto.FLOAT:
            node.attrs["to"] = low_onnx
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            c = node.attrs["value"]
            if _is_f32(c):
                node.attrs["value"] = gs.Constant(c.name, _to_low(c.values, low))
        if node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant):
            c = node.attrs["value"]
            if _is_f32(c) and any(_is_f32(o) for o in node.outputs):
                node.attrs["value"] = gs.Constant(c.name, _to_low(c.values, low))
        if node.op in _DTYPE_ATTR_OPS and node.attrs.get("dtype", TensorProto.FLOAT) == TensorProto.FLOAT:
            node.attrs["dtype"] = low_onnx
        for o in node.outputs:
            if _is_f32(o):
                o.dtype = low


def _fix_edges(graph: gs.Graph, keep: set[int], dtype: str, low_inputs: set[str], unique) -> int:
    """Step 2: convert constants, cast variables whose type now differs from what the consumer runs in (graph
    inputs in `low_inputs` become low precision themselves). Returns the casts added."""
    low, low_onnx = DTYPES[dtype], _ONNX[dtype]
    converted: dict[tuple[str, str], gs.Tensor] = {}
    casts = 0
    nodes = list(graph.nodes)
    # The constants this loop converts, in the order it meets them: their values are converted ahead on worker
    # threads (numpy releases the GIL), and taken here in the same order (the graph does not depend on threads).
    todo, seen = [], set()
    for node in nodes:
        node_low = id(node) not in keep
        for i, t in enumerate(node.inputs):
            if (isinstance(t, gs.Constant) and t.name and node_low and (node.op, i) not in _FIXED_FP32_INPUTS
                    and _is_f32(t) and id(t) not in seen):
                seen.add(id(t))
                todo.append(t)
    nbytes = sum(4 * int(np.prod(c.shape)) for c in todo if c.shape is not None)
    ahead = threads.ordered_map(lambda c: (c, _to_low(G.read_values(c), low)), todo, threads.for_bytes(nbytes),
                                cost=lambda c: 3 * 4 * int(np.prod(c.shape)) if c.shape is not None else 0)  # read, clip, cast
    for node in nodes:
        node_low = id(node) not in keep
        for i, t in enumerate(node.inputs):
            if t is None or not t.name:
                continue
            fixed = (node.op, i) in _FIXED_FP32_INPUTS
            want = low if node_low and not fixed else _F32
            if isinstance(t, gs.Constant):
                if want == low and _is_f32(t):
                    node.inputs[i] = _low_constant(t, low, converted, ahead)
                continue
            have = _dtype(t)
            if have is None or have == want or not _is_floatish(have):
                continue
            if t.name in low_inputs and want == low:
                continue  # the graph input itself becomes low precision
            key = (t.name, str(want))
            if key not in converted:
                out = gs.Variable(unique(f"{t.name}_cast_{np.dtype(want).name}"), dtype=want, shape=t.shape)
                graph.nodes.append(gs.Node("Cast", name=unique(f"{t.name}_Cast_{np.dtype(want).name}"), inputs=[t], outputs=[out],
                                           attrs={"to": formats.FP32.onnx_type if want == _F32 else low_onnx}))
                converted[key] = out
                casts += 1
            node.inputs[i] = converted[key]
    return casts


def _restore_output_dtypes(graph: gs.Graph, orig_outputs: dict, low_io: bool, unique) -> int:
    """Graph outputs get back the dtype the user had (a Cast from the internal tensor). Returns the casts added."""
    casts = 0
    new_outputs = []
    for t in graph.outputs:
        orig = orig_outputs[t.name]
        if low_io or orig is None or _dtype(t) == np.dtype(orig):
            new_outputs.append(t)
            continue
        inner = gs.Variable(unique(f"{t.name}_{np.dtype(_dtype(t)).name}"), dtype=_dtype(t), shape=t.shape)
        for p in list(t.inputs):
            p.outputs[p.outputs.index(t)] = inner
        # An output that later nodes also read: they keep the internal precision, only the user sees `orig`.
        for c in list(t.outputs):
            for i, x in enumerate(c.inputs):
                if x is t:
                    c.inputs[i] = inner
        t.dtype = orig
        graph.nodes.append(gs.Node("Cast", name=unique(f"{t.name}_Cast_out"), inputs=[inner], outputs=[t], attrs={"to": helper.np_dtype_to_tensor_dtype(np.dtype(orig))}))
        casts += 1
        new_outputs.append(t)
    graph.outputs = new_outputs
    return casts


def _with_dq_feeders(graph: gs.Graph, ids: set[int]) -> set[int]:
    # A layer kept FP32 dequantizes straight to FP32 (no DQ -> Cast between it and its Q/DQ pair).
    out = set(ids)
    names = {n.name for n in graph.nodes} | set(graph.tensors())
    for node in list(graph.nodes):
        if id(node) in ids:
            for t in node.inputs:
                for p in list(getattr(t, "inputs", [])):
                    if p.op == "DequantizeLinear":
                        _split_dq(graph, p, ids, names)
                        out.add(id(p))
    return out


def _split_dq(graph: gs.Graph, dq: gs.Node, kept: set[int], names: set) -> None:
    """The low-precision readers of a DQ that also feeds an FP32-kept layer get their own copy of it, converted
    with them: through DQ(FP32 scale) -> Cast they would pair an FP32 activation scale with the weight's FP16
    one, which TensorRT-RTX rejects ("type mismatch between matmul operand scales": uniform FP8 tiny SDXL
    UNet with planted outliers, text states read by FP32 to_k and FP16 to_v)."""
    y = dq.outputs[0]
    low = [c for c in y.outputs if id(c) not in kept]
    if not low or y in graph.outputs:
        return
    y2 = gs.Variable(G.unique_name(f"{y.name}_low", names), dtype=y.dtype, shape=y.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", name=G.unique_name(f"{dq.name}_low", names), inputs=list(dq.inputs),
                               outputs=[y2], attrs=dict(dq.attrs)))
    for c in low:
        for i, x in enumerate(c.inputs):
            if x is y:
                c.inputs[i] = y2


def _dtype(t: gs.Tensor):
    if t.dtype is None:
        return None
    if isinstance(t.dtype, int):
        return np.dtype(helper.tensor_dtype_to_np_dtype(t.dtype))
    return np.dtype(t.dtype)


def _is_floatish(dt) -> bool:
    return dt in _FMAX or dt == np.dtype(np.float64)


def _to_low(values: np.ndarray, low: np.dtype) -> np.ndarray:
    # Saturate instead of overflowing to inf: masks like finfo(float32).min must stay finite.
    fmax = _FMAX[np.dtype(low)]
    return np.asarray(np.clip(np.asarray(values), -fmax, fmax).astype(low))


def _low_constant(c: gs.Constant, low, cache, ahead) -> gs.Constant:
    # One converted copy per constant, shared by all low-precision consumers; the FP32 original
    # stays only if an FP32 island still reads it (cleanup drops it otherwise).
    key = (id(c), "const")  # not the name: it changes below, and a second reader must find this copy
    if key not in cache:
        src, values = next(ahead)  # converted ahead, in the order this is called
        assert src is c
        name = c.name
        c.name = f"{name}_fp32"
        cache[key] = modelfile.constant(name, values)  # spilled in quantize()/convert()
    return cache[key]


# ---------------------------------------------------------------- FP32 view for evaluation
_CAST_WEIGHT_MIN = 1 << 18  # elements: bigger weights stay low precision behind a Cast in fp32_view(cast_weights)


def fp32_view(model: onnx.ModelProto, *, cast_weights: bool = False) -> onnx.ModelProto:
    """Copy of `model` with FP16/BF16 tensors, casts and I/O in FP32, for ORT's CPU provider.
    `cast_weights`: the main graph's FP16/BF16 initializers stay as they are behind a Cast to FP32
    (exact, and no FP32 copy of the weights in memory)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    lows = tuple(t for n, t in _ONNX.items() if n != formats.FP32.name)
    if cast_weights:
        casts = []
        for t in m.graph.initializer:
            if t.data_type in lows and int(np.prod(t.dims)) >= _CAST_WEIGHT_MIN:  # small ones: converted below
                name = t.name
                t.name = f"{name}__low"
                casts.append(helper.make_node("Cast", [t.name], [name], name=f"{name}__to_fp32", to=TensorProto.FLOAT))
        nodes = casts + list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(nodes)

    def fix_tensor(t):
        if t.data_type in lows:
            arr = modelfile.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def walk(g):
        for t in g.initializer:
            if not (cast_weights and g is m.graph and t.name.endswith("__low")):
                fix_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type in lows:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i in lows:
                    a.i = TensorProto.FLOAT
                elif a.name == "dtype" and a.i in lows:
                    a.i = TensorProto.FLOAT
                elif a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(m.graph)
    return m




def reconverter(model: onnx.ModelProto, dtype: str, *, io_dtype=None, keep_fp32_ops=(), ranges=None, opset=None,
                keep_fp32_nodes=()):
    """For the finite repair (finite.ensure_finite): `model` (the graph before autocast) converted again
    with more nodes kept in FP32."""
    def run(extra_fp32: set[str]) -> onnx.ModelProto:
        g = modelfile.import_graph(model)
        to_low_precision(g, dtype, io_dtype=io_dtype, keep_fp32_ops=keep_fp32_ops, ranges=ranges,
                         keep_fp32_nodes=tuple(keep_fp32_nodes) + tuple(extra_fp32))
        return modelfile.export_graph(g, opset=opset)
    return run


# The pass: autocast's options as a recipe step (onnxopt.pass_protocol.Pass).
IO_DTYPES = formats.low_precision()
GENERATED_SAMPLES = 2  # when no data is given: enough to find the overflows that the weights alone cause


@dataclass
class Autocast(PassBase):
    dtype: str = formats.FP16.name     # one of formats.high_precision() ("fp32": leave everything in FP32)
    io_dtype: str | None = None        # also convert graph inputs/outputs; None keeps them
    keep_fp32_ops: tuple = ()          # op types left in FP32
    keep_fp32_nodes: tuple = ()        # node names left in FP32
    measure_ranges: bool = True        # keep FP32 where measured ranges overflow or lose precision in `dtype`
    name = "autocast"

    def __post_init__(self):
        check_choice(self.dtype, tuple(DTYPES), "precision")
        if self.io_dtype is not None:
            check_choice(self.io_dtype, IO_DTYPES, "--io-dtype")
        self.keep_fp32_ops = (self.keep_fp32_ops,) if isinstance(self.keep_fp32_ops, str) else tuple(self.keep_fp32_ops)
        self.keep_fp32_nodes = (self.keep_fp32_nodes,) if isinstance(self.keep_fp32_nodes, str) else tuple(self.keep_fp32_nodes)

    @property
    def min_opset(self) -> int:
        """The opset the graph needs in `dtype` (BF16 Conv: 22; FP16: any)."""
        return formats.get(self.dtype).min_opset

    @property
    def high_precision(self) -> str:
        """Scales of the quantization passes are rounded to what the rest of the graph runs in."""
        return self.dtype

    @property
    def wants_ranges(self) -> bool:
        return self.measure_ranges and self.dtype in formats.low_precision()

    def check_recipe(self, recipe, index: int) -> None:
        if index != len(recipe) - 1:
            raise OnnxoptError("Autocast must be the last pass: the passes before it work on the FP32 graph")

    def run(self, ctx) -> dict:
        ranges = self._ranges(ctx) if self.wants_ranges else None
        keep_nodes = self.keep_fp32_nodes + tuple(ctx.fp32_nodes)
        if ctx.reference is not None and ctx.checks_outputs:
            before = modelfile.export_graph(ctx.graph, opset=ctx.opset or None)  # lazy weights: no copy
            ctx.rebuild = reconverter(before, self.dtype, io_dtype=self.io_dtype, keep_fp32_ops=self.keep_fp32_ops,
                                               ranges=ranges, opset=ctx.opset or None, keep_fp32_nodes=keep_nodes)
        return to_low_precision(ctx.graph, self.dtype, io_dtype=self.io_dtype, keep_fp32_ops=self.keep_fp32_ops,
                                         keep_fp32_nodes=keep_nodes, ranges=ranges)

    def _ranges(self, ctx) -> dict | None:
        if ctx.range_reducers is not None:  # measured by the quantizing pass's calibration
            return precision.ranges_of(ctx.range_reducers)
        data = ctx.data
        if data is None and ctx.reference is not None:
            try:
                data = calib.CalibData.random(calib.input_specs(ctx.reference), GENERATED_SAMPLES)
                ctx.check_data = data
            except OnnxoptError as e:
                log.info("cannot generate samples (%s)", e)
        if data is None:
            log.warning("no calibration data (--calib, or --calib-random N with --shapes for dynamic inputs): "
                        "%s value ranges were not checked", self.dtype)
            return None
        reducers = precision.range_reducers(ctx.graph)
        try:
            calib.collect_graph(ctx.graph, data, reducers, provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb,
                                progress=ctx.progress, desc="measuring ranges")
        except OnnxoptError as e:
            if ctx.data is not None:
                raise
            log.warning("generated samples do not run (%s); pass --calib: %s value ranges were not checked", e, self.dtype)
            ctx.check_data = None
            return None
        return precision.ranges_of(reducers)
