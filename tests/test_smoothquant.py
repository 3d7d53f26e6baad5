"""Scale folding (fold.fold_input_scale) and SmoothQuant: exactness in FP32, producers, auto alpha."""
from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import calib, modelfile, ort
from onnxopt.rewrite import fold, smoothquant
from onnxopt.errors import OnnxoptError

RNG = np.random.default_rng(0)


def _init(name, shape, scale=1.0, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32) * scale
    if positive:
        a = np.abs(a) + 0.5
    return numpy_helper.from_array(a, name)


def _model(nodes, inputs, outputs, inits, opset=21):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(m)


def _run(model, feed):
    sess = ort.session(model, level="disable")
    return sess.run(None, feed)


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def _fold_and_compare(model, feed, consumer_names, channels, expect):
    ref = _run(model, feed)
    graph = modelfile.import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    s = np.exp(RNG.uniform(np.log(0.05), np.log(20.0), channels))
    how = fold.fold_input_scale(graph, [nodes[n] for n in consumer_names], s)
    assert expect in how, how
    out = _run(modelfile.export_graph(graph), feed)
    for a, b in zip(out, ref):
        assert _rel(a, b) <= 1e-5
    return how, graph


def test_fold_layernorm_shared_qkv_with_residual_reader():
    C = 16
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v"),
             helper.make_node("Add", ["h", "q"], ["res"], name="residual")]
    m = _model(nodes, [("x", [2, 5, C])], ["res", "k", "v"],
               [_init("g", [C]), _init("b", [C]), _init("wq", [C, C]), _init("wk", [C, C]), _init("wv", [C, C])])
    feed = {"x": RNG.standard_normal((2, 5, C)).astype(np.float32)}
    how, graph = _fold_and_compare(m, feed, ["q", "k", "v"], C, "LayerNormalization 'ln'")
    assert "restoring Mul" in how  # the residual Add still sees the unscaled LayerNorm output


