"""Low-rank branch (SVDQuant, ICLR 2025): W = L1·L2 + R, the rank-r part kept in 16 bits, the residual R quantized.

Each eligible layer (MatMul/Gemm with a 2-D weight, Conv with group 1, seen as a GEMM [K = C·kh·kw, N = O])
becomes y = X·R + (X·L1)·L2: the layer keeps its node and bias with R as its weight (the Q/DQ pass after this
one quantizes it), and two small unquantized GEMMs beside it read the same high-precision input and are
summed in after it. For a Conv, L1 is a Conv with r output channels and the layer's kernel, strides and pads,
L2 a 1x1 Conv. L1 = U_r·sqrt(S_r), L2 = sqrt(S_r)·V_r from a truncated SVD of the (smoothed) weight: both
factors of similar magnitude, so FP16 holds them.

Rank per layer: fixed (`rank`), or chosen (`rank=0`) by greedily spending a byte budget (`budget` times the
quantized weight bytes of the eligible layers) on the layers whose modelled output error falls most per added
byte. The model, per layer and relative to ||W||²: the quantization error of the residual (`fake_quant`,
the format the next pass writes) plus the activation quantization noise through the residual
(`act_noise` · ||R||², zero for weight-only formats); the branch itself reads unquantized activations.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from .. import modelfile, threads
from . import fold
from ..errors import OnnxoptError
from ..graph import taken_names, unique_name
from ..progress import track
from .. import formats
from .awq import AWQ
from ..pass_protocol import BlockQuantizer, PassBase, StaticQuantizer, WeightOnlyQuantizer, after

log = logging.getLogger(__name__)

OPS = ("MatMul", "Gemm", "Conv")
BRANCH_BYTES = 2            # L1 and L2 are stored in 16 bits
RANK_GRID = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LAYER_CAP = 0.5             # one layer's branch never costs more than half its quantized weight bytes
# Suffixes of the nodes the pass adds; quant.rules keeps these nodes high precision (`is_branch`).
DOWN, UP, ADD = "/lowrank_down", "/lowrank_up", "/lowrank_add"


def act_noise(f) -> float:
    """Relative noise power (E|ΔX|² / E|X|²) that per-tensor activation quantization in format `f` adds, assumed
    for the rank choice (no calibration pass here): an integer grid's step² / 12 with max|x| / rms(x) ≈ 16; a
    float format's relative rounding error (2^-(mantissa bits + 1))² / 3."""
    if np.dtype(f.np_dtype).kind in "iu":
        return (16 / f.qmax) ** 2 / 12
    return (2.0 ** -(ml_dtypes.finfo(f.np_dtype).nmant + 1)) ** 2 / 3


def is_branch(node: gs.Node) -> bool:
    """Whether `node` is one of the branch's GEMMs or its Add (made by `split`)."""
    return (node.name or "").endswith((DOWN, UP, ADD))


def eligible(node: gs.Node) -> str | None:
    """None when `node` can take a branch, else why not."""
    if node.op not in OPS or len(node.inputs) < 2:
        return f"op {node.op} has no weight GEMM"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
        return "grouped Conv"
    try:
        shape = fold.effective_shape(node)
    except OnnxoptError:
        return "weight is not an FP constant"
    if node.op != "Conv" and len(shape) != 2:
        return "weight is not 2-D"
    const, _ = fold.weight_chain(node)
    if len(const.outputs) > 1:
        return "weight shared with other layers"
    return None


def gemm_dims(node: gs.Node) -> tuple[int, int]:
    """(K, N) of the layer seen as a GEMM."""
    _, k, n = fold.weight_matrix(node, np.empty(fold.effective_shape(node), np.float32)).shape
    return int(k), int(n)


@dataclass
class _Layer:
    node: gs.Node
    k: int
    n: int
    qbytes: float                     # quantized weight bytes
    ranks: list = field(default_factory=list)   # candidate ranks, 0 first
    errors: list = field(default_factory=list)  # modelled relative output error at each
    chosen: int = 0                   # index into ranks


SMALL_SVD = 1024  # below this min(K, N) an SVD runs on one BLAS thread


def _blas_threads(shape):
    """One BLAS thread for a small layer's linear algebra (threads.one_blas_thread)."""
    return threads.one_blas_thread(min(shape) <= SMALL_SVD)


def _svd(w: np.ndarray):
    with _blas_threads(w.shape):
        return np.linalg.svd(w.astype(np.float64), full_matrices=False)


