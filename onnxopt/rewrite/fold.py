"""Scale folding shared by SmoothQuant and AWQ.

Both migrate a per-input-channel scale s from a layer's activation to its weights: W' = W * s along the
weight's input-channel axis and X' = X / s. The division is folded into the op that produces X when that op
is linear in X along the channel (LayerNormalization and the other normalizations, Mul/Div/Add by a
constant, MatMul/Gemm with a constant weight, Conv, ConvTranspose); otherwise a Mul is inserted. Other
readers of X keep seeing the original values through a restoring Mul. The rewrite is exact in real
arithmetic, so the FP32 graph computes the same function.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from .. import lazyscale, modelfile
from .. import threads as threads_
from ..lazyscale import SCALE_ROWS_BYTES, scaled  # noqa: F401 - re-exported: the fold's product
from ..errors import OnnxoptError
from ..graph import VIEW_OPS, activation_channel_axis, producer, read_values, taken_names, unique_name, weight_of

log = logging.getLogger(__name__)

CONSUMER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_NORMS_LAST = ("LayerNormalization",)  # scale/bias over the trailing axes
_NORMS_CHANNEL = ("BatchNormalization", "InstanceNormalization", "GroupNormalization")  # scale/bias on axis 1


def is_norm(node: gs.Node) -> bool:
    """A normalization whose scale a per-channel factor can be folded into."""
    return node.op in _NORMS_LAST + _NORMS_CHANNEL
_MAX_DEPTH = 3  # Add(bias) -> Mul(gamma) -> ... chains followed upwards
# Positively homogeneous per channel: f(x / s) = f(x) / s for s > 0 (layout kept, channels not mixed).
_HOMOGENEOUS = ("Relu", "LeakyRelu", "MaxPool")


# ---------------------------------------------------------------- weights of a layer
def weight_chain(node: gs.Node, index: int = 1) -> tuple[gs.Constant, list[gs.Node]]:
    """The initializer feeding `node.inputs[index]` through Cast/Transpose/Identity (nearest node first).
    Raises when there is none or it is already quantized (behind a DequantizeLinear)."""
    const, chain = weight_of(node.inputs[index])
    if const is None or any(p.op not in VIEW_OPS for p in chain):
        dq = any(p.op == "DequantizeLinear" for p in chain)
        what = "already quantized (DequantizeLinear)" if dq else "not a constant"
        raise OnnxoptError(f"node '{node.name}': input {index} is {what}; scales can only be folded into FP weights")
    return const, chain


def _perm(n: gs.Node, rank: int) -> list[int]:
    return list(n.attrs.get("perm", range(rank - 1, -1, -1)))


def _apply_chain(values: np.ndarray, chain: list[gs.Node]) -> np.ndarray:
    for n in reversed(chain):  # from the constant towards the node
        if n.op == "Transpose":
            values = np.transpose(values, _perm(n, values.ndim))
    return values


def effective_shape(node: gs.Node, index: int = 1) -> tuple[int, ...]:
    """Shape of the values `node` sees at `index`, without loading the weight."""
    const, chain = weight_chain(node, index)
    shape = tuple(const.shape)
    for n in reversed(chain):
        if n.op == "Transpose":
            shape = tuple(shape[i] for i in _perm(n, len(shape)))
    return shape


def effective_weight(node: gs.Node, index: int = 1, *, read_only: bool = False) -> np.ndarray:
    """Values that `node` sees at `index` (the constant with its Transposes applied), as float32; `read_only`:
    a caller that never writes to them gets FP32 values without a copy (possibly the constant's own array)."""
    return chain_values(*weight_chain(node, index), read_only=read_only)


def chain_values(const: gs.Constant, chain: list[gs.Node], *, read_only: bool = False) -> np.ndarray:
    """`effective_weight` from a `weight_chain` found earlier: reads no graph edges (worker threads may call it
    while the graph is edited elsewhere)."""
    return _apply_chain(np.asarray(read_values(const)), chain).astype(np.float32, copy=not read_only)


def weight_matrix(node: gs.Node, w: np.ndarray | None = None) -> np.ndarray:
    """The layer's weight as [groups, inputs per group, outputs per group]: rows follow the input channels
    (times kernel positions for Conv, in the weight's own order), columns the outputs. ConvTranspose
    columns run over (output channel, kernel position)."""
    w = effective_weight(node) if w is None else w
    if node.op == "MatMul":
        if w.ndim != 2:
            raise OnnxoptError(f"MatMul '{node.name}': weight of rank {w.ndim}; only 2-D weights are handled")
        return w[None]
    if node.op == "Gemm":
        return (w.T if node.attrs.get("transB", 0) else w)[None]
    g = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        o = w.shape[0]
        return w.reshape(g, o // g, -1).transpose(0, 2, 1)
    if node.op == "ConvTranspose":
        c = w.shape[0]
        return w.reshape(g, c // g, -1)
    raise OnnxoptError(f"node '{node.name}' ({node.op}) has no weight matrix; expected one of {', '.join(CONSUMER_OPS)}")


def input_channels(node: gs.Node, shape) -> int:
    """Number of input channels of a layer with an effective weight of `shape`."""
    if node.op == "MatMul":
        return shape[-2]
    if node.op == "Gemm":
        return shape[1] if node.attrs.get("transB", 0) else shape[0]
    if node.op == "Conv":
        return shape[1] * int(node.attrs.get("group", 1))
    return shape[0]  # ConvTranspose


def input_channel_absmax(node: gs.Node, w: np.ndarray | None = None) -> np.ndarray:
    """max |W| over everything but the input channel: one value per input channel of the layer."""
    w = effective_weight(node) if w is None else w

    def absmax(a, axis):  # max(max a, -min a) = max |a|, without an |a| copy of the weight
        return np.maximum(a.max(axis=axis), -a.min(axis=axis))
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        o, cg = w.shape[0], w.shape[1]
        return absmax(w.reshape(g, o // g, cg, -1), (1, 3)).reshape(-1)
    if node.op == "ConvTranspose":
        return absmax(w.reshape(w.shape[0], -1), 1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return absmax(w, 0)
    return absmax(np.moveaxis(w, -2, 0).reshape(w.shape[-2], -1), 1)


def input_channel_absmax_ahead(units: list, threads: int = 0) -> Iterator[list]:
    """`[input_channel_absmax(n) for n in layers]` for each list of layers in `units`, in order, read and reduced
    ahead on worker threads (at most threads.IN_FLIGHT_BYTES of weights in flight), while the caller folds. The
    graph is read here, in the caller's thread; a layer whose weight a fold changed after its read began (another
    constant, or new values) is reduced again here: the numbers of calling input_channel_absmax at each unit's turn."""
    def snap(layers):  # the caller's thread: graph edges are read here only
        out = []
        for n in layers:
            try:
                const, chain = weight_chain(n, 1)
            except OnnxoptError:
                const, chain = None, []
            out.append((n, const, list(chain), None if const is None else const._values))
        return out

    def work(snaps):
        return [(sn, None if sn[1] is None else input_channel_absmax(sn[0], _apply_chain(np.asarray(
            sn[3].load() if isinstance(sn[3], gs.ir.tensor.LazyValues) else sn[3]), sn[2]).astype(np.float32)))
                for sn in snaps]

    def cost(snaps):
        return sum(2 * 4 * int(np.prod(c.shape)) for _, c, _, _ in snaps if c is not None and c.shape is not None)

    sizes = [cost(snap(layers)) for layers in units]
    for done in threads_.ordered_map(work, (snap(layers) for layers in units), threads_.for_bytes(sum(sizes) // 2, threads),
                                     cost=cost):
        out = []
        for (n, const, chain, vals), a in done:
            try:
                now, now_chain = weight_chain(n, 1)
            except OnnxoptError:
                now, now_chain = None, []
            if a is None or now is not const or const._values is not vals or [id(c) for c in now_chain] != [id(c) for c in chain]:
                a = input_channel_absmax(n)  # changed since (or no weight: raises as the direct call would)
            out.append(a)
        yield out


def input_factor(node: gs.Node, shape, s: np.ndarray) -> np.ndarray:
    """`s` laid out to broadcast against the effective weight along its input channels."""
    r = len(shape)
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        o, cg = shape[0], shape[1]
        idx = (np.arange(o)[:, None] // (o // g)) * cg + np.arange(cg)[None, :]
        return s[idx].reshape(o, cg, *([1] * (r - 2)))
    if node.op == "ConvTranspose":
        return s.reshape(-1, *([1] * (r - 1)))
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return s[None, :]
    return s.reshape(-1, 1)  # MatMul [..., K, N] and Gemm [K, N]


def _output_factor(node: gs.Node, shape, v: np.ndarray) -> np.ndarray:
    """`v` laid out to broadcast against the effective weight along its output channels."""
    r = len(shape)
    if node.op == "Conv":
        return v.reshape(-1, *([1] * (r - 1)))
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        c, og = shape[0], shape[1]
        idx = (np.arange(c)[:, None] // (c // g)) * og + np.arange(og)[None, :]
        return v[idx].reshape(c, og, *([1] * (r - 2)))
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return v[:, None]
    return v  # MatMul / Gemm: last axis


# ---------------------------------------------------------------- scaling one constant input in place
class _Names:
    def __init__(self, graph: gs.Graph, taken: set | None = None):
        self.used = taken_names(graph) if taken is None else taken

    def new(self, base: str) -> str:
        return unique_name(base, self.used)


def _terminal_users(graph: gs.Graph, t: gs.Tensor, out: list) -> bool:
    """Collect (node, index) readers of `t` past pass-through ops; False if a graph output is reached."""
    if any(o is t for o in graph.outputs):
        return False
    for n in t.outputs:
        for i, inp in enumerate(n.inputs):
            if inp is not t:
                continue
            if n.op in VIEW_OPS and i == 0:
                if not _terminal_users(graph, n.outputs[0], out):
                    return False
            else:
                out.append((n, i))
    return True


def _scale_constant_input(graph: gs.Graph, users: list[tuple[gs.Node, int]], factor_fn, names: _Names) -> None:
    """Multiply the constant behind `users` (all reading the same tensor) by factor_fn(effective shape),
    a broadcastable array. Scales in place when nobody else reads the constant; else gives the users
    a private scaled copy (with its own Cast/Transpose chain)."""
    node, index = users[0]
    const, chain = weight_chain(node, index)
    eff_shape = effective_shape(node, index)
    # the factor as compact as it comes (broadcastable, the weight's rank), in the constant's own layout
    f = np.asarray(factor_fn(eff_shape), dtype=np.float64)
    f = f.reshape((1,) * (len(eff_shape) - f.ndim) + f.shape)
    # Undo the chain's transposes, from the node back to the constant.
    for n in chain:
        if n.op == "Transpose":
            f = np.transpose(f, np.argsort(_perm(n, f.ndim)))
    readers: list = []
    private = _terminal_users(graph, const, readers) and {(id(n), i) for n, i in readers} == {(id(n), i) for n, i in users}
    if private:
        # big lazy weights: the product is computed where it is read (lazyscale), not written out here
        if not lazyscale.scale(const, f):
            modelfile.set_values(const, scaled(np.asarray(read_values(const)), f))
        return
    # Shared with other readers: clone the constant and its chain for these users only.
    name = names.new(const.name + "_scaled")
    t = lazyscale.lazy_copy(name, const, f) or modelfile.constant(name, scaled(np.asarray(read_values(const)), f))
    for n in reversed(chain):
        out = gs.Variable(names.new(n.outputs[0].name + "_scaled"), dtype=n.outputs[0].dtype, shape=n.outputs[0].shape)
        graph.nodes.append(gs.Node(n.op, name=names.new(n.name + "_scaled"), attrs=dict(n.attrs), inputs=[t], outputs=[out]))
        t = out
    for n, i in users:
        n.inputs[i] = t


def _const_input(graph: gs.Graph, node: gs.Node) -> int | None:
    """Index of the single FP constant operand (through Cast/Transpose/Identity) of a binary op, or None."""
    found = []
    for i, t in enumerate(node.inputs[:2]):
        try:
            weight_chain(node, i)
            found.append(i)
        except OnnxoptError:
            pass
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------- folding 1/s into the producer
def activation_shape(v: np.ndarray, axis: int, rank: int | None) -> np.ndarray:
    """`v` (one value per channel) shaped to broadcast against the activation along `axis`."""
    if axis == -1 or (rank is not None and axis == rank - 1):
        return v
    if rank is None:
        raise OnnxoptError("activation rank unknown; cannot place a per-channel scale on a non-trailing axis")
    return v.reshape(-1, *([1] * (rank - 1 - axis)))


def _fold_into(graph: gs.Graph, x: gs.Tensor, inv: np.ndarray, axis: int, rank: int | None, names: _Names,
               depth: int = 0) -> str | None:
    """Fold X <- X * inv into X's producer. Returns a description, or None (nothing changed) when the
    producer is not linear in X along the channel."""
    p = producer(x)
    if p is None or not p.outputs or p.outputs[0] is not x or depth > _MAX_DEPTH:
        return None
    last = axis == -1 or (rank is not None and axis == rank - 1)
    try:
        if p.op in _NORMS_LAST and last:
            return _fold_params(graph, p, [1, 2], inv, names, "gamma, beta")
        if p.op in _NORMS_CHANNEL and axis == 1 and _norm_per_channel(graph, p, inv.size):
            return _fold_params(graph, p, [1, 2], inv, names, "scale, bias")
        if p.op in ("Mul", "Div", "Add", "Sub"):
            return _fold_elementwise(graph, p, x, inv, axis, rank, names, depth)
        if p.op in _HOMOGENEOUS:
            # f(a) / s = f(a / s) for s > 0: pass the factor through to a's producer.
            a = p.inputs[0]
            if len(a.outputs) != 1 or any(o is a for o in graph.outputs):
                return None
            inner = _fold_into(graph, a, inv, axis, rank, names, depth + 1)
            return None if inner is None else f"{inner} (through {p.op} '{p.name}')"
        if p.op == "Reshape" and last:
            return _fold_attention_output(graph, p, inv, names, depth)
        if p.op in ("MatMul", "Gemm") and last:
            if p.op == "MatMul" and _const_input(graph, p) != 1:
                return None
            if p.op == "Gemm" and len(p.inputs) > 2 and not _is_const(p, 2):
                return None
            weight_chain(p, 1)
            _scale_constant_input(graph, [(p, 1)], lambda shp: _output_factor(p, shp, inv), names)
            if p.op == "Gemm" and len(p.inputs) > 2 and p.inputs[2].name:
                _scale_small(graph, p, 2, inv, names)
            return f"{p.op} '{p.name}' (weight{', bias' if len(p.inputs) > 2 else ''})"
        if p.op in ("Conv", "ConvTranspose") and axis == 1:
            if len(p.inputs) > 2 and p.inputs[2].name and not _is_const(p, 2):
                return None
            weight_chain(p, 1)
            _scale_constant_input(graph, [(p, 1)], lambda shp: _output_factor(p, shp, inv), names)
            if len(p.inputs) > 2 and p.inputs[2].name:
                _scale_small(graph, p, 2, inv, names)
            return f"{p.op} '{p.name}' (weight{', bias' if len(p.inputs) > 2 else ''})"
    except OnnxoptError:
        return None
    return None


def _fold_attention_output(graph, merge: gs.Node, inv: np.ndarray, names: _Names, depth: int) -> str | None:
    """Attention output O = merge(P · split(V)) (split: Reshape [.., H, hd] + Transpose 0,2,1,3; merge: the
    inverse) is linear in V, channel c = head * hd + j on both sides: 1/s goes into V's producer (the V
    projection's weight columns and bias) instead of a Mul that would split TensorRT's fused attention.
    Exporters spell the layout differently (SDPA adds a [B, H, S, hd] -> [B, H, S, hd] view after P · V):
    any Reshape that keeps rank 4 and the head size is allowed beside the one head Transpose on each side."""
    outputs = {id(o) for o in graph.outputs}
    pv, chain_out = _walk_heads(merge.inputs[0], stop="MatMul")
    if pv is None:
        return None
    split, chain_v = _walk_heads(pv.inputs[1], stop="Reshape")
    if split is None:
        return None
    v = split.inputs[0]
    chain = [merge.inputs[0]] + chain_out + [pv.inputs[1]] + chain_v + [v]
    if any(sum(c.op not in ("Shape", "Size") for c in t.outputs) != 1 or id(t) in outputs for t in chain):
        return None  # another reader would see the factor (Shape reads the shape only: SDPA exports)
    shape = split.inputs[1]
    if isinstance(shape, gs.Constant):
        dims = np.asarray(shape.values).reshape(-1)
        if len(dims) != 4 or (dims[-1] > 0 and dims[-2] > 0 and dims[-1] * dims[-2] != inv.size):
            return None
    elif split.outputs[0].shape is None or len(split.outputs[0].shape) != 4:
        return None
    inner = _fold_into(graph, v, inv, -1, 3, names, depth + 1)
    return None if inner is None else f"{inner} (through attention softmax·V '{pv.name}')"


def is_attention_output(x: gs.Tensor) -> bool:
    """`x` is an attention block's merged heads (merge(P · V)): a Mul on it would split TensorRT's fused attention."""
    p = producer(x)
    return p is not None and p.op == "Reshape" and _walk_heads(p.inputs[0], stop="MatMul")[0] is not None


def _walk_heads(t: gs.Tensor, stop: str, limit: int = 6):
    """From a per-head tensor [B, H, S, hd] up to the `stop` op: exactly one Transpose 0,2,1,3 and any
    Reshapes that keep rank 4 and the head size hd (views). Returns (stop node, tensors passed) or (None, [])."""
    passed, transposes = [], 0
    for _ in range(limit):
        p = producer(t)
        if p is None:
            return None, []
        if p.op == stop and not (stop == "Reshape" and (transposes == 0 or _head_view(p))):
            return (p, passed) if transposes == 1 else (None, [])
        if p.op == "Transpose" and list(p.attrs.get("perm", ())) == [0, 2, 1, 3] and transposes == 0:
            transposes += 1
        elif p.op != "Reshape" or not _head_view(p):
            return None, []
        passed.append(p.inputs[0])
        t = p.inputs[0]
    return None, []


def _head_view(node: gs.Node) -> bool:
    """A Reshape [B, H, S, hd] -> [B, H, S, hd]: rank 4 on both sides, the same static head size, and no
    static dimension that differs."""
    a, b = node.inputs[0].shape, node.outputs[0].shape
    if a is None or b is None or len(a) != 4 or len(b) != 4:
        return False
    if not (isinstance(a[-1], (int, np.integer)) and a[-1] > 0 and a[-1] == b[-1]):
        return False
    return all(x == y for x, y in zip(a, b) if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)))


def _is_const(node: gs.Node, i: int) -> bool:
    try:
        weight_chain(node, i)
        return True
    except OnnxoptError:
        return False


def _norm_per_channel(graph: gs.Graph, p: gs.Node, c: int) -> bool:
    # GroupNormalization before opset 21 has per-group scale/bias, which cannot carry a per-channel factor.
    if p.op == "GroupNormalization" and graph.opset < 21:
        return False
    return all(_is_const(p, i) for i in (1, 2) if i < len(p.inputs) and p.inputs[i].name) and \
        int(np.prod(p.inputs[1].shape)) == c


def _scale_small(graph: gs.Graph, p: gs.Node, i: int, factor: np.ndarray, names: _Names) -> None:
    """Replace a small constant operand (bias, gamma, elementwise constant) by a scaled copy; the copy
    takes the broadcast shape of the constant and `factor` (a scalar constant becomes per-channel)."""
    t = p.inputs[i]
    c = effective_weight(p, i).astype(np.float64) * factor
    dtype = t.dtype if t.dtype is not None and np.dtype(t.dtype).kind == "f" else np.float32
    p.inputs[i] = gs.Constant(names.new(t.name + "_scaled"), np.ascontiguousarray(c.astype(dtype)))


def _fold_params(graph, p, indices, factor, names, what) -> str | None:
    idx = [i for i in indices if i < len(p.inputs) and p.inputs[i].name]
    if not all(_is_const(p, i) for i in idx):
        return None
    for i in idx:
        _scale_small(graph, p, i, factor, names)
    return f"{p.op} '{p.name}' ({what})"


def _fold_elementwise(graph, p, x, inv, axis, rank, names, depth) -> str | None:
    ci = _const_input(graph, p)
    if ci is None or (p.op == "Div" and ci != 1):
        return None
    c_shape = tuple(p.inputs[ci].shape if isinstance(p.inputs[ci], gs.Constant) else effective_weight(p, ci).shape)
    out_rank = rank if rank is not None else max(len(c_shape), 1)
    f = activation_shape(inv, axis, out_rank)
    # The scaled constant must not grow the output: its broadcast with the other operand stays X's shape.
    if len(np.broadcast_shapes(c_shape, f.shape)) > out_rank:
        return None
    if p.op in ("Mul", "Div"):
        _scale_small(graph, p, ci, f if p.op == "Mul" else 1.0 / f, names)
        return f"{p.op} '{p.name}' (constant)"
    # Add/Sub: (A + b) * inv = A * inv + b * inv; A's producer must take the factor too.
    a = p.inputs[1 - ci]
    if len(a.outputs) != 1 or any(o is a for o in graph.outputs):
        return None
    inner = _fold_into(graph, a, inv, axis, rank, names, depth + 1)
    if inner is None:
        return None
    _scale_small(graph, p, ci, f, names)
    return f"{p.op} '{p.name}' (constant) and {inner}"


def weight_key(node: gs.Node) -> tuple:
    """(id of the stored weight constant, its Transpose views) of a layer's weight (input 1): layers with equal
    keys compute with the same matrix, however many Identity/Cast nodes each reads it through."""
    const, chain = weight_chain(node, 1)
    return id(const), tuple((c.op, tuple(_perm(c, len(effective_shape(node, 1))))) for c in chain if c.op == "Transpose")


def tied(groups: list[list[gs.Node]]) -> list[list[int]]:
    """Indices of `groups` (the layers reading one activation each) joined into units by a weight constant their
    layers share (ALBERT: one layer's weights read at every depth): a unit's weight is stored once, so it takes one
    input-channel scale from the statistics of every use. Other groups stand alone; units keep the input order."""
    parent = list(range(len(groups)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner: dict[int, int] = {}
    for i, layers in enumerate(groups):
        for n in layers:
            j = owner.setdefault(id(weight_chain(n, 1)[0]), i)
            parent[root(i)] = root(j)
    units: dict[int, list] = {}
    for i in range(len(groups)):
        units.setdefault(root(i), []).append(i)
    return list(units.values())


# ---------------------------------------------------------------- public entry point
def scale_weights(graph: gs.Graph, consumers: list[gs.Node], s: np.ndarray) -> None:
    """Multiply each consumer's weight by `s` along its input channels, each weight constant once however many
    of `consumers` read it (through their own Identity/Cast/Transpose chains): a weight every reader of which
    is among `consumers` is scaled in place, so a shared weight stays one tensor."""
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    by_const: dict[tuple, list] = {}
    for n in consumers:
        by_const.setdefault(weight_key(n), []).append(n)
    names = _Names(graph)
    for group in by_const.values():
        ref = group[0]
        _scale_constant_input(graph, [(n, 1) for n in group], lambda shp, ref=ref: input_factor(ref, shp, s), names)


def fold_input_scale(graph: gs.Graph, consumers: list[gs.Node], s: np.ndarray, *, weights: bool = True,
                     norm_only: bool = False, taken: set | None = None) -> str:
    """Multiply each consumer's weight by `s` along its input channels and divide their shared activation
    (input 0) by `s`, folding 1/s into the activation's producer when it is linear along the channel, else
    inserting a Mul. Other readers of the activation keep the original values (a restoring Mul).
    `weights=False` leaves the weights to the caller (`scale_weights`, once for a weight several activations
    feed); `norm_only` folds only into a normalization producer (its small constants), never into a producer's
    weight, which may be shared. Returns how 1/s was folded, for the log and the report. Exact up to float rounding.
    `taken`: the graph's names (graph.taken_names), kept up to date here, for callers that fold many times (else
    found each call)."""
    if not consumers:
        raise OnnxoptError("fold_input_scale: no consumer layers given")
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise OnnxoptError("fold_input_scale: scales must be finite and positive")
    x = consumers[0].inputs[0]
    axis = activation_channel_axis(consumers[0])
    rank = None
    for n in consumers:
        if n.op not in CONSUMER_OPS:
            raise OnnxoptError(f"node '{n.name}' ({n.op}) cannot take an input scale; expected one of {', '.join(CONSUMER_OPS)}")
        if n.inputs[0] is not x:
            raise OnnxoptError(f"node '{n.name}' reads '{n.inputs[0].name}', not the shared activation '{x.name}'")
        if activation_channel_axis(n) != axis:
            raise OnnxoptError(f"node '{n.name}': channel axis differs from the other layers reading '{x.name}'")
        shape = effective_shape(n, 1)
        if input_channels(n, shape) != s.size:
            raise OnnxoptError(f"node '{n.name}' has {input_channels(n, shape)} input channels, got {s.size} scales")
        if n.op in ("Conv", "ConvTranspose"):
            rank = len(shape)
        elif n.op == "Gemm":
            rank = 2
    if rank is None and x.shape is not None:
        rank = len(x.shape)
    names = _Names(graph, taken)
    inv = 1.0 / s

    # Weights: once per distinct weight tensor.
    if weights:
        by_tensor: dict[int, list] = {}
        for n in consumers:
            by_tensor.setdefault(id(n.inputs[1]), []).append(n)
        for group in by_tensor.values():
            ref = group[0]
            _scale_constant_input(graph, [(n, 1) for n in group], lambda shp, ref=ref: input_factor(ref, shp, s), names)

    # Activation: fold 1/s upwards, or insert a Mul in front of the consumers.
    group_ids = {id(n) for n in consumers}
    others = [n for n in x.outputs if id(n) not in group_ids]
    is_output = any(o is x for o in graph.outputs)
    foldable = not is_output and not (norm_only and not (x.inputs and is_norm(x.inputs[0])))
    how = _fold_into(graph, x, inv, axis, rank, names) if foldable else None
    dtype = x.dtype if x.dtype is not None and np.dtype(x.dtype).kind == "f" else np.float32
    if how is None:
        c = gs.Constant(names.new(x.name + "_inv_scale"), activation_shape(inv, axis, rank).astype(dtype))
        xs = gs.Variable(names.new(x.name + "_scaled"), dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Mul", name=names.new(x.name + "_smooth_mul"), inputs=[x, c], outputs=[xs]))
        for n in consumers:
            n.inputs[0] = xs
        how = f"inserted Mul '{xs.inputs[0].name}'"
        log.debug("'%s': no foldable producer; %s", x.name, how)
        return how
    if others:
        c = gs.Constant(names.new(x.name + "_restore_scale"), activation_shape(s, axis, rank).astype(dtype))
        xr = gs.Variable(names.new(x.name + "_restored"), dtype=x.dtype, shape=x.shape)
        mul = gs.Node("Mul", name=names.new(x.name + "_restore_mul"), inputs=[x, c], outputs=[xr])
        for n in others:
            for i, t in enumerate(n.inputs):
                if t is x:
                    n.inputs[i] = xr
        graph.nodes.append(mul)
        how += f"; restoring Mul '{mul.name}' for {len(others)} other reader(s)"
    log.debug("'%s': folded into %s", x.name, how)
    return "folded into " + how
