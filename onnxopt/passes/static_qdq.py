"""QDQ pass: INT8/FP8 W8A8. Plan where TensorRT fuses Q/DQ (quant.rules), calibrate activation ranges and
the bias-correction means in one pass over the data, insert Q/DQ, fold weight-quantization error into biases."""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .. import attention_guard, calib, einsum, formats
from ..cast import precision
from ..errors import OnnxoptError
from ..quant import calibration, feedback, prequantize, rules, shared_rounding, writer
from ..pass_protocol import StaticQuantizer, check_choice, check_regexes, one_quantizer

log = logging.getLogger(__name__)

MODES = formats.static()
ROUNDINGS = ("nearest", "feedback")
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class QDQ(StaticQuantizer):
    mode: str = formats.FP8.name       # a format with static activations: formats.static()
    calib_method: str | None = None    # "max" | "percentile" | "entropy" | "mse"; None = mode default
    percentile: float = 99.99
    exclude: tuple = ()                # regexes on node names left unquantized
    op_types: tuple = WEIGHT_OPS
    quantize_mha: bool = True          # Q/DQ on attention BMMs (Q·Kᵀ, softmax·V)
    bias_correction: bool = True       # fold -ΔW·E[x] of weight quantization into the bias
    shared_rounding: bool = True       # a weight read by several layers: rounded for all uses (quant.shared_rounding)
    shared_lead_high_precision: bool = True  # layers up to a shared weight's first use stay high precision (same module)
    weight_rounding: str | None = None  # "nearest" | "feedback" (GPTQ from calibration); None = the format's
    name = "qdq"
    # FP32 weight bytes from which weights are quantized during calibration (quant.prequantize); None: its default.
    # Not a dataclass field (no recipe option, reports unchanged): tests set it on an instance.
    prequantize_bytes = None
    min_opset = 19                     # FP16 scales on Q/DQ need opset 19
    quantizes = True

    def __post_init__(self):
        check_choice(self.mode, MODES, "Q/DQ mode")
        if self.calib_method is not None:
            check_choice(self.calib_method, calib.METHODS, "calibration method")
        if not 0.0 < self.percentile <= 100.0:
            raise OnnxoptError(f"percentile {self.percentile} is out of range; use a value in (0, 100], e.g. 99.99")
        self.exclude = check_regexes(self.exclude, "--exclude")
        if self.weight_rounding is not None:
            check_choice(self.weight_rounding, ROUNDINGS, "weight rounding")
        self.op_types = tuple(self.op_types)
        unknown = [o for o in self.op_types if o not in WEIGHT_OPS]
        if unknown or not self.op_types:
            raise OnnxoptError(f"--op-types {','.join(self.op_types) or '(empty)'}: use some of {','.join(WEIGHT_OPS)}")

    @property
    def method(self) -> str:
        return self.calib_method or formats.get(self.mode).calib_method

    @property
    def rounding(self) -> str:
        return self.weight_rounding or formats.get(self.mode).weight_rounding

    @property
    def needs_data(self) -> bool:
        return True

    def check_recipe(self, recipe, index: int) -> None:
        one_quantizer(recipe)

    def smoothing_plan(self, graph) -> rules.Plan:
        """Every layer the rules place, the shared-weight lead included: smoothing is exact in float, and a weight
        shared by a lead layer and later ones must get the same scale at every use to stay one tensor."""
        return rules.plan(graph, self)

    def plan(self, graph) -> rules.Plan:
        """Where the rules place this pass's Q/DQ in `graph` (what SmoothQuant and LowRank before it prepare)."""
        place = rules.plan(graph, self)
        lead = shared_rounding.leading_layers(graph, place) if self.shared_lead_high_precision else []
        if not lead:
            return place
        place = rules.plan(graph, dataclasses.replace(self, exclude=self.exclude + tuple(f"^{re.escape(n)}$" for n in lead)))
        for name in lead:
            place.skipped[name] = shared_rounding.LEAD_REASON
        log.info("%d layers before or at the first use of shared weights kept high precision", len(lead))
        return place

    def run(self, ctx) -> dict:
        graph = ctx.graph
        ctx.require_data(f"--{self.mode}")
        einsums = einsum.rewrite(graph)  # Einsum attention as MatMul: the rules and TensorRT's MHA fusion see it
        guards = attention_guard.remove(graph) if self.quantize_mha else 0  # they keep TensorRT from fusing quantized MHA
        plan = self.plan(graph)
        if not plan.nodes:
            reasons = sorted(set(plan.skipped.values()))[:3]
            raise OnnxoptError("nothing to quantize: no Conv, ConvTranspose, MatMul or Gemm passes the placement rules"
                               + (f" ({'; '.join(reasons)})" if reasons else "") + "; nothing was written")
        bmm = sum(1 for n in plan.nodes if n.op == "MatMul" and not _has_weight(n))
        t0 = time.perf_counter()
        fb = (feedback.Feedback.plan(plan, len(ctx.data), ctx.memory_budget_mb) if self.rounding == "feedback"
              else None)
        # Error-fed codes need calibration's Hessians; nearest-rounded ones are computed meanwhile (issue 25). Also on
        # the CPU provider: its sessions leave cores idle often enough (dev box, full-size SDXL: calibrate +11-18 s,
        # write -16-19 s).
        pre = None if fb else prequantize.Prequantized.start(
            graph, self.mode, plan, high_precision=ctx.high_precision, threads=ctx.threads,
            **({} if self.prequantize_bytes is None else {"min_bytes": self.prequantize_bytes}))
        try:
            amax, means, hessians = self.calibrate(ctx, plan, fb.reducers if fb else None)
        except BaseException:
            if pre is not None:
                pre.cancel()
            raise
        t1 = time.perf_counter()
        qplan = writer.QuantPlan.uniform(self.mode, plan, amax, means, hessians=hessians or {})
        quantized, fb_report = (fb.quantize(graph, qplan, high_precision=ctx.high_precision, threads=ctx.threads)
                                if fb else (None, None))
        if pre is not None:
            quantized = pre.finish(graph, qplan, high_precision=ctx.high_precision, threads=ctx.threads)
        layers = writer.write(graph, qplan, high_precision=ctx.high_precision, threads=ctx.threads, quantized=quantized)
        # Layers whose weight scales underflow FP16 keep FP32 scales; autocast leaves them in FP32.
        fp32_scale = [n for n, info in layers.items() if "fp32_scale" in info]
        ctx.fp32_nodes.extend(fp32_scale)
        timings = {"calibrate": t1 - t0, "insert": time.perf_counter() - t1}
        log.info("quantized %d layers (%d activations, %d weights), skipped %d", len(plan.nodes),
                 len(plan.activations), len(plan.weights), len(plan.skipped))
        return {"mode": self.mode, "method": self.method,
                "layers": {n.name: {"op": n.op, **layers.get(n.name, {})} for n in plan.nodes},
                "activations": {k: float(v) for k, v in amax.items()}, "skipped": plan.skipped,
                "coverage": {"quantized": len(plan.nodes), "skipped": len(plan.skipped), "attention_bmms": bmm},
                "attention_guards_removed": guards, "einsum_rewritten": einsums, "fp32_scale_layers": fp32_scale,
                "unshared_scales": [{"tensors": list(t), "reason": r} for t, r in plan.unshared],
                "weight_rounding": self.rounding, **({"error_feedback": fb_report} if fb_report else {}),
                "timings_s": timings}

    def _insert(self, graph: gs.Graph, plan, amax: dict, means: dict, hp: str, threads: int = 0,
                hessians: dict | None = None) -> dict:
        return writer.write(graph, writer.QuantPlan.uniform(self.mode, plan, amax, means, hessians=hessians or {}),
                            high_precision=hp, threads=threads)

    def calibrate(self, ctx, plan, extra: dict | None = None):
        """Clip range of each planned activation, by the configured method (Concat groups share the largest),
        and, for bias correction, the per-channel mean of each weighted layer's input; with `shared_rounding` the
        Hessian of each weight read by several layers, summed over its uses. One pass over the data,
        which also feeds `ctx.extra_reducers` and the ranges range-aware autocast asks for (`ctx.range_reducers`)."""
        cp = calibration.plan({self.mode: plan}, {self.mode: self.method}, provider=ctx.provider,
                              percentile=self.percentile, bias_correction_means=self.bias_correction)
        reducers = cp.reducers()
        # the summed Hessians within half the memory budget (the other half: whole activations of the pass)
        feeds, shared = (shared_rounding.hessian_reducers(plan, ctx.memory_budget_mb * 2**20 // 2)
                         if self.shared_rounding else ({}, {}))
        for n, rs in feeds.items():
            reducers.setdefault(n, []).extend(rs)
        for n, rs in ctx.extra_reducers.items():
            reducers.setdefault(n, []).extend(rs)
        for n, rs in (extra or {}).items():  # error feedback's Hessians (quant.feedback)
            reducers.setdefault(n, []).extend(rs)
        if ctx.measure_ranges:  # range-aware autocast's max |x| of every float tensor, in this same pass
            ctx.range_reducers = precision.range_reducers(ctx.graph)
            for n, rs in ctx.range_reducers.items():
                reducers.setdefault(n, []).extend(rs)
        calib.collect_graph(ctx.graph, ctx.data, reducers, provider=ctx.provider,
                            memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
        return cp.amax()[self.mode], cp.mean_values(), shared_rounding.hessian_values(shared)


def _has_weight(node: gs.Node) -> bool:
    return rules.is_weight(node.inputs[1])
