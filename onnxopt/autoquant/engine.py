"""The engine report as cost model (`--cost-model rtx`): after the choice, the chosen mix is written as the real
output would be (mixed Q/DQ, then the recipe's autocast) and built with TensorRT-RTX on the CPU. A quantized
layer that did not land in its quantized kernel, and both BMMs of a quantized attention block that did not
fuse, save nothing in that format: the format leaves the layer's candidates (FP16 costs the same and loses
nothing), with the builder's reason, and the mix is chosen and verified again; at most a few rounds. Attention
fusion depends on each block's sequence lengths, so one probe build per 8-bit format first tries every block
in that format."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import formats, modelfile
from ..cast import autocast
from ..errors import OnnxoptError
from ..quant import writer as qwriter
from ..trt.report import attention_blocks
from .groups import offers, set_format

log = logging.getLogger(__name__)

MAX_ROUNDS = 3


@dataclass
class Writer:
    """Writes a mix of `graph` (never modified) as the final graph: what the writer needs, the autocast type."""
    graph: gs.Graph
    configs: dict
    amax: dict
    means: dict
    high_precision: str                  # the recipe's Autocast: its type and options
    keep_fp32_ops: tuple
    keep_fp32_nodes: tuple
    block_size: int
    clips: dict
    opset: int
    shapes: dict                         # input -> (min, opt, max) shapes the engine is built for
    workdir: str | None = None
    smooth: dict | None = None           # int8-sq smoothing vectors (as the final graph gets them)
    clip_of: object = None               # Candidates.clip_of: each layer's clips for its chosen format (else `clips`)
    smooth_of: object = None             # Candidates.smooth_of: block-format layers' own input scaling
    built: list = field(default_factory=list)

    def plan(self, mix: dict) -> qwriter.QuantPlan:
        """The QuantPlan of `mix` with this search's statistics."""
        return qwriter.QuantPlan.from_mix(mix, "search", configs=self.configs, amax=self.amax, means=self.means,
                                          block_size=self.block_size, smooth=self.smooth or {},
                                          clips=self.clips if self.clip_of is None else
                                          {n: c for n, f in mix.items() if (c := self.clip_of(n, f)) is not None},
                                          block_smooth={} if self.smooth_of is None else
                                          {n: sm for n, f in mix.items() if (sm := self.smooth_of(n, f)) is not None})

    def engine_report(self, mix: dict) -> dict:
        from ..trt.build import BuildConfig
        from ..trt.report import engine_report_of
        g = modelfile.import_graph(modelfile.export_graph(self.graph))  # weights stay lazy: only the quantized ones are new
        qwriter.write(g, self.plan(mix), high_precision=self.high_precision)
        autocast.to_low_precision(g, self.high_precision, keep_fp32_ops=self.keep_fp32_ops,
                                  keep_fp32_nodes=self.keep_fp32_nodes)
        model = modelfile.export_graph(g, opset=self.opset)
        del g
        with tempfile.TemporaryDirectory(prefix="onnxopt-autoquant-", dir=self.workdir) as d:
            path = f"{d}/mix.onnx"
            modelfile.save(model, path)
            del model
            return engine_report_of(path, BuildConfig(profiles=dict(self.shapes)))


def check_shapes(graph: gs.Graph, profiles: dict) -> None:
    """--engine-shapes against the graph's inputs, before any work: every name an input, the input's rank, its
    fixed dimensions; given at all, every input with a dynamic dimension (the builder needs them all)."""
    if not profiles:
        return
    inputs = {t.name: t.shape for t in graph.inputs}
    for name, prof in profiles.items():
        if name not in inputs:
            raise OnnxoptError(f"--engine-shapes {name}: the graph has no input {name}; its inputs are {', '.join(inputs)}")
        shape = inputs[name]
        if shape is not None and len(prof[0]) != len(shape):
            raise OnnxoptError(f"--engine-shapes {name}: {len(prof[0])} dimensions given, the input has {len(shape)} "
                               f"({'x'.join(str(d) for d in shape)})")
        fixed = [(i, d) for i, d in enumerate(shape or ()) if isinstance(d, int) and d >= 0 and any(p[i] != d for p in prof)]
        if fixed:
            raise OnnxoptError(f"--engine-shapes {name}: dimension {fixed[0][0]} of the input is fixed at {fixed[0][1]}; "
                               "give that size")
    missing = [n for n, s in inputs.items() if n not in profiles and (s is None or any(not isinstance(d, int) or d < 0 for d in s))]
    if missing:
        raise OnnxoptError(f"--engine-shapes names {', '.join(profiles)} but not the dynamic input(s) {', '.join(missing)}; "
                           "give every dynamic input's shape")


def build_shapes(feed: dict) -> dict:
    """One sample's input shapes: a merged batch (every input with the same leading dimension) becomes 1."""
    lead = {v.shape[0] for v in feed.values() if np.ndim(v)}
    one = len(lead) == 1 and all(np.ndim(v) for v in feed.values())
    return {k: tuple(int(d) for d in ((1,) + v.shape[1:] if one else v.shape)) for k, v in feed.items()}


