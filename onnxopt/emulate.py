"""Exact emulation of FP16/BF16 graphs for providers that cannot run them (BF16 on ORT's CPU provider).

Every op computes in FP32 on inputs that hold low-precision values, and each tensor the graph keeps in
FP16/BF16 is rounded to that format right after its producer (Cast to the format and back, round to
nearest even, overflow to inf as on the GPU). TensorRT still receives the real low-precision graph.
"""
from __future__ import annotations

import logging

import onnx
from onnx import TensorProto, helper

from . import opset_upgrade
from .cast.autocast import fp32_view
from .formats.emulation import lower_for_ort

log = logging.getLogger(__name__)

LOW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
# Ops whose outputs are input values (moved, selected or sign-changed): already in the format, no rounding.
EXACT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "Concat", "Split",
         "Expand", "Tile", "Pad", "Relu", "MaxPool", "Max", "Min", "Where", "Neg", "Abs", "DepthToSpace",
         "SpaceToDepth", "GlobalMaxPool", "ReduceMax", "ReduceMin", "Dropout", "GatherElements", "GatherND"}


def low_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """Names of the main graph's FP16/BF16 tensors and their type (after shape inference)."""
    m = opset_upgrade.infer_shapes(model)
    out = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        t = vi.type.tensor_type.elem_type
        if t in LOW:
            out[vi.name] = t
    for n in m.graph.node:  # Cast outputs are typed by their attribute even where inference stopped
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to in LOW:
                out[n.output[0]] = to
    return out


def emulated_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that rounds each FP16/BF16 tensor of `model` to its format: runs on any provider."""
    model = lower_for_ort(model)  # NVFP4/MXFP8: their standard-ONNX emulation first
    lows = low_tensors(model)
    m = fp32_view(model, cast_weights=True)
    g = m.graph
    nodes = []
    outputs = {o.name for o in g.output}
    for n in g.node:
        renamed = []
        for i, o in enumerate(n.output):
            if o in lows and o and n.op_type not in EXACT:
                raw = f"{o}__emu_raw"
                n.output[i] = raw
                renamed.append((raw, o, lows[o]))
        nodes.append(n)
        for raw, o, to in renamed:
            nodes.append(helper.make_node("Cast", [raw], [f"{o}__emu_low"], name=f"{o}__emu_round", to=to))
            nodes.append(helper.make_node("Cast", [f"{o}__emu_low"], [o], name=f"{o}__emu_back", to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # stale types (the view relabelled them)
    log.debug("emulating %d low-precision tensors (%d graph outputs)", len(lows), len(outputs & set(lows)))
    return opset_upgrade.infer_shapes(m)  # typed value_info: ORT resolves a big graph several times faster