def test_fold_mul_constant_scalar_and_matmul_bias_chain():
    C, N = 12, 8
    nodes = [helper.make_node("Mul", ["x", "c"], ["h"], name="mul"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")]
    m = _model(nodes, [("x", [3, C])], ["y"], [numpy_helper.from_array(np.array(1.7, np.float32), "c"), _init("w", [C, N])])
    _fold_and_compare(m, {"x": RNG.standard_normal((3, C)).astype(np.float32)}, ["fc"], C, "Mul 'mul'")

    # Linear exported as MatMul + Add(bias): fold into both.
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("Add", ["a", "b1"], ["h"], name="bias1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    m = _model(nodes, [("x", [4, 6])], ["y"], [_init("w1", [6, C]), _init("b1", [C]), _init("w2", [C, N])])
    _fold_and_compare(m, {"x": RNG.standard_normal((4, 6)).astype(np.float32)}, ["fc2"], C, "MatMul 'fc1'")


def test_fold_gemm_into_gemm_transposed_weights():
    C = 10
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="g2", transB=1)]
    m = _model(nodes, [("x", [4, 7])], ["y"], [_init("w1", [C, 7]), _init("b1", [C]), _init("w2", [5, C])])
    _fold_and_compare(m, {"x": RNG.standard_normal((4, 7)).astype(np.float32)}, ["g2"], C, "Gemm 'g1'")


def test_fold_conv_into_grouped_conv():
    C = 8
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2", group=2, pads=[1, 1, 1, 1])]
    m = _model(nodes, [("x", [1, 3, 6, 6])], ["y"],
               [_init("w1", [C, 3, 3, 3]), _init("b1", [C]), _init("w2", [6, C // 2, 3, 3]), _init("b2", [6])])
    _fold_and_compare(m, {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}, ["conv2"], C, "Conv 'conv1'")


def test_fold_convtranspose_into_conv_and_conv_into_convtranspose():
    C = 8
    nodes = [helper.make_node("ConvTranspose", ["x", "w1", "b1"], ["h"], name="up", group=2, strides=[2, 2]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv"),
             helper.make_node("ConvTranspose", ["h", "w3"], ["z"], name="up2", group=2)]
    m = _model(nodes, [("x", [1, 4, 3, 3])], ["y", "z"],
               [_init("w1", [4, C // 2, 2, 2]), _init("b1", [C]), _init("w2", [5, C, 1, 1]), _init("w3", [C, 3, 2, 2])])
    _fold_and_compare(m, {"x": RNG.standard_normal((1, 4, 3, 3)).astype(np.float32)}, ["conv", "up2"], C, "ConvTranspose 'up'")


def test_fold_batchnorm_and_decomposed_layernorm():
    C = 6
    nodes = [helper.make_node("BatchNormalization", ["x", "sc", "bb", "mu", "var"], ["h"], name="bn"),
             helper.make_node("Conv", ["h", "w"], ["y"], name="dw", group=C)]
    m = _model(nodes, [("x", [2, C, 4, 4])], ["y"],
               [_init("sc", [C]), _init("bb", [C]), _init("mu", [C]), _init("var", [C], positive=True), _init("w", [C, 1, 3, 3])])
    _fold_and_compare(m, {"x": RNG.standard_normal((2, C, 4, 4)).astype(np.float32)}, ["dw"], C, "BatchNormalization 'bn'")

    nodes = [helper.make_node("Mul", ["x", "gamma"], ["a"], name="scale"),
             helper.make_node("Add", ["a", "beta"], ["h"], name="shift"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")]
    m = _model(nodes, [("x", [2, 3, C])], ["y"], [_init("gamma", [C]), _init("beta", [C]), _init("w", [C, 4])])
    _fold_and_compare(m, {"x": RNG.standard_normal((2, 3, C)).astype(np.float32)}, ["fc"], C, "Mul 'scale'")


def test_fold_through_relu_and_maxpool_into_conv():
    C = 6
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    m = _model(nodes, [("x", [1, 3, 8, 8])], ["y"], [_init("w1", [C, 3, 3, 3]), _init("b1", [C]), _init("w2", [4, C, 1, 1])])
    how, _ = _fold_and_compare(m, {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}, ["conv2"], C, "Conv 'conv1'")
    assert "Relu" in how and "MaxPool" in how


def test_fold_fallback_inserts_mul_and_graph_input():
    C = 8
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="fc"),
             helper.make_node("Conv", ["x4", "wc"], ["z"], name="conv")]
    m = _model(nodes, [("x", [3, C]), ("x4", [1, C, 3, 3])], ["y", "z", "h"], [_init("w", [C, 5]), _init("wc", [2, C, 1, 1])])
    feed = {"x": RNG.standard_normal((3, C)).astype(np.float32), "x4": RNG.standard_normal((1, C, 3, 3)).astype(np.float32)}
    how, graph = _fold_and_compare(m, feed, ["fc"], C, "inserted Mul")
    how, graph = _fold_and_compare(m, feed, ["conv"], C, "inserted Mul")


def test_fold_shared_weight_is_scaled_once_or_copied():
    C = 8
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "w"], ["a"], name="fa"),
             helper.make_node("MatMul", ["h", "w"], ["b"], name="fb"),
             helper.make_node("MatMul", ["x", "w"], ["c"], name="other"),
             helper.make_node("Transpose", ["wt"], ["wtt"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "wtt"], ["d"], name="fd")]
    m = _model(nodes, [("x", [2, C])], ["a", "b", "c", "d"], [_init("g", [C]), _init("w", [C, C]), _init("wt", [4, C])])
    feed = {"x": RNG.standard_normal((2, C)).astype(np.float32)}
    # 'w' is also read by 'other' (outside the group): the group gets a private copy.
    _, graph = _fold_and_compare(m, feed, ["fa", "fb", "fd"], C, "LayerNormalization")
    fa = next(n for n in graph.nodes if n.name == "fa")
    fb = next(n for n in graph.nodes if n.name == "fb")
    other = next(n for n in graph.nodes if n.name == "other")
    assert fa.inputs[1] is fb.inputs[1] and fa.inputs[1] is not other.inputs[1]


def test_fold_rejects_bad_input():
    C = 4
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", [2, C])], ["y"], [_init("w", [C, 3])])
    graph = modelfile.import_graph(m)
    with pytest.raises(OnnxoptError, match="input channels"):
        fold.fold_input_scale(graph, graph.nodes, np.ones(C + 1))
    with pytest.raises(OnnxoptError, match="positive"):
        fold.fold_input_scale(graph, graph.nodes, -np.ones(C))


# ---------------------------------------------------------------- SmoothQuant
def _outlier_block(C=32, N=24, T=16):
    """LayerNorm -> Q, K, V MatMuls and a GELU MLP; the LayerNorm output has a few huge channels."""
    gamma = np.ones(C, np.float32)
    gamma[[3, 17]] = 40.0
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v"),
             helper.make_node("Gelu", ["v"], ["act"], name="gelu"),
             helper.make_node("MatMul", ["act", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(gamma, "g"), _init("b", [C], 0.1), _init("wq", [C, N], 0.2),
             _init("wk", [C, N], 0.2), _init("wv", [C, N], 0.2), _init("w2", [N, C], 0.2)]
    return _model(nodes, [("x", [1, T, C])], ["q", "k", "y"], inits, opset=20)


def _config(alpha):
    return dict(alpha=alpha, exclude=(), op_types=fold.CONSUMER_OPS, provider="cpu", memory_budget_mb=256, progress=False)


def _data(model, n=8, seed=1):
    return calib.CalibData.random(calib.input_specs(model), n, seed=seed)


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smooth_is_exact_in_fp32_and_reports_alphas(alpha):
    m = _outlier_block()
    graph = modelfile.import_graph(m)
    report = smoothquant.smooth(graph, _data(m), None, **_config(alpha))
    assert set(report["alphas"]) == {"q", "k", "v", "fc2"}
    qkv = next(g for g in report["groups"] if g["activation"] == "h")
    assert qkv["layers"] == ["q", "k", "v"] and "LayerNormalization" in qkv["fold"]
    assert report["alphas"]["q"] == report["alphas"]["k"] == report["alphas"]["v"]  # one s per activation
    if alpha == "auto":
        assert qkv["alpha"] is not None and qkv["error"]["smoothed"] < 0.5 * qkv["error"]["unsmoothed"]
    feed = {"x": RNG.standard_normal((1, 16, 32)).astype(np.float32)}
    for a, b in zip(_run(modelfile.export_graph(graph), feed), _run(m, feed)):
        assert _rel(a, b) <= 1e-5


def test_smooth_auto_lowers_int8_error_in_ort():
    """End to end in ORT: INT8 Q/DQ of the Q projection after smoothing beats plain INT8."""
    m = _outlier_block()
    feed = {"x": RNG.standard_normal((1, 16, 32)).astype(np.float32)}
    ref = _run(m, feed)[0]

    def int8_q_error(model):
        g = modelfile.import_graph(model)
        q = next(n for n in g.nodes if n.name == "q")
        x = q.inputs[0]
        absmax = calib.AbsMax()
        calib.collect_graph(g, _data(m), {x.name: [absmax]}, progress=False)
        w = fold.effective_weight(q)
        ws = np.abs(w).max(axis=0) / 127
        q.inputs[1].values = (np.clip(np.rint(w / ws), -127, 127) * ws).astype(np.float32)
        import onnx_graphsurgeon as gs
        sc = gs.Constant(x.name + "_s", np.array(absmax.value / 127, np.float32))
        zp = gs.Constant(x.name + "_z", np.array(0, np.int8))
        qx, dx = gs.Variable(x.name + "_q", np.int8), gs.Variable(x.name + "_dq", np.float32)
        g.nodes += [gs.Node("QuantizeLinear", inputs=[x, sc, zp], outputs=[qx]),
                    gs.Node("DequantizeLinear", inputs=[qx, sc, zp], outputs=[dx])]
        q.inputs[0] = dx
        return _rel(_run(modelfile.export_graph(g), feed)[0], ref)

    graph = modelfile.import_graph(m)
    smoothquant.smooth(graph, _data(m), None, **_config("auto"))
    smoothed = modelfile.export_graph(graph)
    assert int8_q_error(smoothed) < 0.5 * int8_q_error(m)


def test_smooth_conv_patches_and_plan_groups():
    C = 8
    scale = np.ones((1, C, 1, 1), np.float32)
    scale[0, 2] = 30.0
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["a", "sc"], ["h"], name="mul"),
             helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["h", "w3"], ["z"], name="pw")]
    m = _model(nodes, [("x", [2, 3, 8, 8])], ["y", "z"],
               [_init("w1", [C, 3, 3, 3]), _init("b1", [C]), numpy_helper.from_array(scale, "sc"),
                _init("w2", [4, C, 3, 3]), _init("b2", [4]), _init("w3", [4, C, 1, 1])])
    graph = modelfile.import_graph(m)
    nodes = {n.name: n for n in graph.nodes}
    plan = types.SimpleNamespace(
        activations={"h": [(nodes["conv2"], 0), (nodes["pw"], 0)], "x": [(nodes["conv1"], 0)]},
        weights=[(nodes[k], 1, nodes[k].inputs[1], 0) for k in ("conv1", "conv2", "pw")])
    report = smoothquant.smooth(graph, _data(m, 4), plan, **_config("auto"))
    h = next(g for g in report["groups"] if g["activation"] == "h")
    assert h["layers"] == ["conv2", "pw"] and h["alpha"] is not None and "Mul 'mul'" in h["fold"]
    feed = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for a, b in zip(_run(modelfile.export_graph(graph), feed), _run(m, feed)):
        assert _rel(a, b) <= 1e-5


def test_patch_sample_matches_conv():
    """im2col patches times the flattened weight reproduce the Conv output at the sampled positions."""
    import onnx_graphsurgeon as gs
    x = RNG.standard_normal((2, 3, 7, 7)).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    node = gs.Node("Conv", attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1]})
    smp = smoothquant.PatchSample(node, (3, 3), rows=4 * 8 * 2, batches=1)
    smp.update(x)
    p = smp.value
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])], [("x", [2, 3, 7, 7])], ["y"],
               [numpy_helper.from_array(w, "w")])
    y = _run(m, {"x": x})[0]  # [2, 4, 4, 4]
    got = p @ w.reshape(4, -1).T
    rows = y.transpose(0, 2, 3, 1).reshape(-1, 4)
    for r in got:  # every sampled patch output is one of the conv's output pixels
        assert np.min(np.abs(rows - r).max(axis=1)) < 1e-4


