"""The real NVFP4/MXFP8 form (what TensorRT reads) rewritten into standard ONNX that ONNX Runtime runs with the
same rounding bit for bit: ORT 1.31 has no FP4 DequantizeLinear and no trt-domain ops.

- NVFP4 / MXFP8 weights (DequantizeLinear pairs of constants, TRT_MXFP8DequantizeLinear of constants) become
  constants holding exactly what the DequantizeLinears compute (FP32 products, then the node's output type);
- TRT_FP4DynamicQuantize + its two DequantizeLinears, TRT_MXFP8DynamicQuantize + TRT_MXFP8DequantizeLinear
  become the formats' `emulate_dynamic` subgraphs (FP32 arithmetic, FP8 by Cast, E2M1 by Round).

`onnxopt.emulate.emulated_view` applies this first, so `compare`, the finite check and every evaluation of a
written NVFP4/MXFP8 file run the emulation; the file itself keeps the real form.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import mxfp8, nvfp4
from .fp8 import FP8_E4M3


def has_block_formats(model: onnx.ModelProto) -> bool:
    """Whether `model` holds trt-domain block quantization or FP4 initializers."""
    return (any(n.domain == nvfp4.TRT_DOMAIN for n in model.graph.node)
            or any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in model.graph.initializer))


def lower_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with the block formats in their standard-ONNX emulation (unchanged if it has none)."""
    if not has_block_formats(model):
        return model
    from .. import modelfile
    graph = modelfile.import_graph(model)
    lower_graph(graph)
    out = modelfile.export_graph(graph)
    keep = [o for o in out.opset_import if o.domain != nvfp4.TRT_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def lower_graph(graph: gs.Graph) -> int:
    """Rewrite the block-format nodes of `graph` in place; returns how many were rewritten."""
    count = 0
    for n in list(graph.nodes):
        if n.op == nvfp4.DYNAMIC_OP:
            count += _lower_fp4_dynamic(graph, n)
        elif n.op == mxfp8.DYNAMIC_OP:
            count += _lower_mx_dynamic(graph, n)
    for n in list(graph.nodes):
        if not n.inputs:
            continue
        if n.op == "DequantizeLinear" and _const(n.inputs[0]) is not None and n.inputs[0].dtype == nvfp4.NVFP4_FORMAT.np_dtype:
            count += _lower_fp4_weight(graph, n)
        elif n.op == mxfp8.DQ_OP and all(_const(t) is not None for t in n.inputs[:2]):
            count += _lower_mx_weight(graph, n)
    graph.cleanup()
    return count


def _const(t):
    return t if isinstance(t, gs.Constant) else None


def _consumer(t: gs.Tensor, op: str):
    return next((c for c in t.outputs if c.op == op), None)


def _detach(*nodes) -> None:
    for n in nodes:
        n.outputs.clear()  # the synchronized lists: the tensors forget these nodes too
        n.inputs.clear()


def _lower_fp4_dynamic(graph: gs.Graph, q: gs.Node) -> int:
    x, s = q.inputs[0], q.inputs[1]
    x4, s8 = q.outputs[0], q.outputs[1]
    dq_s = _consumer(s8, "DequantizeLinear")
    dq_x = _consumer(x4, "DequantizeLinear")
    out = dq_x.outputs[0]
    scale = np.float32(np.asarray(s.values, np.float32).reshape(()))
    _detach(q, dq_s, dq_x)
    f32 = gs.Variable(f"{out.name}__emu_result", dtype=np.float32)
    nvfp4.emulate_dynamic(graph, x, scale, f32, f"{out.name}__emu")
    _cast_to(graph, f32, out)
    return 1


def _lower_mx_dynamic(graph: gs.Graph, q: gs.Node) -> int:
    x = q.inputs[0]
    dq = _consumer(q.outputs[0], mxfp8.DQ_OP)
    out = dq.outputs[0]
    _detach(q, dq)
    f32 = gs.Variable(f"{out.name}__emu_result", dtype=np.float32)
    mxfp8.emulate_dynamic(graph, x, f32, f"{out.name}__emu")
    _cast_to(graph, f32, out)
    return 1


def _cast_to(graph: gs.Graph, src: gs.Variable, out: gs.Variable) -> None:
    """out = src in out's type (the DequantizeLinear's output type: FP32, or FP16 for MXFP8's output_dtype)."""
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(out.dtype)) if out.dtype is not None else onnx.TensorProto.FLOAT
    graph.nodes.append(gs.Node("Cast", name=f"{out.name}__emu_cast", inputs=[src], outputs=[out], attrs={"to": int(to)}))


def _lower_fp4_weight(graph: gs.Graph, dq: gs.Node) -> int:
    codes = _const(dq.inputs[0])
    sdq = dq.inputs[1].inputs[0] if dq.inputs[1].inputs else None
    if sdq is None or sdq.op != "DequantizeLinear":
        return 0
    bs, s = np.asarray(sdq.inputs[0].values), np.asarray(sdq.inputs[1].values, np.float32)
    eff = (FP8_E4M3.to_float(bs) * s).astype(np.float32)
    axis = int(dq.attrs.get("axis", 1)) % codes.shape.__len__()
    block = int(dq.attrs.get("block_size", nvfp4.BLOCK))
    w = nvfp4.NVFP4_FORMAT.to_float(np.asarray(codes.values))
    w = (w * np.repeat(eff, block, axis=axis)).astype(np.float32)
    out = dq.outputs[0]
    _replace_with_constant(out, w.astype(out.dtype or np.float32))
    _detach(dq)
    return 1


def _lower_mx_weight(graph: gs.Graph, dq: gs.Node) -> int:
    q, e = np.asarray(dq.inputs[0].values), np.asarray(dq.inputs[1].values)
    axis = int(dq.attrs.get("axis", 1)) % q.ndim
    w = (FP8_E4M3.to_float(q) * np.repeat(mxfp8.scale_of_codes(e), int(dq.attrs.get("block_size", mxfp8.BLOCK)), axis=axis))
    out = dq.outputs[0]
    _replace_with_constant(out, w.astype(np.float32).astype(out.dtype or np.float16))
    _detach(dq)
    return 1


def _replace_with_constant(out: gs.Variable, values: np.ndarray) -> None:
    c = gs.Constant(f"{out.name}__emu", values)
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = c
