"""SparseGPT (Frantar & Alistarh 2023) on the calibration engine.

With H = XᵀX of the layer input (streamed by `calib.collect` into `calib.Hessian` reducers), the mask is chosen by
w²/diag(H⁻¹)² per group and the kept weights of each row get the optimal-brain-surgeon update (`obs`), which
minimises the layer-output error. Layers are pruned in stages in topological order, each stage calibrated on the
graph whose earlier layers are already pruned; a stage holds only the Hessians of its own layers (under the memory
budget). Weights are read through `graph.read_values` and written through `modelfile.set_values`, so inside
`modelfile.spilling` no pruned weight stays in memory. A Hessian that stays singular sends its layer back to magnitude.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import calib, modelfile, obs
from .. import graph as G
from ..errors import OnnxoptError
from ..progress import bar as bar_
from .sparsity_layers import Unit, is_n_m, keep_mask

log = logging.getLogger(__name__)


def sparsegpt_prune(W: np.ndarray, H: np.ndarray, n: int = 2, m: int = 4, damp: float = 0.01,
                    block: int = 128, bar=None, hinv: np.ndarray | None = None) -> np.ndarray:
    """SparseGPT on rows W[out, in] with H = XᵀX over the `in` axis; groups of `m` consecutive columns keep
    at most `n` non-zeros. `hinv`: the upper Cholesky factor of the damped H⁻¹ if already computed.
    Returns the pruned and updated weights (float64)."""
    W = np.array(W, dtype=np.float64, copy=True)
    cols = W.shape[1]
    W[:, np.diag(H) == 0] = 0.0  # inputs that are always zero: their weights do not matter
    Hinv = obs.hinv_upper(obs.undead(H)[0], damp) if hinv is None else hinv  # may raise obs.SingularHessian
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


def _output_errors(W: np.ndarray, pruned: list[np.ndarray], H: np.ndarray) -> list[float]:
    """Layer-output errors ||(W - Wp) X||² relative to ||W X||², from H = XᵀX (float32 is plenty for a report)."""
    D = np.concatenate([W] + [W - np.asarray(p, dtype=np.float64) for p in pruned]).astype(np.float32)
    e = np.sum((D @ H.astype(np.float32)) * D, axis=1).reshape(len(pruned) + 1, -1).sum(axis=1)
    return [float(x / e[0]) if e[0] > 0 else 0.0 for x in e[1:]]


@dataclass(frozen=True)
class _HKey:
    tensor: str
    dim: int
    conv: calib.ConvView | None = None
    trans: bool = False  # Gemm transA: the input is [K, M]


def _rows_view(node: gs.Node, eff_shape: tuple):
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
        kernel = tuple(int(k) for k in (node.attrs.get("kernel_shape") or eff_shape[2:]))
        return _HKey(x.name, int(eff_shape[1] * np.prod(kernel)), calib.ConvView.of(node, kernel))
    if node.op == "Gemm":
        k = eff_shape[1] if node.attrs.get("transB", 0) else eff_shape[0]
        return _HKey(x.name, int(k), None, bool(node.attrs.get("transA", 0)))
    return _HKey(x.name, int(eff_shape[0]))


@dataclass
class _SGPlan:
    unit: Unit
    keys: list        # one _HKey per use
    rows: np.ndarray  # [out, in] flat constant positions


def plan(unit: Unit, hbudget: int):
    """The SparseGPT plan of a unit (Hessian keys, row layout), or (None, why it prunes by magnitude)."""
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


class _Batched:
    """Consecutive calibration feeds of equal shapes concatenated along the batch axis (fewer, larger runs),
    when every input's first axis is dynamic."""

    def __init__(self, data, max_bytes: int = 4 * 2**20, max_batch: int = 64):
        self.data = data
        self.specs = data.specs
        self.describe = data.describe
        self._n = None
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

    def __len__(self) -> int:
        if self._n is None:
            self._n = sum(1 for _ in self)
        return self._n

    @staticmethod
    def _merge(feeds):
        return feeds[0] if len(feeds) == 1 else {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def run(graph, plans, data, n, m, *, damp, block, provider, memory_budget_mb, progress, sequential, rows):
    """Prune the units of `plans` stage by stage; returns (stages, peak Hessian bytes). Plans whose Hessian stays
    singular are removed from `plans`, with the reason in their rows: the caller prunes them by magnitude."""
    budget = memory_budget_mb * 2**20
    stages = list(_stages(graph, plans, budget // 2, sequential))
    if not stages:
        return 0, 0
    peak = 0  # largest sum of Hessian bytes held at once (one stage)
    batches = _Batched(data)
    failed = []
    for si, stage in enumerate(stages):
        reducers: dict[_HKey, calib.Hessian] = {}
        for p in stage:
            for k in p.keys:
                reducers.setdefault(k, calib.Hessian(k.dim, k.conv, k.trans))
        by_tensor: dict[str, list] = {}
        for k, r in reducers.items():
            by_tensor.setdefault(k.tensor, []).append(r)
        peak = max(peak, sum(r.H.nbytes for r in reducers.values()))
        calib.collect_graph(graph, batches, by_tensor, provider=provider, memory_budget_mb=memory_budget_mb,
                            progress=progress, desc=f"sparsegpt calibration {si + 1}/{len(stages)}", only_needed=True)
        hinv = {}  # units that share their input (Q, K, V) share H and its inverse
        for p in stage:
            try:
                _apply_sparsegpt(p, [reducers[k] for k in p.keys], n, m, damp, block, progress, rows, hinv)
            except obs.SingularHessian as e:
                name = p.unit.uses[0].node.name
                log.warning("%s: SparseGPT impossible (%s); pruning this layer by magnitude", name, e)
                for u in p.unit.uses:
                    rows[id(u.node)]["reason"] = f"magnitude fallback: {e}"
                failed.append(p)
        del reducers, by_tensor
    for p in failed:
        plans.remove(p)
    return len(stages), peak


def _apply_sparsegpt(p: _SGPlan, hs: list[calib.Hessian], n, m, damp, block, progress, rows, cache: dict) -> None:
    unit = p.unit
    if any(h.rows == 0 for h in hs):
        raise OnnxoptError(f"SparseGPT: no calibration rows reached layer {unit.uses[0].node.name}; check the calibration data")
    key = tuple(sorted({id(h) for h in hs}))
    if key not in cache:
        H = sum(h.mean for h in {id(h): h for h in hs}.values())
        try:
            cache[key] = (H, obs.hinv_upper(obs.undead(H)[0], damp))
        except obs.SingularHessian as e:
            cache[key] = (H, e)
    H, Hinv = cache[key]
    if isinstance(Hinv, Exception):
        raise Hinv
    v = np.asarray(G.read_values(unit.const))
    W = v.reshape(-1)[p.rows].astype(np.float64)
    name = unit.uses[0].node.name
    with bar_(total=W.shape[1], desc=f"sparsegpt {name}"[-60:], unit="col", enabled=progress) as bar:
        Wp = sparsegpt_prune(W, H, n, m, damp=damp, block=block, bar=bar, hinv=Hinv)
    out = np.array(v, copy=True).reshape(-1)
    out[p.rows.reshape(-1)] = Wp.reshape(-1).astype(v.dtype)
    out = out.reshape(v.shape)
    if not is_n_m(out, unit.axis, n, m):  # the rows view guarantees the groups; keep the output exact regardless
        log.warning("%s: SparseGPT result not %d:%d along axis %d; projecting by magnitude", name, n, m, unit.axis)
        out[~keep_mask(np.abs(out.astype(np.float32)), unit.axis, n, m)] = 0
    modelfile.set_values(unit.const, out)
    mag = np.where(keep_mask(np.abs(W), 1, n, m), W, 0.0)
    err, err_mag = _output_errors(W, [out.reshape(-1)[p.rows], mag], H)
    for u in unit.uses:
        rows[id(u.node)].update(output_error=round(err, 6), output_error_magnitude=round(err_mag, 6))
    log.info("%s: relative output error %.4f (magnitude %.4f)", name, err, err_mag)
