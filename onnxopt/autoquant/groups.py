"""Layers whose formats are tied: TensorRT-RTX runs them in their quantized kernels only when they are chosen
together. Each rule is one function returning {group name: Tie}; the choice (choose.py) treats a group as one
`Unit` whose candidates are the formats its leaders share, each follower at `member_format` (the group's format
where it has it, else FP16), its error the sum of theirs and its cost the sum of theirs. What the builder showed (TensorRT-RTX 1.7.1, CPU builds of tiny transformers and MiniLM):

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
- one way, now a tie with followers (rule_attention_block): INT8 attention fused only when the layer reading its
  output (o_proj) was INT8 too (tiny transformer, 12 heads x 64 tokens: o_proj FP8 or FP16 -> no fused attention;
  tiny SDXL UNet at an 8x8 latent: INT8 fused all 34 blocks with to_out INT8, none with to_out FP8); FP8 attention
  fused on a tiny transformer with o_proj in FP8, INT8 or FP16, but on the real terrain UNet (1x1 conv proj_out,
  1024 tokens) the `--auto` mix that kept two proj_out convs FP16 behind FP8 attention left exactly those two
  blocks quantized and unfused (26 of 28 fused; quant/rules.py `_plan_attention_reader`). So the block's reader
  decides and its BMMs follow: the BMMs take the reader's format where they have it, FP16 otherwise; a quantized
  block before a reader in another format or FP16 cannot be chosen (the BMMs' error counts in the reader's
  options), while the reader keeps every format of its own (NVFP4, INT4, a low-rank branch) with FP16 attention.
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

import math
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from .. import graph as G
from ..quant import rules
from ..trt.report import attention_blocks
from .candidates import Layer, base_format


@dataclass
class Tie:
    """Layers one rule ties: `members` take one decision; `follow` (a subset) take its format where they have it,
    FP16 otherwise (member_format)."""
    members: list
    reason: str
    follow: tuple = ()


def rule_attention_block(graph: gs.Graph, layers: dict) -> dict:
    """An attention block is one decision. TensorRT-RTX fuses Q·Kᵀ, softmax and ·V into one quantized MHA kernel
    only when both BMMs share one format (a block with only Q·Kᵀ quantized (MiniLM `--target-cosine` mix: 3 of 6
    blocks), or with Q·Kᵀ in FP8 and ·V in INT8, ran as separate kernels) and its output feeds a layer quantized in
    that format (quant/rules.py `_plan_attention_reader`: the terrain UNet's FP8 blocks before FP16 proj_out convs ran
    unfused). So the reader (the output projection) decides and the two BMMs follow it; with no reader found, the
    two BMMs alone are tied."""
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for b in attention_blocks(graph):
        bmms = [b["qk"], b["pv"]]
        if not all(m in layers for m in bmms) or b["qk"] == b["pv"]:
            continue
        reader = rules.attention_reader(nodes[b["pv"]])
        if reader is not None and reader.name in layers:
            out[f"attention:{b['softmax']}"] = Tie(
                [reader.name, *bmms], f"attention block: TensorRT-RTX fuses Q·Kᵀ, softmax and ·V in one quantized kernel "
                f"only when both BMMs share one format and {reader.name}, reading the output, is quantized in it: "
                f"the BMMs follow {reader.name}'s format", tuple(bmms))
        else:
            out[f"attention:{b['softmax']}"] = Tie(bmms, "attention block: TensorRT-RTX fuses Q·Kᵀ, softmax and ·V "
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
    return {f"weight:{names[k]}": Tie(members, "shared weight: one weight constant read by several layers takes one format")
            for k, members in by_const.items() if len(members) > 1}


RULES = (rule_attention_block, rule_shared_weight)


def tie(graph: gs.Graph, layers: dict) -> dict:
    """Set `Layer.group` (and `Layer.follows`) of tied layers (overlapping groups merge) and return
    {group: {"members", "reason", "follow"}} for the report."""
    found = {}
    for rule in RULES:
        found.update(rule(graph, layers))
    owner: dict[str, str] = {}
    groups: dict[str, dict] = {}
    follow: set = set()
    for name, t in found.items():
        follow.update(t.follow)
        joined = {owner[m] for m in t.members if m in owner}
        g = {"members": [], "reason": t.reason}
        for old in joined:   # a layer in two groups: one group of both
            prev = groups.pop(old)
            g["members"] += prev["members"]
            g["reason"] = prev["reason"] + "; " + g["reason"]
        g["members"] += [m for m in t.members if m not in g["members"]]
        groups[name] = g
        for m in g["members"]:
            owner[m] = name
    for n, l in layers.items():
        l.group = owner.get(n, "")
        l.follows = n in follow and bool(l.group)
    for g in groups.values():
        g["follow"] = [m for m in g["members"] if m in follow]
    return groups


# ---------------------------------------------------------------- a group as one unit of the choice
def member_format(layer: Layer, cand: str) -> str:
    """The format `layer` takes when its group takes `cand`: the same, or for a follower its base format where it
    has it and FP16 ("none") otherwise (an attention BMM behind an NVFP4, INT4 or branch reader stays FP16)."""
    if not layer.follows:
        return cand
    f = base_format(cand)
    return f if f in layer.formats else "none"


@dataclass
class Unit(Layer):
    """Tied layers as one Layer of the choice: the formats its leaders share, each member's error and cost at its
    own format (member_format)."""
    parts: list = field(default_factory=list)

    def weight_bits(self, cand: str) -> float:
        return sum(l.weight_bits(member_format(l, cand)) for l in self.parts)

    def branch_macs(self, cand: str) -> float:
        return sum(l.branch_macs(member_format(l, cand)) for l in self.parts)

    def activation_bits(self, cand: str) -> float:
        return sum(l.activation_bits(member_format(l, cand)) for l in self.parts)


def unit(key: str, parts: list) -> Unit:
    """The choice's unit of tied layers `parts` (followers take their group's format where they can)."""
    leaders = [l for l in parts if not l.follows] or parts
    fmts = [f for f in leaders[0].formats if all(f in l.formats for l in leaders)]
    error = {f: sum(l.error.get(member_format(l, f), math.inf) for l in parts) for f in fmts}
    return Unit(key, "group", fmts, {}, sum(l.params for l in parts), (), False, sum(l.macs for l in parts), error,
                parts=list(parts))


def sole_leader(name: str, layers: dict) -> bool:
    """Whether `name` decides its group alone (an attention block's reader, not one of several readers of one
    weight): such a layer may keep candidates its followers lack (a low-rank branch)."""
    l = layers[name]
    return not l.follows and not any(o.group == l.group and not o.follows for n, o in layers.items() if n != name)


def set_format(mix: dict, layers: dict, name: str, cand: str) -> None:
    """Put `name`'s group at `cand` in `mix` (in place): leaders at `cand`, followers at member_format."""
    group = layers[name].group
    for n, l in layers.items():
        if n == name or (group and l.group == group):
            mix[n] = member_format(l, cand)


def offers(layers: dict, name: str, cand: str) -> bool:
    """Whether `name`'s group (or `name` alone) can take `cand`: every leader has it."""
    group = layers[name].group
    ls = [l for n, l in layers.items() if (group and l.group == group and not l.follows)] or [layers[name]]
    return all(cand in l.formats for l in ls)
