"""Low-rank branch candidates of --auto (SVDQuant, onnxopt.lowrank). A layer that can take a branch gets, for
each of its 8-bit or block candidates F, the candidate "F+lr": W = L1·L2 + R with the rank-r part L1·L2 in 16 bits
reading the unquantized input and the residual R quantized in F. One set of factors per layer serves the gated
graph (gated.py), the residual's AWQ (block formats, `block_awq`) and the written graph (`split`), so the search
measures what is written; the branch's bytes and MACs are part of the candidate's cost (Layer.weight_bits,
Layer.activation_bits)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import fold, formats, lowrank, modelfile
from ..graph import taken_names
from .block_helpers import block_awq as _base_block_awq
from .candidates import BRANCH, Branch, Candidates, Layer, base_format, has_branch


def takes_branch(fmt: str) -> bool:
    """Whether a residual in candidate format `fmt` may sit beside a branch: per-tensor static W8A8 formats with
    their own plan and block formats with dynamic activations (not int8-sq's smoothing, not weight-only INT4)."""
    f = formats.get(fmt)
    return f.quantized and not f.base and (f.activations == "dynamic" or (f.planned and f.activations == "static"))


def add_candidates(graph: gs.Graph, cands: Candidates, *, rank: int, budget: float, high_precision: str,
                   progress: bool = True) -> dict:
    """Add "F+lr" candidates (and each layer's Branch) to the layers of `cands` that can take a branch; a rank of 0
    chooses it per layer (lowrank.choose_ranks, data-free, the layer's lowest-bit candidate, within `budget`).
    Tied layers (a group) take none. Returns {layer: why it takes none} for the layers with a branchable format."""
    nodes = {n.name: n for n in graph.nodes}
    todo, why = [], {}
    for name, l in cands.layers.items():
        fmts = [f for f in l.formats if f != "none" and takes_branch(f)]
        if not fmts:
            continue
        if l.group:
            why[name] = "tied to other layers (one weight, several readers)"
            continue
        todo.append(nodes[name])

    def spec(node):  # the layer's lowest-bit branchable candidate: what the rank choice models
        f = formats.get(min((f for f in cands.layers[node.name].formats if f != "none" and takes_branch(f)),
                            key=lambda f: formats.get(f).bits))
        block = f.block_size if f.weights == "per-block" else 0
        noise = 0.0 if f.activations == "none" else lowrank.act_noise(f)
        return (lambda w_kn: f.fake_quant(w_kn, 1, high_precision, block_size=block)), f.bits, noise
    ranks, skipped = lowrank.choose_ranks(todo, spec, rank=rank, budget=budget, progress=progress)
    why.update(skipped)
    for name, r in ranks.items():
        l = cands.layers[name]
        l.branch = Branch(*lowrank.factors(nodes[name], r))
        l.formats = l.formats + [f + BRANCH for f in l.formats if f != "none" and takes_branch(f)]
    return why


def residual_weight(node: gs.Node, branch: Branch) -> np.ndarray:
    """R = W - L1·L2 in the layout the layer consumes its weight, float32 (what the writer quantizes)."""
    return lowrank.layer_weight(node, lowrank.residual(fold.weight_matrix(node)[0], branch.l1, branch.l2))


def split(graph: gs.Graph, mix: dict, cands: Candidates) -> int:
    """Give every layer whose choice in `mix` carries the branch its branch, in place (lowrank.attach with the
    factors the search measured). Returns the number of branches."""
    names = taken_names(graph)
    done = 0
    for node in list(graph.nodes):
        f = mix.get(node.name)
        if f is not None and has_branch(f):
            b = cands.layers[node.name].branch
            lowrank.attach(graph, node, b.l1, b.l2, names)
            done += 1
    return done


def block_awq(graph: gs.Graph, data, cands: Candidates, *, high_precision: str, provider: str,
              memory_budget_mb: int, progress: bool, smooth: bool = False) -> None:
    """AWQ's clip search and error-feedback rounding of the residual of every block-format branch candidate
    ("nvfp4+lr"-style), on a copy of `graph` with those layers split, into `cands.block_clips[(layer, cand)]`."""
    wanted = sorted({f for l in cands.layers.values() for f in l.formats
                     if has_branch(f) and formats.get(base_format(f)).activations == "dynamic"})
    if not wanted:
        return
    copy = modelfile.import_graph(modelfile.export_graph(graph))
    split(copy, {n: wanted[0] for n, l in cands.layers.items() if l.branch is not None
                 and any(f in l.formats for f in wanted)}, cands)
    for cand in wanted:  # the base format's helpers on the residual, stored under the branch candidate
        f = base_format(cand)
        sub = Candidates({n: Layer(n, l.op, ["none", f], {}) for n, l in cands.layers.items() if cand in l.formats}, {}, {})
        _base_block_awq(copy, data, sub, [f], high_precision=high_precision, provider=provider,
                        memory_budget_mb=memory_budget_mb, progress=progress, smooth=smooth)
        for (n, g), c in sub.block_clips.items():
            cands.block_clips[(n, cand)] = c
        for (n, g), sm in sub.block_smooth.items():
            cands.block_smooth[(n, cand)] = sm
    del copy
