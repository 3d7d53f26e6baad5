"""Candidate formats of every weighted layer (the TensorRT placement rules decide) and the one calibration pass
whose statistics every candidate reuses."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import calib, formats
from ..rewrite import fold, smoothquant
from .. import graph as G
from ..quant import calibration, rules
from ..quant import int4_weights as int4q
from . import smooth

FORMATS = formats.auto_candidates()
PLANNED = formats.static()               # formats with a QDQ plan of their own (int8-sq uses INT8's)
WBITS = formats.weight_bits()            # --auto's cost of each candidate, "none" (FP16) included
ABITS = formats.activation_bits()        # weight-only formats keep FP16 activations
GATES = "autoquant_gates"
BRANCH = "+lr"                           # a candidate with the low-rank branch: "<format>+lr" (autoquant/branch.py)
BRANCH_BITS = 16                         # the branch's factors are stored in 16 bits


def base_format(cand: str) -> str:
    """The registered format (or "none") of a candidate: a branch candidate's residual format."""
    return cand[:-len(BRANCH)] if cand.endswith(BRANCH) else cand


def has_branch(cand: str) -> bool:
    """Whether the candidate `cand` carries the low-rank branch."""
    return cand.endswith(BRANCH)


@dataclass
class Branch:
    """A layer's low-rank branch (onnxopt.lowrank): W = L1·L2 + R, L1 [K, r] and L2 [r, N] FP16-rounded."""
    l1: np.ndarray
    l2: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.l1.shape[1])

    @property
    def params(self) -> int:
        """Parameters of L1 and L2: r·(K + N)."""
        return int(self.l1.size + self.l2.size)

    def mac_ratio(self) -> float:
        """Branch MACs per layer MAC: r·(K + N) / (K·N)."""
        return self.params / float(self.l1.shape[0] * self.l2.shape[1])


@dataclass
class Layer:
    name: str
    op: str
    formats: list                       # candidate formats, "none" first
    reasons: dict                       # format -> why it is not a candidate
    params: int = 0
    wshape: tuple = ()                  # the weight as the layer consumes it (empty for attention BMMs)
    trans_b: bool = False
    macs: float = 0.0
    error: dict = field(default_factory=dict)   # format -> measured 1 - cosine (only this layer quantized)
    group: str = ""                     # layers of one group take one format (autoquant.groups)
    follows: bool = False               # in its group, takes the group's format where it can, else FP16 (groups.member_format)
    branch: dict = field(default_factory=dict)  # "+lr" candidate -> its low-rank Branch

    def weight_bits(self, cand: str) -> float:
        """Weight bits of the layer in candidate `cand` (the branch's 16-bit factors included)."""
        b = self.branch.get(cand)
        return WBITS[base_format(cand)] * self.params + (BRANCH_BITS * b.params if b is not None else 0.0)

    def branch_macs(self, cand: str) -> float:
        """The 16-bit MACs the branch of `cand` adds (0 without one)."""
        b = self.branch.get(cand)
        return self.macs * b.mac_ratio() if b is not None else 0.0

    def activation_bits(self, cand: str) -> float:
        """Activation bits times MACs of the layer in `cand` (the branch's MACs at 16 bits)."""
        return ABITS[base_format(cand)] * self.macs + BRANCH_BITS * self.branch_macs(cand)


@dataclass
class Candidates:
    layers: dict                        # name -> Layer, graph order
    plans: dict                         # format -> rules.Plan (8-bit formats)
    configs: dict                       # format -> the QDQ options its plan was made with
    clips: dict = field(default_factory=dict)   # INT4 layer -> AWQ clip ratios per block
    block_clips: dict = field(default_factory=dict)  # (layer, block format) -> AWQ clip ratios or error-fed codes
    block_smooth: dict = field(default_factory=dict)  # (layer, block format) -> quant.writer.Smooth (W4A4 scaling)
    int4: set = field(default_factory=set)      # names of layers that may take INT4 weights
    smooth: dict = field(default_factory=dict)  # int8-sq: activation -> smooth.Smoothing
    sq_groups: list = field(default_factory=list)  # int8-sq: smoothquant groups of the INT8 plan

    def clip_of(self, layer: str, fmt: str):
        """The AWQ result the writer and the gated graph quantize `layer`'s weight in `fmt` with (None: plain)."""
        if fmt == "none":
            return None
        if formats.get(base_format(fmt)).block_weight:
            return self.block_clips.get((layer, fmt))
        return self.clips.get(layer)

    def smooth_of(self, layer: str, fmt: str):
        """The input scaling `layer` takes in `fmt` (None: none)."""
        return self.block_smooth.get((layer, fmt))