def no_savings(rep: dict, mix: dict, graph: gs.Graph) -> dict:
    """{(layer, format): why} for the mix's quantized layers that the engine ran unquantized and the BMMs of
    quantized attention blocks that did not fuse."""
    out = {}
    for r in rep["layers"]:
        f = mix.get(r["name"], "none")
        if not r["quantized_kernel"] and f != "none":
            out[(r["name"], f)] = f"TensorRT-RTX ran it in {r['engine']} kernel"
    unfused = set(rep["attention"]["unfused"])
    for b in attention_blocks(graph):
        if b["softmax"] in unfused:
            for n in (b["qk"], b["pv"]):
                if mix.get(n, "none") != "none":
                    out[(n, mix[n])] = "TensorRT-RTX did not fuse its quantized attention block (separate kernels)"
    return out


def _row(label, mix: dict, rep: dict, found: dict, verified) -> dict:
    att = rep["attention"]
    return {"round": label, "counts": {f: sum(v == f for v in mix.values()) for f in (*formats.auto_candidates(), "none")},
            "quantized_in_quantized_kernels": rep["quantized_in_quantized_kernels"],
            "quantized_layers": rep["quantized_layers"], "fused_attention": att["fused_by_precision"],
            "attention_blocks": att["blocks"], "weights_memory": rep["weights"]["engine_weights_memory"],
            "weights_vs_fp16": rep["weights"]["vs_fp16"], "verified": verified,
            "no_savings": [{"layer": n, "format": f, "reason": why} for (n, f), why in found.items()]}


def _drop(found: dict, layers: dict) -> None:
    for (n, f), why in found.items():
        l = layers[n]
        if f in l.formats:
            l.formats.remove(f)
            l.reasons[f] = why + " (saves nothing)"


def probe(mix: dict, writer: Writer, layers: dict) -> list:
    """Per 8-bit format f, one build of `mix` with every attention block that can take f set to f; the blocks
    that did not fuse lose f. Whether a block fuses depends on its sequence lengths (tiny SDXL UNet at an 8x8
    latent: FP8 fused all 17 cross-attention blocks (77 keys) and none of the 17 self-attention blocks (16 or 4
    tokens). Each block's other layers keep their chosen formats: INT8 attention fuses only into an INT8
    reader (groups.py), so INT8 leaves the blocks whose output projection the choice did not make INT8
    (on that UNet: all 34, which fused in INT8 when their to_out was INT8 too). Without the probe each round tried the format on the few
    blocks the choice had moved there and 3 rounds did not converge. One report row per probe."""
    blocks = [b for b in attention_blocks(writer.graph) if b["qk"] in layers and b["pv"] in layers]
    rows = []
    for f in formats.static():
        take = [b for b in blocks if f in layers[b["qk"]].formats and f in layers[b["pv"]].formats
                and offers(layers, b["qk"], f)]   # the block's reader decides it (groups.py)
        if not take or all(mix.get(b["qk"]) == f and mix.get(b["pv"]) == f for b in take):
            continue   # nothing to try, or round 0 tries exactly this
        trial = dict(mix)
        for b in take:
            set_format(trial, layers, b["qk"], f)
        rep = writer.engine_report(trial)
        bmms = {n for b in take for n in (b["qk"], b["pv"])}
        found = {k: why for k, why in no_savings(rep, trial, writer.graph).items() if k[0] in bmms and k[1] == f}
        rows.append(_row(f"probe {f}", trial, rep, found, None) | {"probe": f, "probed_blocks": len(take)})
        log.info("engine probe %s: %d of %d attention blocks fused", f, len(take) - len(found) // 2, len(take))
        _drop(found, layers)
    return rows


def refine(mix: dict, choose, writer: Writer, layers: dict, verify, max_rounds: int = MAX_ROUNDS) -> tuple[dict, list]:
    """Probe the attention blocks (`probe`), then build `mix`, drop the formats that saved nothing from their
    layers' candidates, `choose()` again and `verify(mix)` (held-out metrics); until the engine runs every
    quantized layer in its quantized kernel, or `max_rounds` rebuilds. Returns (mix, rows), one report row
    per build (probes first)."""
    rows = probe(mix, writer, layers)
    if any(r["no_savings"] for r in rows):
        mix = choose()
    for i in range(max_rounds + 1):
        rep = writer.engine_report(mix)
        found = no_savings(rep, mix, writer.graph)
        rows.append(_row(i, mix, rep, found, verify(mix)))
        log.info("engine round %d: %d/%d quantized layers in quantized kernels; %d (layer, format) save nothing",
                 i, rep["quantized_in_quantized_kernels"], rep["quantized_layers"], len(found))
        if not found or i == max_rounds:
            break
        _drop(found, layers)
        mix = choose()
    return mix, rows
