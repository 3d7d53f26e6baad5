"""Range-aware choice of the FP32 region for autocast.

Calibration measures max |x| of the float tensors that can grow (in-graph AbsMax reductions merged into the
quantization pass; ops that only move or bound values get derived ranges). From those ranges each node is
kept in FP32 when FP16/BF16 would overflow (its inputs or outputs exceed a safe fraction of the format's
range, or it squares/sums large values) or lose precision (cancellation: the rounding error of its inputs,
amplified by the op, is large next to its output's range; a budgeted share of nodes, worst first).
"""
from __future__ import annotations

import logging
import math

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper


from ..toposort import toposort
from .. import calib, formats
from ..graph import read_values

log = logging.getLogger(__name__)

_LOW = [formats.get(n) for n in formats.low_precision()]
FMAX = {f.name: f.qmax for f in _LOW}
# Unit roundoff of each format: the relative error of rounding one value.
UNIT = {f.name: f.extra["unit"] for f in _LOW}
SENTINEL = 1e30  # |x| this large is a mask value, not data
SAFE_FRACTION = 1 / 8  # headroom: calibration never sees the worst input
# Ops whose output range is at most their inputs' (data movement, selection, Q/DQ) or bounded by 1.
_PASS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "Concat", "Split",
         "Expand", "Tile", "Pad", "Relu", "MaxPool", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Cast",
         "Max", "Min", "Where", "Neg", "Abs", "Dropout", "ReduceMax", "ReduceMin", "Clip", "LeakyRelu", "AveragePool",
         "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"}
# x + c, x · c, x / c: bounded by |x| and the constant, no reduction needed.
_SCALED = {"Add", "Mul", "Div"}
_BOUNDED = {"Sigmoid", "Tanh", "Softmax", "LogSoftmax", "HardSigmoid", "Sin", "Cos", "Erf"}
_SQUARES = {"Pow", "ReduceSumSquare", "ReduceL2", "LayerNormalization", "GroupNormalization", "InstanceNormalization"}
_SUMS = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"}
# Ops whose FP16 error can be amplified by cancellation: y = a·x + b with |y| much smaller than |a·x|.
_CANCEL = {"Add", "Sub", "BatchNormalization"}
# A node may add 8 roundings of error (of its output range): more means cancellation or lost parameters.
CANCEL_ROUNDINGS = 8.0
CANCEL_BUDGET = 0.05          # at most this share of the graph's nodes is kept FP32 for precision alone


def _float_var(t) -> bool:
    return isinstance(t, gs.Variable) and t.name and t.dtype is not None and np.dtype(t.dtype) == np.float32


def range_reducers(graph: gs.Graph) -> dict[str, list]:
    """One AbsMax per float tensor whose range can grow: merge these into the calibration pass."""
    out: dict[str, list] = {}
    for node in graph.nodes:
        if node.op in _PASS or node.op in _BOUNDED or node.op in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        if node.op in _SCALED and _one_variable(node):
            continue  # bounded from its input and constant (tensor_ranges)
        if node.op == "Mul" and any(p.op in _BOUNDED for t in node.inputs for p in getattr(t, "inputs", [])):
            continue  # gates (x · sigmoid(x)): at most |x|
        for t in node.outputs:
            if _float_var(t):
                out.setdefault(t.name, []).append(calib.AbsMax())
    for t in graph.inputs:
        if _float_var(t):
            out.setdefault(t.name, []).append(calib.AbsMax())
    return out


def _one_variable(node) -> bool:
    return len(node.inputs) == 2 and sum(_const_values(t) is None for t in node.inputs) == 1


def _const_values(t) -> np.ndarray | None:
    """Values of a constant input: an initializer or a Constant node's output (small ones only)."""
    if isinstance(t, gs.Constant):
        return _small_float(t, 1 << 20)
    p = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return _small_float(p.attrs["value"], 1 << 20)
    return None


def ranges_of(reducers: dict[str, list]) -> dict[str, float]:
    """Measured max |x| per tensor from `range_reducers`' reducers after calibration."""
    return {n: float(next(r.value for r in rs if isinstance(r, calib.AbsMax))) for n, rs in reducers.items()}


