"""inspect's Q/DQ coverage knows weight-only formats (W4A16, W8A16) as well as W8A8."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxopt
import tiny

from onnxopt.cli import main
from onnxopt.inspection import inspect_graph, inspect_path

WEIGHT_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_up", "mlp_down"}


@pytest.fixture(scope="module")
def awq_int4(tmp_path_factory):
    d = tmp_path_factory.mktemp("awq")
    src = tiny.save(tiny.transformer(), d / "t.onnx")
    cfg = onnxopt.QuantConfig(mode="int4", awq="lite", block_size=32, int8_layers="mlp_down", progress=False)
    return onnxopt.quantize(src, d / "t.int4.onnx", config=cfg, calib_random=4, shapes={"ids": (2, 16)}).path


def test_int4_awq_layers_count_as_weight_only_and_lint_clean(awq_int4):
    ins = inspect_path(awq_int4)
    fmt = {l.name: l.format for l in ins.layers}
    assert {n for n, f in fmt.items() if f} == WEIGHT_LAYERS
    assert fmt["mlp_down"] == "W8A16" and all(fmt[n] == "W4A16" for n in WEIGHT_LAYERS - {"mlp_down"})
    assert fmt["attn_qk"] == fmt["attn_pv"] == ""  # activations only: not quantized by INT4
    s = ins.summary()
    assert s["quantized_layers"] == s["weight_only_layers"] == 6
    assert s["formats"] == {"W4A16": 5, "W8A16": 1}
    assert ins.lint == []


def test_cli_prints_formats(awq_int4, tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(awq_int4), "--report", str(tmp_path / "i.json")])
    assert r.exit_code == 0, r.output
    assert "quantized: 6 (W4A16 5, W8A16 1)" in r.output and "lint: clean" in r.output


def _graph(op: str, act_qdq: bool, w_dtype=np.int8) -> gs.Graph:
    """x -> [Q/DQ] -> op(x, DQ(w)) with a per-channel weight in `w_dtype`."""
    w = nh.from_array(np.ones((16, 16) if op != "Conv" else (16, 16, 1, 1), w_dtype), "w")
    ws = nh.from_array(np.full(16, 0.1, np.float32), "ws")
    axis = 1 if op == "MatMul" else 0
    nodes = [h.make_node("DequantizeLinear", ["w", "ws"], ["wdq"], name="w_dq", axis=axis)]
    x = "x"
    inits = [w, ws]
    if act_qdq:
        inits += [nh.from_array(np.array(0.1, np.float32), "xs"), nh.from_array(np.array(0, np.int8), "xz")]
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
                  h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="x_dq")]
        x = "xdq"
    nodes.append(h.make_node(op, [x, "wdq"], ["y"], name="layer"))
    shape = [1, 16] if op != "Conv" else [1, 16, 4, 4]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, shape)], [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return gs.import_onnx(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]))


def test_w8a16_matmul_vs_w8a8_vs_conv_weight_only():
    ins = inspect_graph(_graph("MatMul", act_qdq=False))
    assert ins.layers[0].format == "W8A16" and ins.layers[0].quantized and ins.lint == []
    ins = inspect_graph(_graph("MatMul", act_qdq=True))
    assert ins.layers[0].format == "int8" and not ins.layers[0].weight_only and ins.lint == []
    # TensorRT has no weight-only Conv: it stays unquantized, and the lint still says so
    ins = inspect_graph(_graph("Conv", act_qdq=False))
    assert ins.layers[0].format == "" and not ins.layers[0].quantized
    assert any("only some data inputs" in x for x in ins.lint)