def test_bad_alpha_is_a_user_error():
    m = _outlier_block()
    with pytest.raises(OnnxoptError, match="alpha"):
        smoothquant.smooth(modelfile.import_graph(m), _data(m), None, **_config(1.5))
    with pytest.raises(OnnxoptError, match="calibration data"):
        smoothquant.smooth(modelfile.import_graph(m), None, None, **_config("auto"))


def test_cli_smoothquant_flag_and_value(tmp_path):
    import json

    from click.testing import CliRunner

    from onnxopt.cli import main
    src = tmp_path / "blk.onnx"
    modelfile.save(_outlier_block(), src)
    r = CliRunner().invoke(main, ["-q", "quantize", str(src), "--int8", "--smoothquant", "--calib-random", "4",
                                  "-o", str(tmp_path / "a.onnx"), "--report", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "a.json").read_text())["smoothquant"]
    assert rep["alpha"] == "auto" and set(rep["alphas"]) == {"q", "k", "v", "fc2"}
    r = CliRunner().invoke(main, ["-q", "quantize", str(src), "--int8", "--smoothquant", "0.8", "--calib-random", "4",
                                  "-o", str(tmp_path / "b.onnx"), "--report", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "b.json").read_text())["smoothquant"]["alphas"].values()) == {0.8}
    r = CliRunner().invoke(main, ["quantize", str(src), "--int8", "--smoothquant", "2", "--calib-random", "4", "-o", str(tmp_path / "c.onnx")])
    assert r.exit_code == 2 and "outside [0, 1]" in r.output and not (tmp_path / "c.onnx").exists()


def test_smooth_conv_graph_with_quantizer_plan():
    """A Conv-heavy graph (Conv, residual Add, Concat, ConvTranspose, Gemm) planned by the core rules:
    every planned layer gets an alpha, and the smoothed FP32 graph is exact."""
    import tiny

    from onnxopt.api import QuantConfig, prepare
    from onnxopt.quant import rules
    m = prepare(tiny.cnn(batch=2), "int8")
    graph = modelfile.import_graph(m)
    config = QuantConfig(mode="int8", smoothquant="auto", progress=False, memory_budget_mb=256)
    plan = rules.plan(graph, config)
    report = smoothquant.smooth(graph, _data(m, 4), plan, alpha="auto", memory_budget_mb=256, progress=False)
    smoothed = {n for g in report["groups"] for n in g["layers"]}
    assert smoothed and smoothed <= {n.name for n in plan.nodes}
    assert all(("alpha" in g) and g["fold"] for g in report["groups"])
    feed = {"x": RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    for a, b in zip(_run(modelfile.export_graph(graph), feed), _run(m, feed)):
        assert _rel(a, b) <= 1e-5