def tensor_ranges(graph: gs.Graph, measured: dict[str, float]) -> dict[str, float]:
    """Measured ranges completed through pass-through ops, DQ scales and constants (graph order)."""
    r = dict(measured)

    def rng(t):
        if t is None or not t.name:
            return None
        v = _small_float(t, 4096) if t.name not in r and isinstance(t, gs.Constant) else None
        if v is not None:
            r[t.name] = float(np.max(np.abs(v))) if v.size else 0.0
        return r.get(t.name)

    for node in toposort(graph).nodes:
        if all(o.name in r for o in node.outputs):
            continue
        if node.op == "DequantizeLinear" and isinstance(node.inputs[1], gs.Constant):
            q = node.inputs[0]
            r[node.outputs[0].name] = float(np.max(np.abs(read_values(node.inputs[1])))) * _qmax(q.dtype)
            continue
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            v = _small_float(node.attrs["value"], 1 << 20)
            if v is not None:
                r[node.outputs[0].name] = float(np.max(np.abs(v))) if v.size else 0.0
            continue
        ins = [rng(t) for t in node.inputs if t is not None]
        known = [x for x in ins if x is not None]
        if node.op in _SCALED and len(ins) == 2 and len(known) == 2:
            val = _scaled(node, ins)
            if val is None:
                continue
        elif node.op in _BOUNDED:
            val = 1.0
        elif node.op in _PASS and known:
            val = max(known)
        else:
            continue
        for o in node.outputs:
            r.setdefault(o.name, val)
    return r


def _scaled(node, ins) -> float | None:
    a, b = ins
    if node.op == "Add":
        return a + b
    if node.op == "Mul":
        return a * b
    c = _const_values(node.inputs[1])  # Div: x / c is at most |x| / min |c|
    if c is None:
        return None
    low = float(np.min(np.abs(c))) if c.size else 0.0
    return a / low if low > 0 else None


def _qmax(dtype) -> float:
    """Largest |value| a DequantizeLinear's stored type holds (an ONNX enum or numpy dtype): its integer or float
    range; unknown types count as the widest registered format."""
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype)
        try:
            info = ml_dtypes.iinfo(dt)
            return float(max(-int(info.min), int(info.max)))
        except ValueError:
            return float(ml_dtypes.finfo(dt).max)
    except (TypeError, ValueError, KeyError):
        return max(max(-f.qmin, f.qmax) for f in map(formats.get, formats.names()) if f.quantized)


def plan_fp32(graph: gs.Graph, measured: dict[str, float], dtype: str, skip=frozenset()) -> dict[str, dict]:
    """Nodes to keep in FP32, by name: {"reason", "range"} each. `skip`: node ids already kept (shape path)."""
    if dtype not in FMAX:
        return {}
    safe = FMAX[dtype] * SAFE_FRACTION
    rng = tensor_ranges(graph, measured)
    keep: dict[str, dict] = {}
    cancel: list[tuple[float, str, float]] = []
    for node in graph.nodes:
        if id(node) in skip or node.op in ("DequantizeLinear", "Shape", "Size"):
            continue
        if node.op == "QuantizeLinear":  # its input must reach it unclipped: FP32 when FP16 would overflow
            x = _real([rng.get(node.inputs[0].name)])[0]
            if x is not None and x > safe:
                keep[node.name] = {"op": node.op, "reason": f"range {x:.4g} exceeds {safe:.4g}", "range": x}
            continue
        ins = _real([rng.get(t.name) for t in node.inputs if t is not None and t.name and not isinstance(t, gs.Constant)])
        outs = _real([rng.get(t.name) for t in node.outputs if t.name])
        hi = max([x for x in ins + outs if x is not None], default=None)
        in_hi = max([x for x in ins if x is not None], default=None)
        out_hi = max([x for x in outs if x is not None], default=None)
        if hi is None:
            continue
        if hi > safe:
            keep[node.name] = {"op": node.op, "reason": f"range {hi:.4g} exceeds {safe:.4g}", "range": hi}
        elif node.op in _SQUARES and in_hi is not None and in_hi ** 2 > safe:
            keep[node.name] = {"op": node.op, "reason": f"squares values up to {in_hi:.4g}", "range": in_hi}
        elif node.op in _SUMS and in_hi is not None and in_hi * _reduced_length(node) > safe:
            keep[node.name] = {"op": node.op, "reason": f"sums {_reduced_length(node)} values up to {in_hi:.4g}",
                               "range": in_hi}
        elif node.op == "Exp" and out_hi is not None and out_hi > safe ** 0.5:
            keep[node.name] = {"op": node.op, "reason": f"exponentiates to {out_hi:.4g}", "range": out_hi}
        elif node.op in _CANCEL and out_hi:
            err = _fp16_error(node, rng, out_hi, dtype)
            if err is not None and max(err) > CANCEL_ROUNDINGS * UNIT[dtype]:
                cancel.append((max(err), node, out_hi, err))
    # Precision: a budget of the worst nodes, not every node that crosses the tolerance.
    budget = max(1, int(CANCEL_BUDGET * len(graph.nodes)))
    for score, node, out_hi, (e_in, e_par) in sorted(cancel, key=lambda c: -c[0])[:budget]:
        why = "input rounding" if e_in >= e_par else "parameter rounding"
        info = {"op": node.op, "reason": f"precision: {dtype} {why} costs {score:.2g} of the output range",
                "range": out_hi, "relative_error": score}
        keep.setdefault(node.name, info)
        if e_in > CANCEL_ROUNDINGS * UNIT[dtype]:  # the rounding happens where the input is made: keep that producer too
            for p in _producers(node, skip):
                keep.setdefault(p.name, {**info, "op": p.op, "reason": info["reason"] + f" (feeds {node.name})"})
    if len(cancel) > budget:
        log.info("precision budget: %d of %d precision-sensitive nodes kept in FP32", budget, len(cancel))
    return keep


