"""ONNX Runtime sessions over lazily loaded models (external data stays on disk)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import external_data_helper

from . import io
from .errors import OnnxoptError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_PROTO_LIMIT = 1_800_000_000


def session(model: onnx.ModelProto, *, provider: str = "cpu", level: str = "disable",
            threads: int = 0, lean: bool = False) -> ort.InferenceSession:
    """An InferenceSession for a model whose external tensors carry absolute locations (see io.load).

    ORT refuses absolute external-data paths, so locations are made relative to their folder, which the
    session is told about. ORT_DISABLE_ALL (the default) simulates Q/DQ exactly; higher levels fuse them
    into integer kernels.
    """
    if provider not in PROVIDERS:
        raise OnnxoptError(f"unknown provider '{provider}'; use one of {', '.join(PROVIDERS)}")
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise OnnxoptError("the CUDA execution provider is not available here; use --calib-provider cpu")
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if level == "disable":
        # Graph order: a weight's DequantizeLinear runs just before its layer. The default order runs
        # every DQ first (they have no activation inputs) and holds all the dequantized weights at once.
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if lean:  # memory over speed (calibration of big models)
        so.add_session_config_entry("session.disable_prepacking", "1")  # packed GEMM weights: a 2nd copy
        so.enable_cpu_mem_arena = False  # the arena keeps its high-water mark for the session's life
        so.enable_mem_pattern = False    # planned buffers are sized for the largest shapes seen
        # Run nodes in graph order, so that a reduction placed after its producer frees that tensor early.
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    m = onnx.ModelProto()
    m.CopyFrom(model)
    io.stamp_ir_version(m)
    folders = set()
    for t in io._all_tensors(m):
        if external_data_helper.uses_external_data(t):
            folders.add(os.path.dirname(external_data_helper.ExternalDataInfo(t).location))
    try:
        if m.ByteSize() > _PROTO_LIMIT:
            return _session_via_file(m, so, provider)
        if folders:
            base = os.path.commonpath(list(folders))
            for t in io._all_tensors(m):
                if external_data_helper.uses_external_data(t):
                    io._set_location(t, os.path.relpath(external_data_helper.ExternalDataInfo(t).location, base))
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
        return ort.InferenceSession(m.SerializeToString(), so, providers=PROVIDERS[provider])
    except OnnxoptError:
        raise
    except Exception as e:
        raise OnnxoptError(f"ONNX Runtime cannot load the model: {_first_line(e)}") from None


def _session_via_file(m: onnx.ModelProto, so, provider: str) -> ort.InferenceSession:
    # Weights changed in memory beyond protobuf's 2 GB: stream them to a temporary external-data file.
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as d:
        path = Path(d) / "model.onnx"
        io.save(m, path, external_data=True)
        return ort.InferenceSession(str(path), so, providers=PROVIDERS[provider])


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:400] if s else type(e).__name__
