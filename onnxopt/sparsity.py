"""N:M structured sparsity (2:4 for TensorRT's sparse tensor cores) of Conv/ConvTranspose/MatMul/Gemm weights.

TensorRT runs a layer on sparse tensor cores when every group of 4 consecutive weights along the input-channel
(reduction) axis holds at least 2 zeros. Two methods choose which weights go:
- magnitude: keep the 2 largest |w| of each group of 4;
- sparsegpt: SparseGPT (Frantar & Alistarh 2023). With H = XᵀX of the layer input (streamed from calibration
  data), choose the mask by w²/diag(H⁻¹)² per group and update the kept weights of each row with the
  optimal-brain-surgeon step, which minimises the layer-output error. Layers are pruned in stages in
  topological order, each stage calibrated on the graph whose earlier layers are already pruned; a stage holds
  only the Hessians of its own layers (under the memory budget).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from . import calib
from . import graph as G
from . import io
from .errors import OnnxoptError

log = logging.getLogger(__name__)

METHODS = ("magnitude", "sparsegpt")
_PASS_THROUGH = ("Cast", "Transpose", "DequantizeLinear", "Identity")
_CHUNK_BYTES = 64 * 2**20  # im2col rows are materialised in chunks of this size


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


def _groups_ok(nonzero: np.ndarray, axis: int, n: int, m: int) -> bool:
    if nonzero.ndim == 0 or nonzero.shape[axis] % m:
        return False
    nz = np.moveaxis(nonzero, axis, -1)
    nz = nz.reshape(nz.shape[:-1] + (nz.shape[-1] // m, m))
    return bool((nz.sum(axis=-1) <= n).all())


def is_n_m(array: np.ndarray, axis: int, n: int = 2, m: int = 4) -> bool:
    """True when every group of `m` consecutive values along `axis` holds at most `n` non-zeros
    (False when the axis length is not a multiple of `m`)."""
    return _groups_ok(_nonzero(array), axis, n, m)


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
class _Use:
    node: gs.Node
    chain: list  # pass-through nodes between the constant and the layer, nearest the layer first
    axis: int    # input-channel axis on the constant


@dataclass
class _Unit:
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


def _weight_layers(graph: gs.Graph):
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


def _other_uses(graph: gs.Graph, const: gs.Constant) -> list[str]:
    """Uses of `const` other than as the weight input of a Conv/ConvTranspose/MatMul/Gemm (through pass-throughs)."""
    outs = {id(t) for t in graph.outputs}
    stack, other = [const], []
    while stack:
        t = stack.pop()
        if id(t) in outs:
            other.append(f"graph output {t.name}")
        for n in t.outputs:
            if n.op in _PASS_THROUGH and n.inputs and n.inputs[0] is t:
                stack.extend(n.outputs)
            elif n.op in G.WEIGHT_OPS and len(n.inputs) > 1 and n.inputs[1] is t and n.inputs[0] is not t:
                continue
            elif n.op != "Shape":
                other.append(f"{n.op} {n.name}")
    return other


def _plan(graph, n, m, exclude, min_params):
    """Per-layer rows for the report and the units (initializers) to prune."""
    rows, units = {}, {}
    for node, const, chain, axis, reason in _weight_layers(graph):
        params = int(np.prod(const.shape))
        row = {"name": node.name, "op": node.op, "weight": const.name, "shape": [int(d) for d in const.shape],
               "axis": axis, "params": params, "status": "skipped", "method": None, "reason": reason}
        rows[id(node)] = row
        if reason is None and const.shape[axis] % m:
            row["reason"] = f"input-channel axis has {const.shape[axis]} channels, not a multiple of {m}"
        if reason is None and any(r.search(node.name or "") for r in exclude):
            row["reason"] = "excluded by --exclude"
        unit = units.setdefault(id(const), _Unit(const))
        unit.uses.append(_Use(node, chain, axis))
    for unit in units.values():
        urows = [rows[id(u.node)] for u in unit.uses]
        bad = next((r for r in urows if r["reason"]), None)
        if bad is not None:
            unit.skip = bad["reason"] if len(urows) == 1 else f"shared initializer; layer {bad['name']}: {bad['reason']}"
        elif len({u.axis for u in unit.uses}) > 1:
            unit.skip = "shared initializer used along different input-channel axes"
        elif len({id(next((p for p in u.chain if p.op == "DequantizeLinear"), None)) for u in unit.uses}) > 1:
            unit.skip = "shared initializer behind different DequantizeLinear nodes"
        elif (other := _other_uses(graph, unit.const)):
            unit.skip = f"initializer also feeds {other[0]}"
        elif urows[0]["params"] < min_params:
            unit.skip = f"{urows[0]['params']} weights < min_params {min_params}: too small to gain"
        elif unit.dq is not None and _dq_parts(unit.dq) is None:
            unit.skip = "DequantizeLinear scale or zero point is not an initializer"
        elif unit.dq is not None and unit.dq.inputs[0] is not unit.const:
            unit.skip = "DequantizeLinear does not read the initializer directly"
        if unit.skip:
            for r in urows:
                r["reason"] = r["reason"] or unit.skip
    return rows, list(units.values())


# ---------------------------------------------------------------- values behind DequantizeLinear
def _dq_parts(dq: gs.Node):
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


def _dq_fields(dq: gs.Node, q: np.ndarray):
    scale, zp = _dq_parts(dq)
    axis = int(dq.attrs.get("axis", 1)) % max(q.ndim, 1)
    block = int(dq.attrs.get("block_size", 0))
    s = _broadcast_param(scale.values, q.shape, axis, block).astype(np.float32)
    z = _broadcast_param(zp.values, q.shape, axis, block) if zp is not None else np.zeros(q.shape, dtype=q.dtype)
    return s, z


def _peek(const: gs.Constant) -> np.ndarray:
    """Values of a constant without caching lazily loaded ones in the graph (memory stays bounded)."""
    lazy = const._values
    return lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else const.values


def _effective_nonzero(const: gs.Constant, dq: gs.Node | None) -> np.ndarray:
    v = _peek(const)
    if dq is None or _dq_parts(dq) is None or dq.inputs[0] is not const:
        return _nonzero(v)
    _, z = _dq_fields(dq, v)
    return np.asarray(v).astype(np.float32) != np.asarray(z).astype(np.float32)


# ---------------------------------------------------------------- magnitude
def _prune_magnitude(unit: _Unit, n: int, m: int) -> None:
    v = np.array(unit.const.values, copy=True)
    if unit.dq is not None:
        s, z = _dq_fields(unit.dq, v)
        score = np.abs(v.astype(np.float32) - np.asarray(z).astype(np.float32)) * np.abs(s)
        keep = keep_mask(score, unit.axis, n, m)
        v[~keep] = np.asarray(z)[~keep]  # the zero point dequantizes to exactly 0
    else:
        score = np.abs(v.astype(np.float32))
        keep = keep_mask(score, unit.axis, n, m)
        v[~keep] = 0
    io.set_values(unit.const, v)


# ---------------------------------------------------------------- SparseGPT
def sparsegpt_prune(W: np.ndarray, H: np.ndarray, n: int = 2, m: int = 4, damp: float = 0.01,
                    block: int = 128, bar=None, hinv: np.ndarray | None = None) -> np.ndarray:
    """SparseGPT on rows W[out, in] with H = XᵀX over the `in` axis; groups of `m` consecutive columns keep
    at most `n` non-zeros. `hinv`: the upper Cholesky factor of the damped H⁻¹ if already computed.
    Returns the pruned and updated weights (float64)."""
    W = np.array(W, dtype=np.float64, copy=True)
    cols = W.shape[1]
    W[:, np.diag(H) == 0] = 0.0  # inputs that are always zero: their weights do not matter
    Hinv = _hinv_upper(_undead(H), damp) if hinv is None else hinv
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = np.diag(Hinv1)
        mask1 = np.zeros(W1.shape, dtype=bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = W1[:, i:i + m] ** 2 / d[i:i + m] ** 2
                drop = np.argsort(score, axis=1, kind="stable")[:, :m - n]
                np.put_along_axis(mask1[:, i:i + m], drop, True, axis=1)
            w = W1[:, i]
            q = np.where(mask1[:, i], 0.0, w)
            err = (w - q) / d[i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if bar is not None:
            bar.update(i2 - i1)
    return W


def _undead(H: np.ndarray) -> np.ndarray:
    """H with a unit diagonal where an input is always zero (keeps it invertible)."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    return H


