"""Opset of a model, its upgrade by onnx's version converter, and tolerant shape inference."""
from __future__ import annotations

import logging

import onnx
from onnx import helper

from .errors import OnnxoptError

log = logging.getLogger(__name__)


def opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A model below the oldest opset onnxopt reads, raised to `target` by onnx's version converter, with one
    warning saying so; what the converter cannot adapt is one error line."""
    from onnx import version_converter
    current = opset_of(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    declared = {vi.name for vi in m.graph.input}
    added = [t.name for t in m.graph.initializer if t.name not in declared]
    for t in m.graph.initializer:  # IR < 4 lists weights as graph inputs; the converter looks for them there
        if t.name in added:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    # The converter's broadcast adapters need every shape, as numbers: shapes come from a copy at the oldest
    # opset that infers them all, with symbolic dims pinned to 1 (restored afterwards).
    symbolic = {}
    for vi in list(m.graph.input) + list(m.graph.output):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                symbolic[(vi.name, i)] = d.dim_param
                d.dim_value = 1
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for o in probe.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 7
    m.graph.value_info.extend(infer_shapes(probe).graph.value_info)
    try:
        out = version_converter.convert_version(m, target)
    except Exception as e:
        raise OnnxoptError(f"opset {current} is older than onnxopt reads and onnx's version converter cannot raise it to "
                           f"{target} ({_converter_reason(e)}); re-export the model with opset 17") from None
    keep = [vi for vi in out.graph.input if vi.name not in added]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    del out.graph.value_info[:]  # pinned shapes; inferred again on load
    for vi in list(out.graph.input) + list(out.graph.output):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if (vi.name, i) in symbolic:
                d.dim_param = symbolic[(vi.name, i)] or f"{vi.name}_{i}"
    out.ir_version = max(out.ir_version, 7)
    log.warning("the model's opset %d is older than onnxopt reads: upgraded to opset %d with onnx.version_converter "
                "(the output uses opset %d or newer)", current, target, target)
    return out


def _converter_reason(e: Exception) -> str:
    """The converter's assertion without its source path: 'adapt_gemm_6_7: ... failed: <why>' -> '<why>'."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.split(" failed: ", 1)[-1][:160]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, tolerant of ops it does not know (types matter more than shapes here)."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # a failing inference still leaves the model usable
        log.warning("shape inference failed (%s); continuing with the types the model declares", str(e).splitlines()[0][:200])
        return model