def _real(values: list) -> list:
    """Ranges without mask sentinels (finfo(float32).min and the like): autocast saturates those on
    purpose (softmax still gives 0), so they are no overflow."""
    return [None if v is not None and v >= SENTINEL else v for v in values]


def _producers(node, skip) -> list:
    """The nodes making `node`'s variable inputs, through value-preserving ops (Relu, Reshape...)."""
    out, todo = [], [t for t in node.inputs if isinstance(t, gs.Variable)]
    while todo:
        t = todo.pop()
        for p in t.inputs:
            if id(p) in skip or p.op in ("QuantizeLinear", "DequantizeLinear", "Cast"):
                continue
            out.append(p)
            if p.op in _PASS:
                todo += [x for x in p.inputs if isinstance(x, gs.Variable)]
    return out


def _fp16_error(node, rng: dict, out_hi: float, dtype: str) -> tuple[float, float] | None:
    """Relative error (of the output's range) that running `node` in `dtype` adds: from rounding its
    inputs (amplified when the output is much smaller than what the op subtracts), and from rounding
    its parameters (BatchNormalization: mean, variance, scale, shift in the format)."""
    u = UNIT[dtype]
    if node.op == "BatchNormalization":
        x = rng.get(node.inputs[0].name)
        consts = node.inputs[1:5]
        if x is None or not all(isinstance(c, gs.Constant) for c in consts):
            return None
        eps = node.attrs.get("epsilon", 1e-5)
        exact = [np.asarray(read_values(c), np.float64) for c in consts]
        low = formats.get(dtype).np_dtype
        rounded = [np.asarray(v).astype(low).astype(np.float64) for v in exact]

        def affine(s, b, m, v):
            with np.errstate(divide="ignore", invalid="ignore"):
                a = s / np.sqrt(v + eps)
            return a, b - m * a
        a, c = affine(*exact)
        a16, c16 = affine(*rounded)
        # y = a·x + c is affine in x: the largest error over |x| <= x is at one end.
        e_par = np.maximum(np.abs((a16 - a) * x + (c16 - c)), np.abs(-(a16 - a) * x + (c16 - c)))
        e_par = float(np.max(e_par)) if np.all(np.isfinite(e_par)) else float("inf")
        e_in = float(np.max(np.abs(a)) * x * u)
        return e_in / out_hi, e_par / out_hi
    ins = [_const_range(t) if isinstance(t, gs.Constant) else rng.get(t.name) for t in node.inputs if t is not None and t.name]
    if any(v is None for v in ins) or len(ins) != 2 or not math.isfinite(sum(ins)):
        return None
    return sum(ins) * u / out_hi, 0.0


def _reduced_length(node) -> int:
    shape = node.inputs[0].shape if node.inputs else None
    if not shape or any(not isinstance(d, int) for d in shape):
        return 1
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = read_values(node.inputs[1]).tolist()
    if axes is None:
        return int(np.prod(shape))
    return int(np.prod([shape[a] for a in np.atleast_1d(axes)]))


def _const_range(c: gs.Constant) -> float | None:
    v = _small_float(c, 1 << 20)
    return None if v is None else (float(np.max(np.abs(v))) if v.size else 0.0)


def _small_float(c: gs.Constant, limit: int) -> np.ndarray | None:
    """Values of a float constant of at most `limit` elements (read lazily, never for big weights)."""
    dt = helper.tensor_dtype_to_np_dtype(c.dtype) if isinstance(c.dtype, int) else c.dtype  # FP8 re-imported: an enum
    if dt is None or np.dtype(dt).kind != "f" or int(np.prod(c.shape or ())) > limit:
        return None
    return np.asarray(read_values(c), np.float64)