def _factors(w_kn: np.ndarray, r: int, u, s, vt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L1 [K, r], L2 [r, N], R) with L1, L2 rounded to FP16 and R = W - L1·L2 of the rounded factors."""
    root = np.sqrt(s[:r])
    l1 = (u[:, :r] * root).astype(np.float16).astype(np.float32)
    l2 = (root[:, None] * vt[:r]).astype(np.float16).astype(np.float32)
    return l1, l2, w_kn - l1 @ l2


def _error(w_kn, r, u, s, vt, fake_quant, act_noise, norm) -> float:
    _, _, res = _factors(w_kn, r, u, s, vt) if r else (None, None, w_kn)
    werr = float(np.sum((res - fake_quant(res)).astype(np.float64) ** 2))
    return (werr + act_noise * float(np.sum(res.astype(np.float64) ** 2))) / norm


def _allocate(layers: list[_Layer], budget_bytes: float) -> None:
    """Greedy: repeatedly take the step (to any higher candidate rank of one layer) with the largest error
    drop per byte that still fits the budget. Bounded by the number of candidates."""
    spent = 0.0

    def best_step(i):
        L = layers[i]
        c, best = L.chosen, None
        cost0 = L.ranks[c] * (L.k + L.n) * BRANCH_BYTES
        for j in range(c + 1, len(L.ranks)):
            gain = L.errors[c] - L.errors[j]
            cost = L.ranks[j] * (L.k + L.n) * BRANCH_BYTES - cost0
            if gain > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, j, cost)
        return best

    heap = []
    for i in range(len(layers)):
        b = best_step(i)
        if b:
            heapq.heappush(heap, (-b[0], i, b[1], b[2]))
    for _ in range(sum(len(L.ranks) for L in layers)):
        if not heap:
            break
        _, i, j, cost = heapq.heappop(heap)
        if layers[i].chosen >= j:
            continue
        if spent + cost > budget_bytes:
            continue  # a cheaper step of another layer may still fit
        layers[i].chosen, spent = j, spent + cost
        b = best_step(i)
        if b:
            heapq.heappush(heap, (-b[0], i, b[1], b[2]))


def residual(w_kn: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """R = W - L1·L2 ([K, N], float32) of the FP16-rounded factors: the weight the quantizing pass takes."""
    return (w_kn.astype(np.float64) - l1 @ l2).astype(np.float32)


def factors(node: gs.Node, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(L1 [K, r], L2 [r, N]) of `node`'s weight, FP16-rounded, as float32 (one SVD)."""
    return factors_of(fold.weight_matrix(node)[0], r)


def factors_of(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(L1 [K, r], L2 [r, N]) of a [K, N] matrix, FP16-rounded, as float32 (one SVD)."""
    u, s, vt = _svd(w)
    l1, l2, _ = _factors(w.astype(np.float64), r, u, s, vt)
    return l1.astype(np.float32), l2.astype(np.float32)


def layer_weight(node: gs.Node, res_kn: np.ndarray, w_shape: tuple | None = None) -> np.ndarray:
    """A [K, N] matrix in the layout `node` consumes its weight (a Conv's kernel, a transB Gemm's [N, K]);
    `w_shape`: that weight's shape where the node's weight input is no longer the constant."""
    if node.op == "Conv":
        return res_kn.T.reshape(fold.effective_shape(node) if w_shape is None else w_shape)
    return res_kn.T if node.op == "Gemm" and node.attrs.get("transB", 0) else res_kn


def branch_nodes(node: gs.Node, x: gs.Tensor, l1: np.ndarray, l2: np.ndarray, names: set,
                 base: str | None = None, w_shape: tuple | None = None) -> tuple[list, gs.Variable]:
    """The branch's two GEMMs on `x` (L1 then L2, 16-bit weights in float32): (nodes, output). `w_shape`: the
    layer's weight shape where its weight input is no longer the constant."""
    w_shape = fold.effective_shape(node) if w_shape is None else w_shape
    r = l1.shape[1]
    out = node.outputs[0]
    base = base or node.name or fold.weight_chain(node)[0].name
    if node.op == "Conv":
        down_w = l1.T.reshape((r,) + tuple(w_shape[1:]))
        up_w = l2.T.reshape(w_shape[0], r, *([1] * (len(w_shape) - 2)))
        down_attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}
        op = "Conv"
    else:
        down_w, up_w, down_attrs, op = l1, l2, {}, "MatMul"
    mid = gs.Variable(unique_name(f"{base}_lowrank_mid", names), dtype=out.dtype)
    low = gs.Variable(unique_name(f"{base}_lowrank_out", names), dtype=out.dtype, shape=out.shape)
    nodes = [gs.Node(op, name=unique_name(base + DOWN, names), attrs=down_attrs, inputs=[
                 x, modelfile.constant(unique_name(f"{base}_lowrank_L1", names), np.ascontiguousarray(down_w, np.float32))],
                 outputs=[mid]),
             gs.Node(op, name=unique_name(base + UP, names), inputs=[
                 mid, modelfile.constant(unique_name(f"{base}_lowrank_L2", names), np.ascontiguousarray(up_w, np.float32))],
                 outputs=[low])]
    return nodes, low