def _hinv_upper(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of the damped H⁻¹ (raising the damping until H is positive definite)."""
    mean = float(np.mean(np.diag(H)))
    idx = np.diag_indices_from(H)
    for k in range(6):
        Hd = H.copy()
        Hd[idx] += max(damp, 1e-8) * (10 ** k) * mean
        try:
            L = np.linalg.cholesky(Hd)
            Linv = np.linalg.inv(L)
            return np.linalg.cholesky(Linv.T @ Linv).T
        except np.linalg.LinAlgError:
            continue
    raise OnnxoptError("SparseGPT: the input covariance stays singular after damping; raise --damp or use --method magnitude")


def _output_errors(W: np.ndarray, pruned: list[np.ndarray], H: np.ndarray) -> list[float]:
    """Layer-output errors ||(W - Wp) X||² relative to ||W X||², from H = XᵀX (float32 is plenty for a report)."""
    D = np.concatenate([W] + [W - np.asarray(p, dtype=np.float64) for p in pruned]).astype(np.float32)
    e = np.sum((D @ H.astype(np.float32)) * D, axis=1).reshape(len(pruned) + 1, -1).sum(axis=1)
    return [float(x / e[0]) if e[0] > 0 else 0.0 for x in e[1:]]


@dataclass(frozen=True)
class _ConvView:
    kernel: tuple
    strides: tuple
    pads: tuple
    dilations: tuple
    auto_pad: str


@dataclass(frozen=True)
class _HKey:
    tensor: str
    dim: int
    conv: _ConvView | None = None
    trans: bool = False  # Gemm transA: the input is [K, M]


class Hessian(calib.Reducer):
    """Streaming H = XᵀX (float64) of a layer input seen as rows X[rows, in]: the last axis of a MatMul input,
    the im2col patches (kernel positions × channels, channels fastest) of a Conv input."""

    def __init__(self, key: _HKey):
        self.key = key
        self.H = np.zeros((key.dim, key.dim), dtype=np.float64)
        self.n = 0
        self._buf, self._buf_rows = [], 0  # small batches are gathered into one product (fewer BLAS calls)

    def update(self, x):
        for rows in self._rows(np.asarray(x)):
            self._buf.append(np.asarray(rows, dtype=np.float32))
            self._buf_rows += rows.shape[0]
            if self._buf_rows * self.key.dim * 4 >= _CHUNK_BYTES:
                self._flush()

    def _flush(self):
        if self._buf:
            rows = np.concatenate(self._buf) if len(self._buf) > 1 else np.ascontiguousarray(self._buf[0])
            self._buf, self._buf_rows = [], 0
            self.H += (rows.T @ rows).astype(np.float64)
            self.n += rows.shape[0]

    def _rows(self, x):
        k = self.key
        if k.conv is None:
            x = x.T if k.trans else x.reshape(-1, x.shape[-1])
            step = max(1, _CHUNK_BYTES // (4 * x.shape[1]))
            for i in range(0, x.shape[0], step):
                yield x[i:i + step]
            return
        yield from _im2col(x, k.conv, k.dim)

    @property
    def mean(self) -> np.ndarray:
        self._flush()
        return self.H / max(self.n, 1)


def _im2col(x: np.ndarray, c: _ConvView, dim: int):
    """Rows [positions, prod(kernel) * C] of a Conv input x [N, C, *spatial], in chunks."""
    nd = len(c.kernel)
    ext = [(k - 1) * d + 1 for k, d in zip(c.kernel, c.dilations)]
    sp = x.shape[2:]
    if c.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            out = -(-sp[i] // c.strides[i])
            total = max((out - 1) * c.strides[i] + ext[i] - sp[i], 0)
            small, big = total // 2, total - total // 2
            pads_b.append(big if c.auto_pad == "SAME_LOWER" else small)
            pads_e.append(small if c.auto_pad == "SAME_LOWER" else big)
    elif c.auto_pad == "VALID":
        pads_b = pads_e = [0] * nd
    else:
        pads_b, pads_e = list(c.pads[:nd]), list(c.pads[nd:])
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads_b, pads_e)))
    win = np.lib.stride_tricks.sliding_window_view(xp, ext, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in c.strides)
              + tuple(slice(None, None, d) for d in c.dilations)]  # [N, C, *out, *kernel]
    perm = (0,) + tuple(range(2, 2 + 2 * nd)) + (1,)                # [N, *out, *kernel, C]
    win = win.transpose(perm)
    per_row = dim * 4
    first = win.shape[1] if nd else 1
    rows_per_slice = int(np.prod(win.shape[2:2 + nd - 1])) if nd > 1 else 1
    step = max(1, _CHUNK_BYTES // max(per_row * rows_per_slice, 1))
    for b in range(win.shape[0]):
        for i in range(0, first, step):
            yield win[b, i:i + step].reshape(-1, dim)


def _rows_view(node: gs.Node, eff_shape: tuple, conv_ok: bool = True):
    """Index map from the layer's weight (as the layer sees it) to rows W[out, in] with the pruning groups
    as consecutive columns, or (None, reason)."""
    idx = np.arange(int(np.prod(eff_shape))).reshape(eff_shape)
    if node.op == "MatMul":
        if len(eff_shape) != 2:
            return None, "batched MatMul weight"
        return idx.T, None
    if node.op == "Gemm":
        return (idx if node.attrs.get("transB", 0) else idx.T), None
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return None, "grouped Conv"
        nd = len(eff_shape) - 2
        return idx.transpose((0,) + tuple(range(2, 2 + nd)) + (1,)).reshape(eff_shape[0], -1), None
    return None, f"{node.op} has no im2col view here"


def _effective_index(const_shape, chain) -> np.ndarray:
    """Flat constant positions laid out as the layer sees the weight (through the chain's Transposes)."""
    idx = np.arange(int(np.prod(const_shape))).reshape(const_shape)
    for p in reversed(chain):  # from the constant towards the layer
        if p.op == "Transpose":
            idx = idx.transpose(p.attrs.get("perm") or list(reversed(range(idx.ndim))))
    return idx


def _hkey(node: gs.Node, eff_shape: tuple) -> _HKey:
    x = node.inputs[0]
    if node.op == "Conv":
        nd = len(eff_shape) - 2
        kernel = tuple(int(k) for k in (node.attrs.get("kernel_shape") or eff_shape[2:]))
        view = _ConvView(kernel, tuple(node.attrs.get("strides") or [1] * nd), tuple(node.attrs.get("pads") or [0] * 2 * nd),
                         tuple(node.attrs.get("dilations") or [1] * nd), str(node.attrs.get("auto_pad", "NOTSET")))
        return _HKey(x.name, int(eff_shape[1] * np.prod(kernel)), view)
    if node.op == "Gemm":
        k = eff_shape[1] if node.attrs.get("transB", 0) else eff_shape[0]
        return _HKey(x.name, int(k), None, bool(node.attrs.get("transA", 0)))
    return _HKey(x.name, int(eff_shape[0]))


@dataclass
class _SGPlan:
    unit: _Unit
    keys: list        # one _HKey per use
    rows: np.ndarray  # [out, in] flat constant positions


def _sparsegpt_plan(unit: _Unit, hbudget: int):
    plans = []
    for use in unit.uses:
        if unit.dq is not None:
            return None, "quantized weight (behind DequantizeLinear)"
        if isinstance(use.node.inputs[0], gs.Constant):
            return None, "constant layer input"
        eff_idx = _effective_index(unit.const.shape, use.chain)
        rows, reason = _rows_view(use.node, eff_idx.shape)
        if rows is None:
            return None, reason
        plans.append((_hkey(use.node, eff_idx.shape), eff_idx.reshape(-1)[rows.reshape(-1)].reshape(rows.shape)))
    if any(not np.array_equal(r, plans[0][1]) for _, r in plans[1:]):
        return None, "shared initializer with different row layouts"
    dim = plans[0][1].shape[1]
    if 3 * 8 * dim * dim > hbudget:
        return None, f"Hessian of {dim}x{dim} exceeds the memory budget"
    return _SGPlan(unit, [k for k, _ in plans], plans[0][1]), None


def _stages(graph: gs.Graph, plans: list[_SGPlan], hbudget: int, sequential: bool):
    """Groups of units whose inputs do not depend on any other unit still to be pruned (topological order),
    each group's distinct Hessians within `hbudget` bytes."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    pending = sorted(plans, key=lambda p: min(order[id(u.node)] for u in p.unit.uses))
    while pending:
        if sequential:
            blocked = _downstream([u.node for p in pending for u in p.unit.uses])
            ready = [p for p in pending if not any(id(u.node.inputs[0]) in blocked for u in p.unit.uses)]
            ready = ready or pending[:1]  # a unit shared across depths waits on itself
        else:
            ready = list(pending)
        stage, keys, used = [], set(), 0
        for p in ready:
            new = {k for k in p.keys if k not in keys}
            need = sum(8 * k.dim * k.dim for k in new)
            if stage and used + need > hbudget:
                break
            stage.append(p)
            keys |= new
            used += need
        ids = {id(p) for p in stage}
        pending = [p for p in pending if id(p) not in ids]
        yield stage


def _downstream(nodes) -> set:
    seen_nodes, tensors = set(), set()
    stack = list(nodes)
    while stack:
        nd = stack.pop()
        if id(nd) in seen_nodes:
            continue
        seen_nodes.add(id(nd))
        for t in nd.outputs:
            if id(t) not in tensors:
                tensors.add(id(t))
                stack.extend(t.outputs)
    return tensors


class _Runner:
    """ONNX Runtime over the graph with its large initializers as graph inputs (bound without copies): each stage
    gets a session over just the nodes its layer inputs need, cheap to build, and sees the weights pruned so far."""

    _FEED_BYTES = 64 * 1024

    def __init__(self, graph: gs.Graph, plans: list[_SGPlan], provider: str):
        import onnxruntime as ort
        from onnx import helper

        self._ort = ort
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.consts = {p.unit.const.name: p.unit.const for p in plans}
        model = gs.export_onnx(graph, do_type_check=False)
        inputs = {vi.name for vi in model.graph.input}
        keep, self.values = [], {}
        for t in model.graph.initializer:
            if t.name in self.consts or io.tensor_bytes(t) >= self._FEED_BYTES:
                if t.name not in inputs:
                    model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
                if t.name not in self.consts:
                    self._set(t.name, io.to_array(t))
            else:
                keep.append(t)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        self.model = model
        self.producer = {o: i for i, nd in enumerate(model.graph.node) for o in nd.output}
        # Subgraphs (If/Loop) may read outer tensors that a backward walk over node inputs misses: keep all nodes.
        self.whole = any(a.type in (a.GRAPH, a.GRAPHS) for nd in model.graph.node for a in nd.attribute)
        self.refresh(self.consts)

    def _set(self, name, arr):
        arr = np.ascontiguousarray(arr)
        self.values[name] = (arr, self._ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0))

    def refresh(self, names) -> None:
        """Upload the current values of these weights (after a stage pruned them)."""
        for name in names:
            self._set(name, self.consts[name].values)

    def session(self, targets: list[str]):
        from onnx import helper

        from . import ort as ortx
        nodes = self.model.graph.node
        if self.whole:
            need = range(len(nodes))
        else:
            need, stack = set(), list(targets)
            while stack:
                i = self.producer.get(stack.pop())
                if i is not None and i not in need:
                    need.add(i)
                    stack.extend(nodes[i].input)
        sub = type(self.model)()
        sub.CopyFrom(self.model)
        del sub.graph.node[:]
        sub.graph.node.extend(nodes[i] for i in sorted(need))
        del sub.graph.output[:]
        sub.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in targets)
        return ortx.session(sub, provider=self.provider, level="basic")

    def run(self, sess, feed: dict, outputs: list[str]) -> list[np.ndarray]:
        b = sess.io_binding()
        for i in sess.get_inputs():
            if i.name in self.values:
                b.bind_ortvalue_input(i.name, self.values[i.name][1])
            else:
                b.bind_cpu_input(i.name, np.ascontiguousarray(feed[i.name]))
        for o in outputs:
            b.bind_output(o, "cpu")
        sess.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()


class _Batched:
    """Consecutive calibration feeds of equal shapes concatenated along the batch axis (fewer, larger runs),
    when every input's first axis is dynamic."""

    def __init__(self, data, max_bytes: int = 4 * 2**20, max_batch: int = 64):
        self.data = data
        dynamic = all(s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0) for s in data.specs)
        self.max_batch = max_batch if dynamic else 1
        self.max_bytes = max_bytes

    def __iter__(self):
        buf, size = [], 0
        for feed in self.data:
            nbytes = sum(v.nbytes for v in feed.values())
            if buf and (len(buf) >= self.max_batch or size + nbytes > self.max_bytes
                        or any(feed[k].shape[1:] != buf[0][k].shape[1:] for k in feed)):
                yield self._merge(buf)
                buf, size = [], 0
            buf.append(feed)
            size += nbytes
        if buf:
            yield self._merge(buf)

    @staticmethod
    def _merge(feeds):
        return feeds[0] if len(feeds) == 1 else {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def _run_sparsegpt(graph, plans, data, n, m, *, damp, block, provider, memory_budget_mb, progress, sequential, rows):
    budget = memory_budget_mb * 2**20
    stages = list(_stages(graph, plans, budget // 2, sequential))
    if not stages:
        return 0, 0
    peak = 0  # largest sum of Hessian bytes held at once (one stage)
    input_names = {t.name for t in graph.inputs}
    runner = _Runner(graph, plans, provider) if any(k.tensor not in input_names for p in plans for k in p.keys) else None
    batches = _Batched(data)
    n_batches = sum(1 for _ in batches)
    bar = tqdm(total=n_batches * len(stages), desc="sparsegpt calibration", unit="batch", disable=not progress, leave=False)
    for stage in stages:
        reducers: dict[_HKey, Hessian] = {}
        for p in stage:
            for k in p.keys:
                reducers.setdefault(k, Hessian(k))
        by_tensor: dict[str, list] = {}
        for k, r in reducers.items():
            by_tensor.setdefault(k.tensor, []).append(r)
        peak = max(peak, sum(r.H.nbytes for r in reducers.values()))
        fetch = [t for t in by_tensor if t not in input_names]
        sess = runner.session(fetch) if fetch else None
        for feed in batches:
            values = dict(zip(fetch, runner.run(sess, feed, fetch))) if fetch else {}
            for t, rs in by_tensor.items():
                x = values[t] if t in values else feed[t]
                for r in rs:
                    r.update(x)
            del values
            bar.update(1)
        del sess
        hinv = {}  # units that share their input (Q, K, V) share H and its inverse
        for p in stage:
            _apply_sparsegpt(p, [reducers[k] for k in p.keys], n, m, damp, block, progress, rows, hinv)
        if runner is not None:
            runner.refresh({p.unit.const.name for p in stage})
        del reducers, by_tensor
    bar.close()
    return len(stages), peak


def _apply_sparsegpt(p: _SGPlan, hs: list[Hessian], n, m, damp, block, progress, rows, cache: dict) -> None:
    unit = p.unit
    if any(h.n + h._buf_rows == 0 for h in hs):
        raise OnnxoptError(f"SparseGPT: no calibration rows reached layer {unit.uses[0].node.name}; check the calibration data")
    key = tuple(sorted({id(h) for h in hs}))
    if key not in cache:
        H = sum(h.mean for h in {id(h): h for h in hs}.values())
        cache[key] = (H, _hinv_upper(_undead(H), damp))
    H, Hinv = cache[key]
    v = np.asarray(unit.const.values)
    W = v.reshape(-1)[p.rows].astype(np.float64)
    name = unit.uses[0].node.name
    with tqdm(total=W.shape[1], desc=f"sparsegpt {name}"[-60:], unit="col", disable=not progress, leave=False) as bar:
        Wp = sparsegpt_prune(W, H, n, m, damp=damp, block=block, bar=bar, hinv=Hinv)
    out = np.array(v, copy=True).reshape(-1)
    out[p.rows.reshape(-1)] = Wp.reshape(-1).astype(v.dtype)
    out = out.reshape(v.shape)
    if not is_n_m(out, unit.axis, n, m):  # the rows view guarantees the groups; keep the output exact regardless
        log.warning("%s: SparseGPT result not %d:%d along axis %d; projecting by magnitude", name, n, m, unit.axis)
        out[~keep_mask(np.abs(out.astype(np.float32)), unit.axis, n, m)] = 0
    io.set_values(unit.const, out)
    mag = np.where(keep_mask(np.abs(W), 1, n, m), W, 0.0)
    err, err_mag = _output_errors(W, [out.reshape(-1)[p.rows], mag], H)
    for u in unit.uses:
        rows[id(u.node)].update(output_error=round(err, 6), output_error_magnitude=round(err_mag, 6))
    log.info("%s: relative output error %.4f (magnitude %.4f)", name, err, err_mag)


# ---------------------------------------------------------------- the pass
def sparsify(graph: gs.Graph, *, pattern: str = "2:4", method: str = "magnitude", data: calib.CalibData | None = None,
             exclude=(), min_params: int = 4096, damp: float = 0.01, block: int = 128, provider: str = "cpu",
             memory_budget_mb: int = 4096, progress: bool = True, sequential: bool = True) -> dict:
    """Prune the weights of Conv/ConvTranspose/MatMul/Gemm layers to N:M along their input-channel axis, in place.

    Weights are found through Cast/Transpose/DequantizeLinear/Identity; a shared initializer is pruned once.
    Layers are skipped (with the reason in the report) when the axis is not a multiple of M, the weight has
    fewer than `min_params` values, the node name matches an `exclude` regex, or the initializer has other uses.
    `method="sparsegpt"` needs `data`; layers it cannot treat (ConvTranspose, grouped Conv, quantized weights)
    fall back to magnitude, reported. `sequential` calibrates each stage on the already pruned graph.
    Returns a JSON-able report.
    """
    t0 = time.perf_counter()
    n, m = parse_pattern(pattern)
    if method not in METHODS:
        raise OnnxoptError(f"unknown sparsity method '{method}'; use one of {', '.join(METHODS)}")
    if damp < 0:
        raise OnnxoptError(f"--damp must be >= 0, got {damp}")
    if block <= 0 or block % m:
        raise OnnxoptError(f"--block must be a positive multiple of {m}, got {block}")
    if method == "sparsegpt" and data is None:
        raise OnnxoptError("--method sparsegpt needs calibration data; pass --calib (or use --method magnitude)")
    regexes = []
    for r in exclude or ():
        try:
            regexes.append(re.compile(r))
        except re.error as e:
            raise OnnxoptError(f"bad --exclude regex '{r}': {e}") from None
    graph.toposort()
    rows, units = _plan(graph, n, m, regexes, min_params)
    todo = []
    for unit in units:
        if unit.skip:
            continue
        if _groups_ok(_effective_nonzero(unit.const, unit.dq), unit.axis, n, m):
            unit.skip = f"already {n}:{m}"
            for u in unit.uses:
                rows[id(u.node)].update(status="already", reason=unit.skip)
            continue
        todo.append(unit)

    plans, n_stages, h_peak = [], 0, 0
    if method == "sparsegpt":
        hbudget = memory_budget_mb * 2**20 // 2
        for unit in todo:
            plan, reason = _sparsegpt_plan(unit, hbudget)
            if plan is None:
                for u in unit.uses:
                    rows[id(u.node)]["reason"] = f"magnitude fallback: {reason}"
                log.info("%s: SparseGPT not applicable (%s); pruning by magnitude", unit.uses[0].node.name, reason)
            else:
                plans.append(plan)
        n_stages, h_peak = _run_sparsegpt(graph, plans, data, n, m, damp=damp, block=block, provider=provider,
                                  memory_budget_mb=memory_budget_mb, progress=progress, sequential=sequential, rows=rows)
    planned = {id(p.unit) for p in plans}
    for unit in todo:
        if id(unit) not in planned:
            _prune_magnitude(unit, n, m)
        for u in unit.uses:
            rows[id(u.node)].update(status="pruned", method="sparsegpt" if id(unit) in planned else "magnitude")
    for r in rows.values():
        if r["status"] == "skipped":
            log.info("sparsity: skipped %s (%s)", r["name"], r["reason"])
    layers = list(rows.values())
    pruned = [r for r in layers if r["status"] == "pruned"]
    seen, total, sparse = set(), 0, 0
    for r in layers:
        if r["weight"] in seen:
            continue
        seen.add(r["weight"])
        total += r["params"]
        sparse += r["params"] if r["status"] in ("pruned", "already") else 0
    report = {"pattern": f"{n}:{m}", "method": method, "pruned": len(pruned),
              "skipped": sum(r["status"] == "skipped" for r in layers),
              "already": sum(r["status"] == "already" for r in layers),
              "weight_params": total, "sparse_params": sparse, "sparse_param_share": round(sparse / total, 4) if total else 0.0,
              "stages": n_stages, "hessian_peak_mb": round(h_peak / 2**20, 2), "seconds": round(time.perf_counter() - t0, 2), "layers": layers}
    log.info("sparsity %s (%s): pruned %d layers, skipped %d, %.1f%% of weight parameters sparse", report["pattern"],
             method, report["pruned"], report["skipped"], 100 * report["sparse_param_share"])
    return report


def sparsify_model(input_path, output_path, *, data: calib.CalibData | str | Path | None = None,
                   calib_limit: int | None = None, calib_random: int | None = None, shapes: dict | None = None,
                   seed: int = 0, provider: str = "cpu", memory_budget_mb: int = 4096, progress: bool = True,
                   **options) -> dict:
    """File-level `sparsify`: load, prune, save (the input stays untouched). `data` may be a CalibData or a path
    (.npz, .npy, directory of .npz); `calib_random` generates that many random samples instead. `options` are
    the Sparsify pass's (pattern, method, exclude, min_params, damp, block, sequential)."""
    from .passes import Sparsify  # the pipeline builds on this module; the file-level API builds on it
    from .pipeline import Runner
    runner = Runner([Sparsify(**options)], data=data, calib_random=calib_random, seed=seed, shapes=shapes,
                    calib_batches=calib_limit, provider=provider, memory_budget_mb=memory_budget_mb, progress=progress)
    return runner.run(input_path, output_path).report["sparsity"]


# ---------------------------------------------------------------- inspection
def report(graph: gs.Graph, pattern: str = "2:4", *, flops: bool = True) -> list[dict]:
    """Per layer with an initializer weight: name, op, weight, shape, axis, eligible (axis a multiple of M),
    is_2_4 (is_n_m for other patterns), params, flops (estimate from the graph's shapes, inferred when missing;
    symbolic dims count 1). `flops=False` skips shape inference (flops then count one output position)."""
    n, m = parse_pattern(pattern)
    shapes = _shapes(graph) if flops else {}
    out = []
    for node, const, chain, axis, reason in _weight_layers(graph):
        eligible = reason is None and const.shape[axis] % m == 0
        if reason is None and not eligible:
            reason = f"input-channel axis has {const.shape[axis]} channels, not a multiple of {m}"
        dq = next((p for p in chain if p.op == "DequantizeLinear"), None)
        ok = eligible and _groups_ok(_effective_nonzero(const, dq), axis, n, m)
        params = int(np.prod(const.shape))
        flops, exact = _flops(node, const.shape, shapes)
        out.append({"name": node.name, "op": node.op, "weight": const.name, "shape": [int(d) for d in const.shape],
                    "axis": axis, "eligible": eligible, "reason": reason, "is_2_4": ok, "params": params,
                    "flops": flops, "flops_exact": exact})
    return out


def summary(rows: list[dict]) -> dict:
    """Shares of weight parameters and FLOPs (over all weight layers) that sit in N:M-sparse layers."""
    params = sum(r["params"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    sp = sum(r["params"] for r in rows if r["is_2_4"])
    sf = sum(r["flops"] for r in rows if r["is_2_4"])
    return {"layers": len(rows), "eligible": sum(r["eligible"] for r in rows), "sparse_layers": sum(r["is_2_4"] for r in rows),
            "params": params, "sparse_params": sp, "param_share": sp / params if params else 0.0,
            "flops": flops, "sparse_flops": sf, "flops_share": sf / flops if flops else 0.0}


def format_report(rows: list[dict]) -> str:
    """A text table of `report` rows (eligible layers) and the summary line."""
    lines = [f"{'layer':<48} {'op':<13} {'shape':<20} {'2:4':<4} {'params':>10} {'GFLOPs':>9}"]
    for r in rows:
        if not r["eligible"]:
            continue
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"{r['name'][-48:]:<48} {r['op']:<13} {shape:<20} {'yes' if r['is_2_4'] else 'no':<4} "
                     f"{r['params']:>10} {r['flops'] / 1e9:>9.3f}")
    s = summary(rows)
    lines.append(f"{s['sparse_layers']}/{s['eligible']} eligible layers are 2:4 ({s['layers']} weight layers); "
                 f"sparse share: {100 * s['param_share']:.1f}% of weight parameters, {100 * s['flops_share']:.1f}% of FLOPs")
    return "\n".join(lines)


def _shapes(graph: gs.Graph) -> dict:
    """Tensor shapes, from the graph or, when layer outputs lack them, from ONNX Runtime's symbolic shape
    inference (it resolves the shape arithmetic of exported 'same' padding), else ONNX's."""
    shapes = {name: t.shape for name, t in graph.tensors().items() if t.shape is not None}

    def known(name):
        return name in shapes and all(isinstance(d, int) for d in shapes[name][2:])
    if all(known(n.outputs[0].name) for n in graph.nodes if n.op in G.WEIGHT_OPS and n.outputs):
        return shapes
    model = gs.export_onnx(graph, do_type_check=False)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # shapes only refine the FLOPs estimate
        log.debug("symbolic shape inference failed (%s); trying ONNX shape inference", e)
        try:
            from onnx import shape_inference
            inferred = shape_inference.infer_shapes(model)
        except Exception as e2:
            log.debug("shape inference failed: %s", e2)
            return shapes
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
        if vi.name not in shapes or not all(isinstance(d, int) for d in shapes[vi.name]):
            shapes[vi.name] = dims
    return shapes


def _flops(node, wshape, shapes) -> tuple[int, bool]:
    """Multiply-adds ×2 per run: weight reuse (output positions) × the weights each position reads."""
    def vol(shape):
        if shape is None:
            return 1, False
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
        return int(np.prod(dims)) if dims else 1, all(isinstance(d, int) and d > 0 for d in shape)
    params = int(np.prod(wshape))
    if node.op == "ConvTranspose":  # each input element meets W.size / C_in weights
        v, exact = vol(shapes.get(node.inputs[0].name))
        return 2 * v * (params // max(int(wshape[0]), 1)), exact and node.inputs[0].name in shapes
    out = shapes.get(node.outputs[0].name)
    if out is None:
        return 2 * params, False
    v, exact = vol(out)
    if node.op == "Conv":  # output [N, K, *sp]: each element reads C/g * prod(kernel) weights
        return 2 * v * (params // max(int(wshape[0]), 1)), exact
    # MatMul / Gemm: each output element reads K weights
    k = int(wshape[-2]) if node.op == "MatMul" else int(wshape[1] if node.attrs.get("transB", 0) else wshape[0])
    return 2 * v * k, exact
