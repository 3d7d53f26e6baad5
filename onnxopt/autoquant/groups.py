"""Layers whose formats are tied: TensorRT-RTX runs them in their quantized kernels only when they are chosen
together. Each rule is one function returning {group name: (members, reason)}; the choice (choose.py) treats a
group as one unit whose candidates are the formats all members share, its error the sum of theirs and its cost
the sum of theirs. What the builder showed (TensorRT-RTX 1.7.1, CPU builds of tiny transformers and MiniLM):

- tied: an attention block's Q·Kᵀ and softmax·V BMMs (rule_attention_block);
- not tied: Q/K/V projections reading one activation in different formats (INT8 + FP8, INT8 + INT4) all
  ran in their quantized kernels and the attention still fused; FP8 and INT8 MLP layers side by side too;
  on a 64-channel CNN, a residual Add whose Conv is FP8 and whose skip comes from an INT8 Conv (and the
  reverse), and one activation read by an FP8 and an INT8 Conv: every Conv in its quantized kernel;
  tiny SDXL UNet with planted outliers (127 FP8 + 203 INT8 layers: FP8 and INT8 resnet convs, residual
  adds, GEGLU, time embedding Gemms, to_k/to_v of the text states in either format): 330/330 in their
  quantized kernels, at 8x8 and 32x32 latents.
- tied, seen again on that UNet: the mixes chosen before this rule had Q·Kᵀ INT8 and ·V FP8 (or FP16) in
  every block: 0 of 34 blocks fused, at 8x8 and 32x32 latents alike.
- not tied, one way only: INT8 attention fused only when the layer reading its output (o_proj) was INT8 too
  (tiny transformer, 12 heads x 64 tokens: o_proj FP8 or FP16 -> no fused attention, all layers still in
  their kernels); FP8 attention fused with o_proj in FP8, INT8 or FP16, and with INT8 or FP8 Q/K/V
  projections; tiny SDXL UNet at an 8x8 latent: INT8 fused all 34 blocks with to_out INT8, none with
  to_out FP8. A tie would forbid FP16 or FP8 attention before an INT8 o_proj, so the engine cost model
  handles it: its INT8 probe keeps the chosen readers, and INT8 leaves the blocks it does not fuse in.
  Letting the choice take "INT8 block => INT8 reader" as a constraint is not done yet.
- not static: an INT4 weight-only layer right after a fused attention block (softmax·V -> Transpose ->
  Reshape -> MatMul) ran as a separate INT4 dequantize kernel + FP16 GEMM with a static batch-1 profile
  (MiniLM 1x31, tiny transformer 1x64, any block size) but in its INT4 kernel with a 1..2 batch profile;
  FP8 fused attention needed a sequence length of 32 or 64 where 31 did not fuse (INT8 fused at 31; uniform
  FP8 MiniLM at 1x31: 48/48 layers in FP8 kernels, none of its 6 attention blocks fused); tiny SDXL UNet
  at an 8x8 latent: FP8 fused the 17 cross-attention blocks (77 keys), not the 17 self-attention blocks
  (16 or 4 tokens) (INT8 there: a matter of the reader, above). These depend on the build's shapes, so the engine cost model
  (engine.py: probe builds, then rounds) finds them from the engine report.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import graph as G
from ..trt.report import attention_blocks


def rule_attention_block(graph: gs.Graph, layers: dict) -> dict:
    """An attention block's two BMMs take one format, both or neither: TensorRT-RTX fuses Q·Kᵀ, softmax and ·V
    into one quantized MHA kernel only then. A block with only Q·Kᵀ quantized (MiniLM `--target-cosine` mix:
    3 of 6 blocks), or with Q·Kᵀ in FP8 and ·V in INT8, ran as separate kernels: no fused attention at all."""
    out = {}
    for b in attention_blocks(graph):
        members = [b["qk"], b["pv"]]
        if all(m in layers for m in members) and b["qk"] != b["pv"]:
            out[f"attention:{b['softmax']}"] = (members, "attention block: TensorRT-RTX fuses Q·Kᵀ, softmax and ·V "
                                                         "in one quantized kernel only when both BMMs share one format")
    return out


def rule_shared_weight(graph: gs.Graph, layers: dict) -> dict:
    """Layers reading one weight constant (ALBERT: one set of weights serving 12 layers) take one format: the
    writer stores the weight once per format, so a mix of formats would store it several times and save
    nothing (one decision per weight, its error the sum over its uses)."""
    by_const: dict[int, list] = {}
    names: dict[int, str] = {}
    for n in graph.nodes:
        if n.name in layers and len(n.inputs) > 1:
            const, _ = G.weight_of(n.inputs[1])
            if const is not None and const.shape is not None and len(const.shape) > 1:
                by_const.setdefault(id(const), []).append(n.name)
                names[id(const)] = const.name
    return {f"weight:{names[k]}": (members, "shared weight: one weight constant read by several layers takes one format")
            for k, members in by_const.items() if len(members) > 1}


RULES = (rule_attention_block, rule_shared_weight)


def tie(graph: gs.Graph, layers: dict) -> dict:
    """Set `Layer.group` of tied layers (overlapping groups merge) and return {group: {"members", "reason"}}."""
    found = {}
    for rule in RULES:
        found.update(rule(graph, layers))
    owner: dict[str, str] = {}
    groups: dict[str, dict] = {}
    for name, (members, reason) in found.items():
        joined = {owner[m] for m in members if m in owner}
        g = {"members": [], "reason": reason}
        for old in joined:   # a layer in two groups: one group of both
            prev = groups.pop(old)
            g["members"] += prev["members"]
            g["reason"] = prev["reason"] + "; " + g["reason"]
        g["members"] += [m for m in members if m not in g["members"]]
        groups[name] = g
        for m in g["members"]:
            owner[m] = name
    for n, l in layers.items():
        l.group = owner.get(n, "")
    return groups
