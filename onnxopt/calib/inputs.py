"""What values an integer model input accepts, read from the graph: token ids that index an embedding table
(a Gather on a constant, possibly through Cast/Reshape/Unsqueeze or a constant offset) accept [0, rows);
inputs that only gate or mask (Mul, Where, a Cast to float, or a name with "mask") take 0/1; 8-bit inputs
(image bytes) take their whole range. Random
calibration data is drawn from these ranges, and real data is checked against them before any run."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that hand an integer tensor's values on unchanged (data input 0); Gather's data input counts too.
_VALUE_OPS = ("Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Slice", "Concat", "Tile",
              "Transpose", "Gather")
_MASK_OPS = ("Mul", "Where", "Not", "And", "Or", "Equal", "Greater", "Less")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BOOL)
_BYTES = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
_MAX_DEPTH = 12


@dataclass(frozen=True)
class IntRange:
    """Values [low, high) an integer input accepts. kind: "index" (an embedding's rows), "range" (the whole 8-bit
    range: image bytes), "mask" (0/1, mostly 1) or "unknown" (no range found: random data is refused)."""
    kind: str
    low: int = 0
    high: int = 2
    why: str = ""

    def describe(self) -> str:
        return f"[{self.low}, {self.high})" + (f" ({self.why})" if self.why else "")


def integer_ranges(model: onnx.ModelProto) -> dict[str, IntRange]:
    """IntRange of every integer graph input."""
    g = model.graph
    consts = _constants(g)
    users: dict[str, list] = {}
    for nd in g.node:
        for i, t in enumerate(nd.input):
            users.setdefault(t, []).append((nd, i))
    out = {}
    for vi in g.input:
        et = vi.type.tensor_type.elem_type
        if vi.name in consts or not et or et in _FLOAT_TYPES:
            continue
        gathers, others = _follow(vi.name, users, consts)
        if gathers:
            low = max(lo for lo, _, _ in gathers)
            high = min(hi for _, hi, _ in gathers)
            why = "indexes " + ", ".join(sorted({w for _, _, w in gathers}))
            out[vi.name] = IntRange("index", low, high, why) if low < high else IntRange("unknown", why="indexes tables whose ranges do not overlap")
        elif et in _BYTES and "mask" not in vi.name.lower():  # pixels and the like: every value is valid
            info = np.iinfo(helper.tensor_dtype_to_np_dtype(et))
            out[vi.name] = IntRange("range", int(info.min), int(info.max) + 1, "every 8-bit value")
        elif "mask" in vi.name.lower() or (others and all(_masks(nd, i) for nd, i in others)):
            out[vi.name] = IntRange("mask", 0, 2, "a mask")
        else:
            out[vi.name] = IntRange("unknown")
    return out


def _constants(g: onnx.GraphProto) -> dict[str, tuple]:
    """name -> (dims, small values or None) of initializers and Constant outputs (values only when tiny)."""
    out = {}
    for t in g.initializer:
        out[t.name] = (tuple(t.dims), _small(t))
    for nd in g.node:
        if nd.op_type == "Constant":
            a = next((a for a in nd.attribute if a.name == "value"), None)
            if a is not None:
                out[nd.output[0]] = (tuple(a.t.dims), _small(a.t))
    return out


def _small(t: onnx.TensorProto):
    if int(np.prod(t.dims)) > 16 or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(t)


def _table(name: str, producers: dict, consts: dict):
    """Dims of the constant table behind `name` (through Cast/Identity/DequantizeLinear), or None."""
    for _ in range(4):
        if name in consts:
            return consts[name][0]
        nd = producers.get(name)
        if nd is None or nd.op_type not in ("Cast", "Identity", "DequantizeLinear"):
            return None
        name = nd.input[0]
    return None


def _follow(name: str, users: dict, consts: dict):
    """Walk the value-preserving consumers of input `name`: ([(low, high, why) per Gather it indexes], [(node, index)
    of the first other consumers])."""
    producers = {}
    for nds in users.values():
        for nd, _ in nds:
            for o in nd.output:
                producers[o] = nd
    gathers, others, seen = [], [], set()
    stack = [(name, 0, 0)]  # (tensor, offset: the tensor holds input + offset, depth)
    while stack:
        t, off, depth = stack.pop()
        if (t, off) in seen or depth > _MAX_DEPTH:
            continue
        seen.add((t, off))
        for nd, i in users.get(t, ()):
            op = nd.op_type
            if op in ("Shape", "Size"):  # reads the shape only
                continue
            if op == "Gather" and i == 1:
                dims = _table(nd.input[0], producers, consts)
                axis = next((a.i for a in nd.attribute if a.name == "axis"), 0)
                if dims:
                    rows = int(dims[axis])
                    gathers.append((-off, rows - off, f"'{nd.input[0]}' ({rows} rows)"))
                    continue
            if (op in _VALUE_OPS and i == 0) or (op == "Concat") or (op == "Cast" and _to(nd) not in _FLOAT_TYPES):
                stack.append((nd.output[0], off, depth + 1))
                continue
            if op in ("Add", "Sub") and len(nd.input) == 2:
                c = consts.get(nd.input[1 - i], (None, None))[1]
                if c is not None and c.size == 1 and not (op == "Sub" and i == 1):
                    shift = int(c.reshape(())) * (1 if op == "Add" else -1)
                    stack.append((nd.output[0], off + shift, depth + 1))
                    continue
            others.append((nd, i))
    return gathers, others


def _to(nd) -> int:
    return next((a.i for a in nd.attribute if a.name == "to"), 0)


def _masks(nd, i) -> bool:
    return nd.op_type in _MASK_OPS or (nd.op_type == "Cast" and _to(nd) in _FLOAT_TYPES) or (nd.op_type == "Sub" and i == 1)
