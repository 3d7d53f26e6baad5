"""N:M structured sparsity (2:4 for TensorRT's sparse tensor cores) of Conv/ConvTranspose/MatMul/Gemm weights.

TensorRT runs a layer on sparse tensor cores when every group of 4 consecutive weights along the input-channel
(reduction) axis holds at least 2 zeros. Two methods choose which weights go:
- magnitude: keep the 2 largest |w| of each group of 4;
- sparsegpt: SparseGPT (Frantar & Alistarh 2023). With H = XᵀX of the layer input (streamed from calibration
  data), choose the mask by w²/diag(H⁻¹)² per group and update the kept weights of each row with the
  optimal-brain-surgeon step, which minimises the layer-output error. Layers are pruned in stages in
  topological order, each stage calibrated on the graph whose earlier layers are already pruned; a stage holds
  only the Hessians of its own layers (under the memory budget); see `sparsegpt`.
Patterns and weight finding live in `sparsity_layers`, the 2:4 report (inspect) in `sparsity_report`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import re
import time

import numpy as np
import onnx_graphsurgeon as gs

from ..toposort import toposort
from .. import calib
from .. import graph as G
from .. import modelfile
from ..errors import OnnxoptError
from .sparsegpt import plan as _sparsegpt_plan
from .sparsegpt import run as _run_sparsegpt
from .sparsegpt import sparsegpt_prune
from .sparsity_layers import (dq_fields, effective_nonzero, groups_ok, other_uses, Unit, Use, weight_layers,
                              dq_parts, is_2_4, is_n_m, keep_mask, parse_pattern)
from .sparsity_report import format_report, report, summary
from ..settings import MEMORY_BUDGET_MB
from ..pass_protocol import PassBase, check_choice, check_regexes

__all__ = ["METHODS", "sparsify", "parse_pattern", "is_n_m", "is_2_4", "keep_mask", "sparsegpt_prune",
           "report", "summary", "format_report"]

log = logging.getLogger(__name__)

METHODS = ("magnitude", "sparsegpt")


def _plan(graph, n, m, exclude, min_params):
    """Per-layer rows for the report and the units (initializers) to prune."""
    rows, units = {}, {}
    for node, const, chain, axis, reason in weight_layers(graph):
        params = int(np.prod(const.shape))
        row = {"name": node.name, "op": node.op, "weight": const.name, "shape": [int(d) for d in const.shape],
               "axis": axis, "params": params, "status": "skipped", "method": None, "reason": reason}
        rows[id(node)] = row
        if reason is None and const.shape[axis] % m:
            row["reason"] = f"input-channel axis has {const.shape[axis]} channels, not a multiple of {m}"
        if reason is None and any(r.search(node.name or "") for r in exclude):
            row["reason"] = "excluded by --exclude"
        unit = units.setdefault(id(const), Unit(const))
        unit.uses.append(Use(node, chain, axis))
    for unit in units.values():
        urows = [rows[id(u.node)] for u in unit.uses]
        bad = next((r for r in urows if r["reason"]), None)
        if bad is not None:
            unit.skip = bad["reason"] if len(urows) == 1 else f"shared initializer; layer {bad['name']}: {bad['reason']}"
        elif len({u.axis for u in unit.uses}) > 1:
            unit.skip = "shared initializer used along different input-channel axes"
        elif len({id(next((p for p in u.chain if p.op == "DequantizeLinear"), None)) for u in unit.uses}) > 1:
            unit.skip = "shared initializer behind different DequantizeLinear nodes"
        elif (other := other_uses(graph, unit.const)):
            unit.skip = f"initializer also feeds {other[0]}"
        elif urows[0]["params"] < min_params:
            unit.skip = f"{urows[0]['params']} weights < min_params {min_params}: too small to gain"
        elif unit.dq is not None and dq_parts(unit.dq) is None:
            unit.skip = "DequantizeLinear scale or zero point is not an initializer"
        elif unit.dq is not None and unit.dq.inputs[0] is not unit.const:
            unit.skip = "DequantizeLinear does not read the initializer directly"
        if unit.skip:
            for r in urows:
                r["reason"] = r["reason"] or unit.skip
    return rows, list(units.values())


# ---------------------------------------------------------------- magnitude
def _prune_magnitude(unit: Unit, n: int, m: int) -> None:
    v = np.array(G.read_values(unit.const), copy=True)
    if unit.dq is not None:
        s, z = dq_fields(unit.dq, v)
        score = np.abs(v.astype(np.float32) - np.asarray(z).astype(np.float32)) * np.abs(s)
        keep = keep_mask(score, unit.axis, n, m)
        v[~keep] = np.asarray(z)[~keep]  # the zero point dequantizes to exactly 0
    else:
        score = np.abs(v.astype(np.float32))
        keep = keep_mask(score, unit.axis, n, m)
        v[~keep] = 0
    modelfile.set_values(unit.const, v)


# ---------------------------------------------------------------- the pass
def sparsify(graph: gs.Graph, *, pattern: str = "2:4", method: str = "magnitude", data: calib.CalibData | None = None,
             exclude=(), min_params: int = 4096, damp: float = 0.01, block: int = 128, provider: str = "cpu",
             memory_budget_mb: int = MEMORY_BUDGET_MB, progress: bool = True, sequential: bool = True) -> dict:
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
    toposort(graph)
    rows, units = _plan(graph, n, m, regexes, min_params)
    todo = []
    for unit in units:
        if unit.skip:
            continue
        if groups_ok(effective_nonzero(unit.const, unit.dq), unit.axis, n, m):
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


# The pass: sparsity's options as a recipe step (onnxopt.pass_protocol.Pass).
@dataclass
class Sparsify(PassBase):
    pattern: str = "2:4"
    method: str = "magnitude"        # "magnitude" | "sparsegpt" (needs calibration data)
    exclude: tuple = ()              # regexes on node names left dense
    min_params: int = 4096           # skip weights with fewer values
    damp: float = 0.01               # SparseGPT damping, a fraction of mean diag(H)
    block: int = 128                 # SparseGPT lazy-update block (columns)
    sequential: bool = True          # SparseGPT: calibrate each stage on the already pruned graph
    name = "sparsity"

    def __post_init__(self):
        n, m = parse_pattern(self.pattern)
        check_choice(self.method, METHODS, "--sparsity-method")
        self.exclude = check_regexes(self.exclude, "--exclude")
        if self.min_params < 0:
            raise OnnxoptError(f"--min-params must be >= 0, got {self.min_params}")
        if self.damp < 0:
            raise OnnxoptError(f"--damp must be >= 0, got {self.damp}")
        if self.block <= 0 or self.block % m:
            raise OnnxoptError(f"--block must be a positive multiple of {m}, got {self.block}")

    @property
    def needs_data(self) -> bool:
        return self.method == "sparsegpt"

    def run(self, ctx) -> dict:
        data = ctx.require_data("--sparsity-method sparsegpt") if self.needs_data else ctx.data
        return sparsify(ctx.graph, pattern=self.pattern, method=self.method, data=data, exclude=self.exclude,
                                 min_params=self.min_params, damp=self.damp, block=self.block,
                                 provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress,
                                 sequential=self.sequential)
