"""Low-rank branch candidates of --auto (SVDQuant, onnxopt.rewrite.lowrank). A layer that can take a branch gets,
for each of its 8-bit or block candidates F, the candidate "F+lr": W = L1·L2 + R with the rank-r part L1·L2 in 16 bits
reading the unquantized input and the residual R quantized in F. One set of factors per (layer, candidate) serves the
gated graph (gated.py), the residual's AWQ (block formats, `block_awq`) and the written graph (`split`), so the search
measures what is written; the branch's bytes and MACs are part of the candidate's cost (Layer.weight_bits,
Layer.activation_bits)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import formats, modelfile
from ..rewrite import fold, lowrank
from ..graph import taken_names
from ..quant.writer import Smooth
from .block_helpers import GAIN, block_awq as _base_block_awq, input_samples, smoothing_scales
from .candidates import BRANCH, Branch, Candidates, Layer, base_format, has_branch
from .groups import sole_leader


def takes_branch(fmt: str) -> bool:
    """Whether a residual in candidate format `fmt` may sit beside a branch: per-tensor static W8A8 formats with
    their own plan and block formats with dynamic activations (not int8-sq's smoothing, not weight-only INT4)."""
    f = formats.get(fmt)
    return f.quantized and not f.base and (f.activations == "dynamic" or (f.planned and f.activations == "static"))


def add_candidates(graph: gs.Graph, cands: Candidates, *, rank: int, budget: float, high_precision: str,
                   progress: bool = True) -> dict:
    """Add "F+lr" candidates (and each layer's Branch) to the layers of `cands` that can take a branch; a rank of 0
    chooses it per layer (lowrank.choose_ranks, data-free, the layer's lowest-bit candidate, within `budget`).
    Tied layers (a group) take none, but for a group's sole leader (an attention block's reader). Returns {layer: why it takes none} for the layers with a branchable format."""
    nodes = {n.name: n for n in graph.nodes}
    # A Conv feeding a residual Add: split, it would no longer feed the Add, and the rules would quantize the Add's
    # other input for another layer (or not at all), which no per-layer gate can model.
    residual = {t.inputs[0].name for p in cands.plans.values() for add, _ in p.residuals for t in add.inputs if t.inputs}
    todo, why = [], {}
    for name, l in cands.layers.items():
        fmts = [f for f in l.formats if f != "none" and takes_branch(f)]
        if not fmts:
            continue
        if not l.wshape:
            why[name] = "no constant weight (e.g. an attention BMM)"
            continue
        if l.group and not sole_leader(name, cands.layers):  # an attention block's reader decides alone
            why[name] = "tied to other layers (one weight, several readers)"
            continue
        if name in residual:
            why[name] = "feeds a residual Add (with the branch the rules would quantize that Add differently)"
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
        b = Branch(*lowrank.factors(nodes[name], r))
        l.branch = {f + BRANCH: b for f in l.formats if f != "none" and takes_branch(f)}
        l.formats = l.formats + list(l.branch)
    return why


def split(graph: gs.Graph, mix: dict, cands: Candidates) -> int:
    """Give every layer whose choice in `mix` carries the branch its branch, in place (lowrank.attach with the
    factors the search measured). Returns the number of branches."""
    names = taken_names(graph)
    done = 0
    for node in list(graph.nodes):
        f = mix.get(node.name)
        if f is not None and has_branch(f):
            b = cands.layers[node.name].branch[f]
            lowrank.attach(graph, node, b.l1, b.l2, names)
            done += 1
    return done


def block_awq(graph: gs.Graph, data, cands: Candidates, *, high_precision: str, provider: str,
              memory_budget_mb: int, progress: bool, smooth: bool = True) -> None:
    """The W4A4 helpers of every block-format branch candidate ("nvfp4+lr"): with `smooth`, SVDQuant's order (x ⊘ s,
    the branch from the SVD of s ⊙ W, s chosen per layer with the branch in the simulated output error, `smooth_branch`);
    then AWQ's clip search and error-feedback rounding of the residual, on a copy of `graph` with those layers split.
    Results under (layer, candidate) in `cands.block_smooth` / `cands.block_clips`, the new factors in Layer.branch."""
    wanted = sorted({f for l in cands.layers.values() for f in l.formats
                     if has_branch(f) and formats.get(base_format(f)).activations == "dynamic"
                     and formats.get(base_format(f)).awq})
    if not wanted:
        return
    nodes = {n.name: n for n in graph.nodes if n.name in cands.layers}
    for cand in wanted:
        fmt = formats.get(base_format(cand))
        mine = [nodes[n] for n, l in cands.layers.items() if cand in l.formats]
        if smooth and fmt.calib_method:
            stats = input_samples(graph, data, mine, provider, memory_budget_mb, progress)
            for node in mine:
                cmax, rows = stats[node.inputs[0].name]
                if cmax is None or not len(rows):
                    continue
                l = cands.layers[node.name]
                found = smooth_branch(rows, cmax, fold.weight_matrix(node)[0], l.branch[cand].rank, fmt)
                if found is not None:
                    l.branch[cand], cands.block_smooth[(node.name, cand)] = found
        copy = modelfile.import_graph(modelfile.export_graph(graph))
        split(copy, {n.name: cand for n in mine}, cands)
        # the base format's helpers on the residual (prescaled by the smoothing chosen here), stored under the branch
        sub = Candidates({n.name: Layer(n.name, n.op, ["none", fmt.name], {}) for n in mine}, {}, {})
        sub.block_smooth = {(n, fmt.name): sm for (n, c), sm in cands.block_smooth.items() if c == cand}
        _base_block_awq(copy, data, sub, [fmt.name], high_precision=high_precision, provider=provider,
                        memory_budget_mb=memory_budget_mb, progress=progress, smooth=False)
        cands.block_clips.update({(n, cand): c for (n, _), c in sub.block_clips.items()})
        del copy


def smooth_branch(rows: np.ndarray, cmax: np.ndarray, w_kn: np.ndarray, rank: int, fmt):
    """(Branch, Smooth) of SVDQuant's order with the least simulated output error on `rows` (x ⊘ s and the residual
    of s ⊙ W quantized in `fmt`, the branch of s ⊙ W reading x ⊘ s, i.e. x through L1 ⊘ s), or None when no
    smoothing beats the unsmoothed branch by block_helpers.GAIN."""
    w_kn = w_kn.astype(np.float32)
    y = rows @ w_kn
    norm = max(float(np.sum(y.astype(np.float64) ** 2)), 1e-30)

    def trial(s):
        ones = s is None
        s = np.ones(len(cmax), np.float32) if ones else s
        l1, l2 = lowrank.factors_of(w_kn * s[:, None], rank)
        l1 = (l1 / s[:, None]).astype(np.float16).astype(np.float32)  # the branch reads x: L1 ⊘ s, stored in 16 bits
        res = lowrank.residual(w_kn, l1, l2)
        amax = float((cmax / s).max())
        yq = fmt.fake_quant_activation(rows / s, amax) @ fmt.fake_quant(res * s[:, None], 1, "fp32") + (rows @ l1) @ l2
        err = float(np.sum((yq - y).astype(np.float64) ** 2)) / norm
        return err, Branch(l1, l2), (None if ones else Smooth(s, amax, 0.0))
    best = trial(None)
    plain = best[0]
    for a, s in smoothing_scales(cmax, w_kn):
        t = trial(s)
        if t[0] < best[0]:
            best = (t[0], t[1], Smooth(t[2].s, t[2].amax, a))
    if best[2] is None or best[0] > plain * GAIN:
        return None
    return best[1], best[2]
