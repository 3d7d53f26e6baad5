"""N:M patterns and the weights they apply to: which initializer each Conv/ConvTranspose/MatMul/Gemm reads
(through Cast/Transpose/DequantizeLinear/Identity, `graph.weight_of`), along which axis its groups run, and the
values a DequantizeLinear gives back. Shared by the sparsify pass, SparseGPT and the 2:4 report."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from ..errors import OnnxoptError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- patterns
def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): at most N non-zeros in every M consecutive weights."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise OnnxoptError(f"bad sparsity pattern '{pattern}'; write N:M with 0 < N < M, e.g. 2:4")
    n, mm = int(m.group(1)), int(m.group(2))
    if (n, mm) != (2, 4):
        log.warning("pattern %d:%d: TensorRT's sparse tensor cores only accelerate 2:4", n, mm)
    return n, mm


def _nonzero(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":  # ml_dtypes (fp8, int4, bf16)
        a = a.astype(np.float32)
    return a != 0


def groups_ok(nonzero: np.ndarray, axis: int, n: int, m: int) -> bool:
    """Whether every group of `m` along `axis` has at most `n` non-zeros."""
    if nonzero.ndim == 0 or nonzero.shape[axis] % m:
        return False
    nz = np.moveaxis(nonzero, axis, -1)
    nz = nz.reshape(nz.shape[:-1] + (nz.shape[-1] // m, m))
    return bool((nz.sum(axis=-1) <= n).all())


def is_n_m(array: np.ndarray, axis: int, n: int = 2, m: int = 4) -> bool:
    """True when every group of `m` consecutive values along `axis` holds at most `n` non-zeros
    (False when the axis length is not a multiple of `m`)."""
    return groups_ok(_nonzero(array), axis, n, m)


def is_2_4(array: np.ndarray, axis: int) -> bool:
    """True when every group of 4 consecutive values along `axis` holds at least 2 zeros."""
    return is_n_m(array, axis, 2, 4)


def keep_mask(score: np.ndarray, axis: int, n: int = 2, m: int = 4) -> np.ndarray:
    """Boolean mask (True = keep) of the `n` largest scores in every group of `m` along `axis`."""
    s = np.moveaxis(np.asarray(score), axis, -1)
    shp = s.shape
    g = s.reshape(shp[:-1] + (shp[-1] // m, m))
    order = np.argsort(-g, axis=-1, kind="stable")
    keep = np.zeros(g.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(shp), -1, axis)


# ---------------------------------------------------------------- finding weights
@dataclass
class Use:
    """One layer reading a weight: the node, the pass-through chain and the constant's input-channel axis."""
    node: gs.Node
    chain: list  # pass-through nodes between the constant and the layer, nearest the layer first
    axis: int    # input-channel axis on the constant


@dataclass
class Unit:
    """One initializer and the layers that use it as their weight (pruned once)."""
    const: gs.Constant
    uses: list = field(default_factory=list)
    skip: str | None = None

    @property
    def axis(self) -> int:
        return self.uses[0].axis

    @property
    def dq(self) -> gs.Node | None:
        return next((p for p in self.uses[0].chain if p.op == "DequantizeLinear"), None)


def weight_layers(graph: gs.Graph):
    """(node, constant, chain, constant axis or None, reason) for each layer whose weight is an initializer."""
    for node in graph.nodes:
        if node.op not in G.WEIGHT_OPS or len(node.inputs) < 2:
            continue
        const, chain = G.weight_of(node.inputs[1])
        if const is None:
            continue
        yield (node, const, chain) + _axis_of(node, const, chain)


def _axis_of(node, const, chain) -> tuple[int | None, str | None]:
    rank = len(const.shape)
    need = {"Conv": 3, "ConvTranspose": 3, "Gemm": 2, "MatMul": 2}[node.op]
    if rank < need or (node.op == "Gemm" and rank != 2):
        return None, f"weight of rank {rank} has no input-channel axis for {node.op}"
    if sum(p.op == "DequantizeLinear" for p in chain) > 1:
        return None, "weight passes through several DequantizeLinear"
    if not any(p.op == "DequantizeLinear" for p in chain) and not _is_float_dtype(const.dtype):
        return None, f"weight dtype {const.dtype} is not floating point"
    axis = G.weight_input_channel_axis(node) % rank
    for p in chain:  # nearest the layer first: output axis i of a Transpose is its input axis perm[i]
        if p.op == "Transpose":
            perm = p.attrs.get("perm") or list(reversed(range(rank)))
            axis = int(perm[axis])
    return axis, None


def _is_float_dtype(dt) -> bool:
    try:
        return np.dtype(dt).kind == "f" or np.dtype(dt).name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
    except TypeError:
        return False


def other_uses(graph: gs.Graph, const: gs.Constant) -> list[str]:
    """Uses of `const` other than as the weight input of a Conv/ConvTranspose/MatMul/Gemm (through pass-throughs)."""
    outs = {id(t) for t in graph.outputs}
    stack, other = [const], []
    while stack:
        t = stack.pop()
        if id(t) in outs:
            other.append(f"graph output {t.name}")
        for n in t.outputs:
            if n.op in G.PASS_THROUGH and n.inputs and n.inputs[0] is t:
                stack.extend(n.outputs)
            elif n.op in G.WEIGHT_OPS and len(n.inputs) > 1 and n.inputs[1] is t and n.inputs[0] is not t:
                continue
            elif n.op != "Shape":
                other.append(f"{n.op} {n.name}")
    return other


# ---------------------------------------------------------------- values behind DequantizeLinear
def dq_parts(dq: gs.Node):
    """(scale, zero point) constants of a DequantizeLinear, or None if they are not constants."""
    scale = dq.inputs[1] if len(dq.inputs) > 1 else None
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if not isinstance(scale, gs.Constant) or (zp is not None and zp.name and not isinstance(zp, gs.Constant)):
        return None
    return scale, (zp if isinstance(zp, gs.Constant) else None)


def _broadcast_param(v: np.ndarray, shape, axis: int, block: int) -> np.ndarray:
    v = np.asarray(v)
    if v.size == 1:
        return np.broadcast_to(v.reshape(()), shape)
    if v.ndim == 1 and not block:  # per-axis
        s = [1] * len(shape)
        s[axis] = -1
        return np.broadcast_to(v.reshape(s), shape)
    rep = np.repeat(v, block, axis=axis)  # blockwise
    return rep[tuple(slice(0, d) for d in shape)]


def dq_fields(dq: gs.Node, q: np.ndarray):
    """Scale and zero point of a DequantizeLinear broadcast to its quantized input `q`."""
    scale, zp = dq_parts(dq)
    axis = int(dq.attrs.get("axis", 1)) % max(q.ndim, 1)
    block = int(dq.attrs.get("block_size", 0))
    s = _broadcast_param(scale.values, q.shape, axis, block).astype(np.float32)
    z = _broadcast_param(zp.values, q.shape, axis, block) if zp is not None else np.zeros(q.shape, dtype=q.dtype)
    return s, z


def effective_nonzero(const: gs.Constant, dq: gs.Node | None) -> np.ndarray:
    """Where the weight is non-zero as the layer sees it (after its DequantizeLinear's zero point)."""
    v = G.read_values(const)
    if dq is None or dq_parts(dq) is None or dq.inputs[0] is not const:
        return _nonzero(v)
    _, z = dq_fields(dq, v)
    return np.asarray(v).astype(np.float32) != np.asarray(z).astype(np.float32)
