"""BlockFP pass: NVFP4 (W4A4 or weight-only W4A16) or MXFP8 on every MatMul/Gemm the block-format rules allow
(quant.rules.block_format_reason), FP8 W8A8 on the other layers the FP8 rules allow (convolutions, attention
BMMs, K not a multiple of the block, tiny GEMMs), FP16 elsewhere. The formats' ONNX forms are in
onnxopt.formats.nvfp4 / .mxfp8; activation ranges (NVFP4's per-tensor scales, FP8's) come from one calibration
pass (max by default). The graph is raised to opset 23 (FLOAT4E2M1)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import attention_guard, formats
from ..rewrite import awq
from .. import graph as G
from ..errors import OnnxoptError
from ..rewrite.fold import effective_shape, effective_weight
from ..quant import rules
from ..pass_protocol import BlockQuantizer, check_choice
from .static_qdq import QDQ

log = logging.getLogger(__name__)

FORMATS = tuple(n for n in formats.names() if formats.get(n).activations == "dynamic")  # nvfp4, mxfp8


@dataclass
class BlockFP(QDQ, BlockQuantizer):
    mode: str = FORMATS[0]             # a dynamic block format: "nvfp4" | "mxfp8"
    weight_only: bool = False          # NVFP4 weights, FP16 activations (W4A16); no FP8 layers, no calibration
    awq: str = "none"                  # "lite" | "clip" | "full": AWQ (onnxopt.rewrite.awq) with this format's quantizer
    name = "blockfp"
    FORMATS = FORMATS
    min_opset = 23                     # FLOAT4E2M1 initializers and DequantizeLinear-23

    def __post_init__(self):
        check_choice(self.mode, FORMATS, "block format")
        check_choice(self.awq, ("none", "lite", "clip", "full"), "--awq for block formats")
        if self.weight_only and not formats.get(self.mode).weight_only_variant:
            with_wo = "/".join("--" + m for m in formats.with_weight_only_variant())
            raise OnnxoptError(f"--weight-only goes with {with_wo} ({self.mode.upper()} quantizes activations at run time)")
        self.fmt = formats.get(self.mode)
        self._as_fp8(super().__post_init__)  # the FP8 rules and calibration of the QDQ pass plan the rest


    def block_reason(self, node) -> str | None:
        """None when `node` takes this pass's block format, else why not (quant.rules)."""
        return rules.block_format_reason(node, self.fmt.block_size, self.fmt.name.upper(),
                                         dynamic_activations=not self.weight_only)

    def block_nodes(self, graph) -> list:
        """The layers this pass will write in its block format (what the LowRank pass before it splits)."""
        return [n for n in self._as_fp8(rules.plan, graph, self).nodes
                if self.block_reason(n) is None]

    @property
    def needs_data(self) -> bool:
        return not self.weight_only

    def run(self, ctx) -> dict:
        graph = ctx.graph
        fmt = self.fmt
        if not self.weight_only:
            ctx.require_data(f"--{self.mode}")
        guards = attention_guard.remove(graph) if self.quantize_mha and not self.weight_only else 0
        plan = self._as_fp8(rules.plan, graph, self)
        clips, awq_report = {}, None
        if self.awq != "none" and ctx.data is None:
            log.info("no calibration data: AWQ %s skipped (pass --calib to search the scales and clips)", self.awq)
        elif self.awq != "none":  # AWQ's search with this format's quantizer; scales fold into the graph, so plan again
            layers = [(n, fmt) for n in plan.nodes if self.block_reason(n) is None]
            awq_report, clips = awq.apply(graph, ctx.require_data(f"--awq {self.awq}"), layers, method=self.awq,
                                          block_size=fmt.block_size, high_precision=ctx.high_precision, provider=ctx.provider,
                                          memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
            plan = self._as_fp8(rules.plan, graph, self)
        block_nodes, fp8_nodes, reasons = [], [], {}
        for n in plan.nodes:
            why = self.block_reason(n)
            (fp8_nodes if why else block_nodes).append(n)
            if why:
                reasons[n.name] = why
        if not block_nodes:
            raise OnnxoptError(f"nothing to quantize to {fmt.name.upper()}: no MatMul/Gemm passes its rules ("
                               + "; ".join(sorted(set(reasons.values()))[:3]) + "); use --fp8")
        if self.weight_only:
            fp8_nodes = []
        fp8_ids = {id(n) for n in fp8_nodes}
        block_ids = {id(n) for n in block_nodes}
        t0 = time.perf_counter()
        amax, means = ({}, {})
        if not self.weight_only:  # ranges of the FP8 layers' inputs and of NVFP4's (MXFP8 has no tensor scale)
            calibrated = {k: [u for u in uses if id(u[0]) in fp8_ids or (id(u[0]) in block_ids and fmt.calib_method)]
                          for k, uses in plan.activations.items()}
            acts = {k: v for k, v in calibrated.items() if v}
            groups = [[n for n in g if n in acts] for g in plan.shared_scales]
            sub = rules.Plan(nodes=plan.nodes, activations=acts, weights=plan.weights,
                             shared_scales=[g for g in groups if len(g) > 1], fixed_amax=plan.fixed_amax)
            amax, means = self._as_fp8(self.calibrate, ctx, sub)[:2]  # (QDQ's third result: shared-weight Hessians)
        elif ctx.data is not None and ctx.measure_ranges:  # Autocast's ranges, measured before ORT meets FP4 nodes
            self._as_fp8(self.calibrate, ctx, rules.Plan())
        t1 = time.perf_counter()
        layers = self._insert_fp8(graph, plan, fp8_ids, amax, means, ctx.high_precision)
        before = {id(n) for n in graph.nodes}
        layers.update(self._insert_block(graph, plan, block_ids, amax, clips))
        if fmt.calib_method:  # NVFP4: FP32 tensor scales (amax / 2688 underflows FP16): Autocast casts around them
            ctx.fp32_nodes.extend(n.name for n in graph.nodes if id(n) not in before)
        ctx.fp32_nodes.extend(i["fp32_node"] for i in layers.values() if "fp32_node" in i)  # weights beyond FP16
        report = {"mode": self.mode, "format": fmt.name, "weight_only": self.weight_only, "method": self.method,
                  "block_size": fmt.block_size,
                  "layers": {n.name: {"op": n.op, **layers.get(n.name, {})} for n in block_nodes + fp8_nodes},
                  "activations": {k: float(v) for k, v in amax.items()},
                  "skipped": plan.skipped, "fp8_reasons": reasons,
                  "coverage": {"quantized": len(block_nodes) + len(fp8_nodes), fmt.name: len(block_nodes), formats.FP8.name: len(fp8_nodes),
                               "skipped": len(plan.skipped) + (len(reasons) if self.weight_only else 0),
                               "attention_bmms": sum(1 for n in fp8_nodes if reasons[n.name].startswith("attention"))},
                  "awq": awq_report, "attention_guards_removed": guards, "timings_s": {"calibrate": t1 - t0, "insert": time.perf_counter() - t1}}
        if self.weight_only:
            report["skipped"] = {**plan.skipped, **reasons}
        log.info("%d layers %s, %d FP8, %d skipped", len(block_nodes), fmt.name, len(fp8_nodes), len(plan.skipped))
        return report

    def _as_fp8(self, fn, *args):
        """Run a QDQ step (placement rules, calibration, insertion) as the FP8 pass it is for the other layers."""
        mode, self.mode = self.mode, formats.FP8.name
        try:
            return fn(*args)
        finally:
            self.mode = mode

    def _insert_fp8(self, graph, plan, fp8_ids, amax, means, hp) -> dict:
        """The FP8 part: the QDQ pass's insertion on the sub-plan of the FP8 layers."""
        sub = rules.Plan(nodes=[n for n in plan.nodes if id(n) in fp8_ids],
                         activations={k: [u for u in v if id(u[0]) in fp8_ids or u[0].op == "Add"] for k, v in plan.activations.items()},
                         weights=[w for w in plan.weights if id(w[0]) in fp8_ids])
        sub.activations = {k: v for k, v in sub.activations.items() if v}
        if not sub.nodes:
            return {}
        layers = self._as_fp8(self._insert, graph, sub, amax, means, hp)
        return {k: {**v, "format": formats.FP8.name} for k, v in layers.items()}

    def _insert_block(self, graph, plan, block_ids, amax, clips) -> dict:
        fmt, names = self.fmt, G.taken_names(graph)

        def unique(n):
            return G.unique_name(n, names)
        if not self.weight_only:
            tensors = graph.tensors()
            for name, uses in plan.activations.items():
                uses = [u for u in uses if id(u[0]) in block_ids]
                if uses:
                    fmt.write_dynamic_activation(graph, tensors[name], uses, amax=amax.get(name), name=unique,
                                                 k=_reduction_size(uses[0][0]))
        layers, done = {}, {}
        writer = fmt.write_block_weight
        for node, idx, const, _ in plan.weights:
            if id(node) not in block_ids:
                continue
            trans = bool(node.op == "Gemm" and node.attrs.get("transB", 0))
            key = (const.name, trans)
            if key not in done:
                w_kn = G.to_kn(node, effective_weight(node, idx, read_only=True))  # one FP32 copy in memory, not two
                done[key] = writer(graph, const.name, w_kn, trans, unique, clip=clips.get(node.name))
            out, info = done[key]
            node.inputs[idx] = out
            layers[node.name] = info
        return layers


def _reduction_size(node) -> int:
    """K of a MatMul/Gemm, from its weight's shape ([K, N], or [N, K] for Gemm with transB)."""
    shape = effective_shape(node, 1)
    return int(shape[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else shape[0])