# ---------------------------------------------------------------- candidates
def candidates(graph: gs.Graph, fmts_wanted, configs: dict, block_size: int) -> Candidates:
    """Candidate formats of every weighted layer; `configs` maps each planned 8-bit format to its QDQ options
    (int8-sq needs INT8's)."""
    plans = {f: rules.plan(graph, configs[f]) for f in PLANNED if f in configs}
    in_plan = {f: {n.name for n in p.nodes} for f, p in plans.items()}
    sq_groups = []
    if smooth.SQ in fmts_wanted:
        sq_groups = smooth.groups(graph, plans[smooth.BASE], in_plan[smooth.BASE])
        in_plan[smooth.SQ] = {n.name for g in sq_groups for n in g.layers}
    int4_ok, int4_skip = set(), {}
    if any(not formats.get(f).planned and not formats.get(f).base and not formats.get(f).block_weight
           for f in fmts_wanted):  # chosen layer by layer
        cfg = next(iter(configs.values()))
        sel, int4_skip = int4q.select_layers(graph, exclude=cfg.exclude, op_types=cfg.op_types)
        int4_ok = {n.name for n, _ in sel}
    layers = {}
    for node in graph.nodes:
        if node.op not in G.WEIGHT_OPS:
            continue
        fmts, reasons = ["none"], {}
        for f in fmts_wanted:
            if f == smooth.SQ:
                ok = node.name in in_plan[f]
                why = plans[smooth.BASE].skipped.get(node.name, "no constant weight reading a smoothable activation")
            elif f in plans:
                ok = node.name in in_plan[f]
                why = plans[f].skipped.get(node.name, "not planned")
            elif formats.get(f).block_weight:  # block formats: FP8's placement, then their own rules (as BlockFP)
                fp8, bf = formats.FP8.name, formats.get(f)
                why = (plans[fp8].skipped.get(node.name, "not planned") if node.name not in in_plan[fp8]
                       else rules.block_format_reason(node, bf.block_size, f.upper(),
                                                      dynamic_activations=bf.activations == "dynamic"))
                ok = why is None
            else:
                ok = node.name in int4_ok
                why = int4_skip.get(node.name, "weight-only formats are for MatMul/Gemm weights only")
            if ok:
                fmts.append(f)
            else:
                reasons[f] = why
        wshape = tuple(int(d) for d in fold.effective_shape(node)) if rules.is_weight(node.inputs[1]) else ()
        layers[node.name] = Layer(node.name, node.op, fmts, reasons, int(np.prod(wshape)) if wshape else 0, wshape,
                                  bool(node.attrs.get("transB", 0)))
    return Candidates(layers, plans, {f: configs[f] for f in plans}, int4=int4_ok, sq_groups=sq_groups)


def calibrate(graph: gs.Graph, data, cands: Candidates, *, provider: str, memory_budget_mb: int, progress: bool,
              extra: dict | None = None):
    """Activation ranges per 8-bit format (Concat groups share the largest) and bias-correction means, in
    one pass over `data`, which also feeds the `extra` reducers ({tensor: [reducer]}).
    Returns ({format: {tensor: amax}}, {tensor: channel mean})."""
    cp = calibration.plan(cands.plans, {f: formats.get(f).calib_method for f in cands.plans}, provider=provider)
    reducers: dict[str, list] = {n: list(rs) for n, rs in (extra or {}).items()}
    for n, rs in cp.reducers().items():
        reducers.setdefault(n, []).extend(rs)
    if cands.sq_groups:
        smooth.add_reducers(cands.sq_groups, reducers, min(smoothquant.SEARCH_BATCHES, len(data)))
    calib.collect_graph(graph, data, reducers, provider=provider, memory_budget_mb=memory_budget_mb,
                        progress=progress, desc="calibrating (once, all candidates)")
    if cands.sq_groups:
        cands.smooth = smooth.finish(cands.sq_groups)
    return cp.amax(), cp.mean_values()




