"""The format registry: lookups, filters, each format's numpy emulation against ONNX Runtime, and the rule
that nothing outside onnxopt/formats (and the TensorRT rules) spells a format constant or tests a name."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt import formats, modelfile, ort
from onnxopt.errors import OnnxoptError


def test_get_unknown_lists_the_names():
    with pytest.raises(OnnxoptError, match="unknown format 'nvfp9'; use one of fp8, int8, int4"):
        formats.get("nvfp9")
    assert formats.get(formats.FP8) is formats.FP8


def test_filters_and_facts():
    assert formats.modes() == ("fp8", "int8", "int4", "nvfp4", "mxfp8", "w8a16")
    assert formats.static() == ("fp8", "int8")
    assert formats.weight_only() == ("int4", "nvfp4-wo", "w8a16")  # nvfp4-wo: --auto's candidate; uniform: --nvfp4 --weight-only
    assert formats.auto_candidates() == ("fp8", "int8", "int4", "int8-sq", "nvfp4", "mxfp8", "nvfp4-wo", "w8a16")
    assert formats.NVFP4_WO.block_weight and formats.NVFP4.block_weight and formats.MXFP8.block_weight
    assert not any(formats.get(f).block_weight for f in ("fp8", "int8", "int4", "w8a16"))
    assert formats.low_precision() == ("fp16", "bf16")
    assert (formats.FP8.qmax, formats.INT8.qmax, formats.INT4.qmax) == (448.0, 127.0, 7.0)
    assert (formats.FP8.calib_method, formats.INT8.calib_method) == ("max", "mse")
    assert formats.weight_bits()["int4"] == 4 and formats.activation_bits()["int4"] == 16
    assert formats.INT8_SQ.base == "int8" and formats.INT8.smoothquant and formats.FP8.smoothquant
    assert formats.from_storage("uint8") is formats.INT8 and formats.from_storage("float8_e4m3fn") is formats.FP8
    assert formats.from_storage("int4") is formats.INT4 and formats.from_storage("float16") is None
    assert formats.from_engine("FP8") is formats.FP8 and formats.from_engine("Half") is formats.FP16


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_fake_quant_is_what_ort_computes(name):
    """Q/DQ written by the format (activation pair, DQ-only weight) runs in ORT exactly as its numpy emulation."""
    f = formats.get(name)
    rng = np.random.default_rng(0)
    x_val = (rng.standard_normal((4, 16)) * 3).astype(np.float32)
    w = (rng.standard_normal((16, 8)) * 0.1).astype(np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=[4, 16])
    y = gs.Variable("y", dtype=np.float32, shape=[4, 8])
    mm = gs.Node("MatMul", inputs=[x, gs.Constant("w", w)], outputs=[y])
    g = gs.Graph(nodes=[mm], inputs=[x], outputs=[y], opset=19)
    a_scale = f.activation_scale(float(np.abs(x_val).max()), "fp32")
    f.write_activation(g, x, [(mm, 0)], a_scale)
    q, s = f.quantize_weight(w, 1, "fp32")
    mm.inputs[1] = f.write_weight(g, "w", q, s.reshape(-1), {"axis": 1})
    g.toposort()
    got = ort.session(modelfile.export_graph(g, opset=19), level="disable").run(None, {"x": x_val})[0]
    xq = f.to_float(f.cast(x_val / a_scale)) * a_scale
    np.testing.assert_allclose(got, xq @ f.fake_quant(w, 1, "fp32"), rtol=1e-5, atol=1e-6)


def test_int4_both_layouts_agree():
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    kn = formats.INT4.fake_quant(w, 1, block_size=16)
    nk = formats.INT4.fake_quant(np.ascontiguousarray(w.T), 0, block_size=16)
    np.testing.assert_array_equal(kn, nk.T)
    assert np.abs(formats.INT4.quantize_weight(w, 1, block_size=16)[0]).max() <= 8


def test_no_format_constant_or_name_test_outside_formats():
    """Outside formats/ and the TensorRT rules, no code compares with a format's name or spells 448/127."""
    root = Path(formats.__file__).resolve().parents[1]
    names = set(formats.names())
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("formats/") or rel == "quant/rules.py" or rel.startswith("trt/build"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for c in [node.left, *node.comparators]:
                    elts = c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c]
                    if any(isinstance(e, ast.Constant) and e.value in names for e in elts):
                        bad.append(f"{rel}:{node.lineno} compares with a format name")
            if isinstance(node, ast.Constant) and not isinstance(node.value, bool) and node.value in (448, 127, 448.0, 127.0):
                bad.append(f"{rel}:{node.lineno} spells {node.value}")
    assert not bad, "; ".join(bad)