def attach(graph: gs.Graph, node: gs.Node, l1: np.ndarray, l2: np.ndarray, names: set) -> None:
    """Rewire `node` to the residual W - L1·L2 and add the branch: out = node(X; R) + up(down(X))."""
    _write(graph, node, l1, l2, residual(fold.weight_matrix(node)[0], l1, l2), names)


def _write(graph: gs.Graph, node: gs.Node, l1: np.ndarray, l2: np.ndarray, res: np.ndarray, names: set) -> None:
    """Rewire `node` to the residual and add the branch: out = node(X; R) + up(down(X))."""
    const, _ = fold.weight_chain(node)
    base = node.name or const.name
    r_w = layer_weight(node, res)
    node.inputs[1] = modelfile.constant(unique_name(f"{const.name}_residual", names), np.ascontiguousarray(r_w, np.float32))
    x = node.inputs[0]
    out = node.outputs[0]
    main = gs.Variable(unique_name(f"{out.name}_quantized_part", names), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = main
    nodes, low = branch_nodes(node, x, l1, l2, names, base)
    graph.nodes.extend(nodes)
    graph.nodes.append(gs.Node("Add", name=unique_name(base + ADD, names), inputs=[main, low], outputs=[out]))


def parse_rank(value) -> int:
    """--lowrank: a positive integer, or 'auto' (0: chosen per layer)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        rank = int(value)
        ok = not isinstance(value, bool) and float(value) == rank and rank > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OnnxoptError(f"--lowrank {value}: the rank must be a positive integer, or 'auto' to choose it per layer")
    return rank


def check_rank(rank: int, budget: float) -> None:
    """Options checked before any model is read (rank 0 = auto)."""
    if rank != 0:
        parse_rank(rank)
    if not 0.0 < budget <= 1.0:
        raise OnnxoptError(f"--lowrank-budget {budget}: give a fraction of the quantized weight bytes in (0, 1], e.g. 0.1")


def choose_ranks(nodes: list[gs.Node], spec: Callable, *, rank: int = 0, budget: float = 0.1,
                 progress: bool = True) -> tuple[dict, dict]:
    """({layer name: rank > 0}, {layer name: why it takes no branch}) for `nodes`. `spec(node)` gives
    (fake_quant(w_kn), weight bits, activation noise) of the format the layer's residual will take; `rank` > 0
    fixes the rank, 0 chooses it per layer within `budget` times the quantized weight bytes."""
    layers, skipped = _choose(nodes, spec, rank, budget, progress)
    for L in layers:
        if not L.ranks[L.chosen]:
            skipped[L.node.name] = "no rank paid for itself within the budget"
    return {L.node.name: L.ranks[L.chosen] for L in layers if L.ranks[L.chosen]}, skipped


def _choose(nodes, spec, rank, budget, progress) -> tuple[list, dict]:
    skipped, layers = {}, []
    for n in nodes:
        why = eligible(n)
        if why is None:
            k, nn = gemm_dims(n)
            if rank and rank >= min(k, nn):
                why = f"rank {rank} >= min(K, N) = {min(k, nn)}"
        if why:
            skipped[n.name] = why
            continue
        layers.append(_Layer(n, k, nn, k * nn * spec(n)[1] / 8))
    budget_bytes = budget * sum(L.qbytes for L in layers)
    # One weight in memory at a time: SVD, candidate errors. The SVD is done again at the rewrite rather than
    # keeping every layer's factors.
    for L in track(layers if not rank else [], total=len(layers), enabled=progress, desc="lowrank: SVD"):
        fake_quant, _, act_noise = spec(L.node)
        w = fold.weight_matrix(L.node)[0]
        u, s, vt = _svd(w)
        norm = max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)
        cap = min(min(L.k, L.n) // 2, int(LAYER_CAP * L.qbytes / ((L.k + L.n) * BRANCH_BYTES)))
        L.ranks = [0] + [r for r in RANK_GRID if r <= cap]
        with _blas_threads(w.shape):
            L.errors = [_error(w, r, u, s, vt, fake_quant, act_noise, norm) for r in L.ranks]
        del u, s, vt, w
    if rank:
        for L in layers:
            L.ranks, L.chosen = [0, rank], 1
    elif layers:
        _allocate(layers, budget_bytes)
    return layers, skipped


def split(graph: gs.Graph, nodes: list[gs.Node], *, fake_quant: Callable[[np.ndarray], np.ndarray], bits: float,
          act_noise: float = 0.0, rank: int = 0, budget: float = 0.1, progress: bool = True) -> dict:
    """Give each of `nodes` (the layers the quantizing pass will take) a low-rank branch, in place.
    `fake_quant(w_kn)` is the next pass's weight quantize-dequantize ([K, N], per output column), `bits` its
    weight width; `rank` > 0 fixes the rank, 0 chooses it per layer within `budget`. Returns the report."""
    t0 = time.perf_counter()
    check_rank(rank, budget)
    report = {"rank": rank or "auto", "budget": budget, "layers": {}, "skipped": {}}
    layers, report["skipped"] = _choose(nodes, lambda n: (fake_quant, bits, act_noise), rank, budget, progress)
    if not layers:
        if rank and report["skipped"]:
            raise OnnxoptError(f"--lowrank {rank}: no layer can take it ({next(iter(report['skipped'].values()))}); "
                               "give a rank below the smallest layer dimension")
        log.info("lowrank: no eligible layer")
        return report
    names = taken_names(graph)
    extra = 0
    for L in track(layers, total=len(layers), enabled=progress, desc="lowrank: write"):
        r = L.ranks[L.chosen]
        if not r:
            report["skipped"][L.node.name] = "no rank paid for itself within the budget"
            continue
        w = fold.weight_matrix(L.node)[0]
        u, s, vt = _svd(w)
        l1, l2, res = _factors(w.astype(np.float64), r, u, s, vt)
        entry = {"op": L.node.op, "K": L.k, "N": L.n, "rank": r, "extra_bytes": r * (L.k + L.n) * BRANCH_BYTES,
                 "energy": float(np.sum(s[:r] ** 2) / max(np.sum(s ** 2), 1e-30))}
        if L.errors:
            entry["model_error"] = [float(L.errors[0]), float(L.errors[L.chosen])]
        del u, s, vt, w
        _write(graph, L.node, l1.astype(np.float32), l2.astype(np.float32), res.astype(np.float32), names)
        extra += entry["extra_bytes"]
        report["layers"][L.node.name] = entry
    qbytes = sum(L.qbytes for L in layers)
    report.update(extra_bytes=int(extra), quantized_weight_bytes=int(qbytes),
                  extra_fraction=round(extra / max(qbytes, 1), 4), time_s=round(time.perf_counter() - t0, 3))
    log.info("lowrank: %d branch(es), %d extra bytes (%.1f%% of the %d quantized weight bytes)", len(report["layers"]),
             extra, 100 * extra / max(qbytes, 1), qbytes)
    return report


# The pass: lowrank's options as a recipe step (onnxopt.pass_protocol.Pass).
@dataclass
class LowRank(PassBase):
    """Before a QDQ (INT8/FP8), BlockFP (NVFP4/MXFP8 layers) or Int4 pass, splits each layer it will quantize into a 16-bit rank-r branch
    and a residual it quantizes. rank: a positive integer, or "auto" (per layer, within `budget` times the
    quantized weight bytes of those layers)."""
    rank: int | str = "auto"
    budget: float = 0.1
    name = "lowrank"

    def __post_init__(self):
        self.rank = parse_rank(self.rank)
        check_rank(self.rank, self.budget)

    def check_recipe(self, recipe, index: int) -> None:
        if not after(recipe, index, (StaticQuantizer, WeightOnlyQuantizer)):
            raise OnnxoptError("--lowrank needs a quantizing pass after it (--int8, --fp8, --int4, --nvfp4 or --mxfp8)")
        if any(isinstance(p, AWQ) for p in recipe):
            # AWQ's scales and rounded weights are searched for the whole weight, not the residual.
            raise OnnxoptError("--lowrank with --int4 needs --awq none (AWQ is not combined with the branch yet)")

    def run(self, ctx) -> dict:
        q = ctx.following(StaticQuantizer, self) or ctx.following(WeightOnlyQuantizer, self)
        hp = ctx.high_precision
        if isinstance(q, BlockQuantizer):  # block weights (e.g. NVFP4): the residual is written by the format's own writer
            nodes, f = q.block_nodes(ctx.graph), q.fmt
            bits, noise, block = f.bits, 0.0 if q.weight_only else act_noise(f), f.block_size
        elif isinstance(q, StaticQuantizer):
            nodes = q.plan(ctx.graph).nodes
            f = formats.get(q.mode)
            bits, noise, block = f.bits, act_noise(f), 0
        else:
            layers, _ = q.select(ctx.graph)
            f = formats.get(q.format)
            nodes = [n for n, b in layers if b != 8]
            bits, noise, block = f.bits, 0.0, q.block_size

        def fake(w_kn, f=f, block=block):  # the registry format's exact quantize-dequantize, per output column
            return f.fake_quant(w_kn, 1, hp, block_size=block)
        return split(ctx.graph, nodes, fake_quant=fake, bits=bits, act_noise=noise, rank=self.rank,
                             budget=self.budget, progress=ctx.progress)
