"""2:4 sparsity: pattern on the right axis for every layer kind, skips, SparseGPT vs magnitude, CLI, quantization."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxopt import calib, modelfile
from onnxopt.rewrite import sparsegpt, sparsity
from onnxopt import ort as oort
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return m


def _vi(name, shape, t=F):
    return helper.make_tensor_value_info(name, t, shape)


def _w(rng, shape, name, dtype=np.float32):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def _graph(model):
    return modelfile.import_graph(model)


def _const(graph, name):
    return graph.tensors()[name].values


def _zoo(rng):
    """One model holding every layer kind, with weights behind Cast, Transpose and DequantizeLinear."""
    inits = [
        _w(rng, (16, 8, 3, 3), "conv_w"),                 # Conv [K, C, R, S]: groups along C
        _w(rng, (16, 8, 2, 2), "convt_w"),                # ConvTranspose [C, K, R, S]: along C (axis 0)
        _w(rng, (32, 24), "mm_w"),                        # MatMul B [K, N]: along K
        _w(rng, (24, 16), "gemm_w"),                      # Gemm transB=0: axis 0
        _w(rng, (12, 16), "gemm_t_w"),                    # Gemm transB=1: axis 1
        _w(rng, (12, 16), "mm_tr_w"),                     # behind Transpose -> [16, 12] as MatMul B: axis 1
        _w(rng, (16, 12), "mm_cast_w", np.float16),       # behind Cast
        numpy_helper.from_array(rng.integers(-100, 100, (12, 8)).astype(np.int8), "mm_q_w"),  # behind DQ
        numpy_helper.from_array(np.linspace(0.01, 0.02, 8).astype(np.float32), "mm_q_s"),
        numpy_helper.from_array(np.zeros(8, np.int8), "mm_q_z"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c1", "convt_w"], ["c2"], name="convt", strides=[2, 2]),
        helper.make_node("ReduceMean", ["c2"], ["p"], name="pool", axes=[2, 3], keepdims=0),  # [N, 8]
        helper.make_node("Concat", ["p", "p", "p", "p"], ["p4"], name="cat", axis=1),         # [N, 32]
        helper.make_node("MatMul", ["p4", "mm_w"], ["m1"], name="mm"),                        # [N, 24]
        helper.make_node("Gemm", ["m1", "gemm_w"], ["m2"], name="gemm"),                     # [N, 16]
        helper.make_node("Gemm", ["m2", "gemm_t_w"], ["m3"], name="gemm_t", transB=1),       # [N, 12]
        helper.make_node("Transpose", ["mm_tr_w"], ["mm_tr_wt"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["m2", "mm_tr_wt"], ["m4"], name="mm_tr"),                # [N, 12]
        helper.make_node("Add", ["m3", "m4"], ["m5"], name="add"),
        helper.make_node("Cast", ["mm_cast_w"], ["mm_cast_wf"], name="cast", to=F),
        helper.make_node("MatMul", ["m2", "mm_cast_wf"], ["m6"], name="mm_cast"),            # [N, 12]
        helper.make_node("Add", ["m5", "m6"], ["m7"], name="add2"),
        helper.make_node("DequantizeLinear", ["mm_q_w", "mm_q_s", "mm_q_z"], ["mm_q_wf"], name="dq", axis=1),
        helper.make_node("MatMul", ["m7", "mm_q_wf"], ["y"], name="mm_q"),                   # [N, 8]
    ]
    return _model(nodes, [_vi("x", [2, 8, 6, 6])], [_vi("y", [2, 8])], inits)


AXES = {"conv_w": 1, "convt_w": 0, "mm_w": 0, "gemm_w": 0, "gemm_t_w": 1, "mm_tr_w": 1, "mm_cast_w": 0, "mm_q_w": 0}


def test_every_layer_kind_is_2_4_along_its_input_channels():
    rng = np.random.default_rng(0)
    model = _zoo(rng)
    graph = _graph(model)
    before = {k: np.array(_const(graph, k)) for k in AXES}
    rep = sparsity.sparsify(graph, min_params=0, progress=False)
    assert rep["pruned"] == len(AXES) and rep["skipped"] == 0
    for name, axis in AXES.items():
        w = _const(graph, name)
        assert sparsity.is_2_4(w, axis) if name != "mm_q_w" else sparsity.is_2_4(w.astype(np.int32), axis), name
        # exactly half the values are zero, and the kept ones are the largest |w| of their group (magnitude)
        assert np.count_nonzero(w) == w.size // 2, name
        b = np.moveaxis(np.abs(before[name].astype(np.float32)), axis, -1)
        a = np.moveaxis(np.asarray(w).astype(np.float32) != 0, axis, -1)
        g = b.reshape(b.shape[:-1] + (-1, 4))
        kept = a.reshape(g.shape)
        assert np.all(np.where(kept, g, np.inf).min(-1) >= np.where(kept, -np.inf, g).max(-1)), name
        # the pattern along any other axis would generally fail: the axis is the right one
        other = (axis + 1) % w.ndim
        if w.shape[other] % 4 == 0:
            assert not sparsity.is_2_4(np.asarray(w).astype(np.float32), other), name
    assert _const(graph, "mm_cast_w").dtype == np.float16 and _const(graph, "mm_q_w").dtype == np.int8
    # the pruned model runs and matches numpy on the pruned weights (the Conv path checked against ORT)
    out = modelfile.export_graph(graph)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    y = oort.session(out).run(None, {"x": x})[0]
    assert y.shape == (2, 8) and np.all(np.isfinite(y))
    # report() sees every layer as 2:4
    rows = sparsity.report(graph)
    assert {r["weight"] for r in rows} == set(AXES)
    assert all(r["eligible"] and r["is_2_4"] for r in rows)
    assert sparsity.summary(rows)["param_share"] == 1.0


def test_input_model_untouched_and_report_on_dense():
    rng = np.random.default_rng(1)
    model = _zoo(rng)
    rows = sparsity.report(_graph(model))
    assert all(r["eligible"] and not r["is_2_4"] for r in rows)
    s = sparsity.summary(rows)
    assert s["sparse_params"] == 0 and s["flops"] > 0
    conv = next(r for r in rows if r["name"] == "conv")
    # Conv output [2, 16, 6, 6]: 2 * 72 outputs-per-channel-position... = 2 * (2*16*6*6) * (8*3*3)
    assert conv["flops"] == 2 * (2 * 16 * 6 * 6) * (8 * 3 * 3) and conv["flops_exact"]
    mm = next(r for r in rows if r["name"] == "mm")
    assert mm["flops"] == 2 * (2 * 24) * 32


def test_is_2_4():
    a = np.array([[1, 0, 2, 0], [0, 0, 0, 3]], np.float32)
    assert sparsity.is_2_4(a, 1)
    assert not sparsity.is_2_4(np.ones((2, 4)), 1)
    assert not sparsity.is_2_4(np.zeros((2, 6)), 1)  # axis not a multiple of 4
    assert sparsity.is_2_4(a.T, 0)


def test_shared_initializer_pruned_once():
    rng = np.random.default_rng(2)
    inits = [_w(rng, (16, 16), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")]
    model = _model(nodes, [_vi("x", [4, 16])], [_vi("y", [4, 16])], inits)
    graph = _graph(model)
    w0 = np.array(_const(graph, "w"))
    rep = sparsity.sparsify(graph, min_params=0, progress=False)
    w = _const(graph, "w")
    assert rep["pruned"] == 2 and sparsity.is_2_4(w, 0)
    # pruned once: the magnitude mask of the original values, not a second pruning of the pruned ones
    np.testing.assert_array_equal(w, np.where(sparsity.keep_mask(np.abs(w0), 0), w0, 0))
    assert rep["sparse_params"] == 256 and rep["weight_params"] == 256


def test_skips_with_reasons():
    rng = np.random.default_rng(3)
    inits = [_w(rng, (6, 8), "odd"), _w(rng, (8, 8), "small"), _w(rng, (64, 64), "big"), _w(rng, (64, 64), "ex"),
             _w(rng, (64, 64), "shared_ex")]
    nodes = [helper.make_node("MatMul", ["x", "odd"], ["a"], name="mm_odd"),           # K = 6: not divisible
             helper.make_node("MatMul", ["a", "small"], ["b"], name="mm_small"),       # 64 < min_params
             helper.make_node("Pad", ["b", "pads"], ["b2"], name="pad"),
             helper.make_node("MatMul", ["b2", "big"], ["c"], name="mm_big"),
             helper.make_node("MatMul", ["c", "ex"], ["d"], name="head/mm_ex"),        # excluded
             helper.make_node("MatMul", ["d", "shared_ex"], ["e"], name="mm_s1"),
             helper.make_node("MatMul", ["e", "shared_ex"], ["y"], name="head/mm_s2")]  # shared with excluded
    inits.append(numpy_helper.from_array(np.array([0, 0, 0, 56], np.int64), "pads"))
    model = _model(nodes, [_vi("x", [2, 6])], [_vi("y", [2, 64])], inits)
    graph = _graph(model)
    before = {k: np.array(_const(graph, k)) for k in ("odd", "small", "ex", "shared_ex")}
    rep = sparsity.sparsify(graph, min_params=1000, exclude=["^head/"], progress=False)
    by = {r["name"]: r for r in rep["layers"]}
    assert by["mm_big"]["status"] == "pruned" and sparsity.is_2_4(_const(graph, "big"), 0)
    assert "not a multiple of 4" in by["mm_odd"]["reason"]
    assert "min_params" in by["mm_small"]["reason"]
    assert "exclude" in by["head/mm_ex"]["reason"]
    assert "shared" in by["mm_s1"]["reason"] and by["mm_s1"]["status"] == "skipped"
    for k, v in before.items():
        np.testing.assert_array_equal(_const(graph, k), v)


def test_initializer_with_other_uses_is_skipped():
    rng = np.random.default_rng(4)
    inits = [_w(rng, (64, 64), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Add", ["a", "w"], ["y"], name="add")]
    graph = _graph(_model(nodes, [_vi("x", [64, 64])], [_vi("y", [64, 64])], inits))
    rep = sparsity.sparsify(graph, progress=False)
    assert rep["pruned"] == 0 and "also feeds Add" in rep["layers"][0]["reason"]


def test_bad_options():
    graph = _graph(_zoo(np.random.default_rng(5)))
    with pytest.raises(OnnxoptError, match="pattern"):
        sparsity.sparsify(graph, pattern="4:2")
    with pytest.raises(OnnxoptError, match="calibration data"):
        sparsity.sparsify(graph, method="sparsegpt")
    with pytest.raises(OnnxoptError, match="method"):
        sparsity.sparsify(graph, method="random")
    with pytest.raises(OnnxoptError, match="exclude"):
        sparsity.sparsify(graph, exclude=["("])


# ---------------------------------------------------------------- SparseGPT
def _correlated(rng, n, k):
    """Samples (from `rng`) of one fixed distribution with correlated channels and uneven scales, like activations."""
    fixed = np.random.default_rng(1234)
    low = fixed.standard_normal((k // 4, k))
    mix = fixed.standard_normal((k, k)) * 0.3 + np.eye(k)
    scale = np.exp(fixed.standard_normal(k))
    return (rng.standard_normal((n, k // 4)) @ low + 0.3 * rng.standard_normal((n, k))) @ mix * scale


def test_sparsegpt_prune_beats_magnitude_on_correlated_inputs():
    rng = np.random.default_rng(6)
    k, out = 64, 32
    X = _correlated(rng, 2048, k)
    W = rng.standard_normal((out, k))
    H = X.T @ X
    Wp = sparsity.sparsegpt_prune(W, H, damp=0.01, block=16)
    assert sparsity.is_2_4(Wp, 1)
    Wm = np.where(sparsity.keep_mask(np.abs(W), 1), W, 0)
    Xt = _correlated(np.random.default_rng(7), 512, k)  # held out
    err_sg = np.mean((Xt @ (W - Wp).T) ** 2)
    err_mag = np.mean((Xt @ (W - Wm).T) ** 2)
    assert err_sg < 0.7 * err_mag


def _mlp_model(rng, k=32, hidden=64, cout=8):
    inits = [_w(rng, (k, hidden), "w1"), _w(rng, (hidden, k), "w2"),
             _w(rng, (cout, k, 3, 3), "cw")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2"),
             helper.make_node("Reshape", ["y", "shp"], ["y4"], name="reshape"),
             helper.make_node("Conv", ["y4", "cw"], ["z"], name="conv", pads=[1, 1, 1, 1], strides=[1, 2])]
    inits.append(numpy_helper.from_array(np.array([-1, k, 4, 4], np.int64), "shp"))
    return _model(nodes, [_vi("x", [16, k])], [_vi("z", [1, cout, 4, 2])], inits)


def _data(model, rng, n, k=32):
    specs = calib.input_specs(model)
    x = np.stack([_correlated(rng, 16, k).astype(np.float32) for _ in range(n)])
    return calib.CalibData(specs, [lambda: {"x": x}])


@pytest.mark.parametrize("sequential", [True, False])
def test_sparsegpt_graph_beats_magnitude(sequential):
    rng = np.random.default_rng(8)
    model = _mlp_model(rng)
    cal = _data(model, np.random.default_rng(9), 32)
    held = _data(model, np.random.default_rng(10), 16)
    ref_sess = oort.session(model)

    def err(m):
        s = oort.session(m)
        return np.mean([np.mean((s.run(None, f)[0] - ref_sess.run(None, f)[0]) ** 2) for f in held])

    outs = {}
    for method in ("magnitude", "sparsegpt"):
        graph = _graph(model)
        rep = sparsity.sparsify(graph, method=method, data=cal, min_params=0, progress=False, sequential=sequential)
        assert rep["pruned"] == 3
        assert all(r["method"] == method for r in rep["layers"])
        for name, axis in (("w1", 0), ("w2", 0), ("cw", 1)):
            assert sparsity.is_2_4(_const(graph, name), axis), (method, name)
        outs[method] = err(modelfile.export_graph(graph))
        if method == "sparsegpt":
            assert rep["stages"] == (3 if sequential else 1)
            # sequential holds one layer's H at a time (the Conv's im2col H is the largest: 288x288 float64)
            dims = (32, 64, 32 * 9)
            held = max(d * d for d in dims) if sequential else sum(d * d for d in dims)
            assert rep["hessian_peak_mb"] == round(8 * held / 2**20, 2)
            conv = next(r for r in rep["layers"] if r["name"] == "conv")
            assert conv["output_error"] < conv["output_error_magnitude"]
    assert outs["sparsegpt"] < 0.8 * outs["magnitude"]


def test_hessian_im2col_matches_conv():
    """The im2col rows times the reshaped weight reproduce ORT's Conv (padding, stride, dilation)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 7, 9)).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    for attrs in ({"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}):
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)
        m = _model([node], [_vi("x", list(x.shape))], [helper.make_tensor_value_info("y", F, None)],
                   [numpy_helper.from_array(w, "w")])
        y = oort.session(m).run(None, {"x": x})[0]
        g = _graph(m)
        n = g.nodes[0]
        key = sparsegpt._hkey(n, w.shape)
        rows = np.concatenate(list(calib.im2col(x, key.conv, key.dim)))
        wr = w.transpose(0, 2, 3, 1).reshape(5, -1)
        got = (rows @ wr.T).reshape(2, y.shape[2], y.shape[3], 5).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_sparsegpt_falls_back_to_magnitude_for_conv_transpose():
    rng = np.random.default_rng(12)
    model = _zoo(rng)
    cal = calib.CalibData.random(calib.input_specs(model), 4, seed=0)
    graph = _graph(model)
    rep = sparsity.sparsify(graph, method="sparsegpt", data=cal, min_params=0, progress=False)
    by = {r["name"]: r for r in rep["layers"]}
    assert by["convt"]["method"] == "magnitude" and "fallback" in by["convt"]["reason"]
    assert by["mm_q"]["method"] == "magnitude"  # quantized weight
    assert by["mm_tr"]["method"] == "sparsegpt" and by["gemm_t"]["method"] == "sparsegpt"
    assert by["conv"]["method"] == "sparsegpt" and by["mm_cast"]["method"] == "sparsegpt"
    assert all(r["is_2_4"] for r in sparsity.report(graph))


# ---------------------------------------------------------------- CLI and files
def test_cli_sparsify(tmp_path):
    rng = np.random.default_rng(13)
    src = tmp_path / "m.onnx"
    modelfile.save(_zoo(rng), src)
    raw = src.read_bytes()
    out, rep = tmp_path / "s.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["sparsify", str(src), "-o", str(out), "--min-params", "0",
                                  "--exclude", "^mm_q$", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert "pruned 7 layers to 2:4 (magnitude), 1 skipped" in r.output and "skipped mm_q: excluded" in r.output
    assert src.read_bytes() == raw
    rows = {x["name"]: x for x in sparsity.report(modelfile.import_graph(modelfile.load(out)))}
    assert all(x["is_2_4"] for n, x in rows.items() if n != "mm_q") and not rows["mm_q"]["is_2_4"]
    assert json.loads(rep.read_text())["pruned"] == 7
    # inspect --sparsity lists the layers and the sparse shares
    js = tmp_path / "i.json"
    r = CliRunner().invoke(main, ["inspect", str(out), "--sparsity", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "7/8 eligible layers are 2:4" in r.output
    line = next(x for x in r.output.splitlines() if x.startswith("mm_q "))
    assert " no " in line
    sp = json.loads(js.read_text())["sparsity"]
    assert sp["sparse_layers"] == 7 and 0 < sp["param_share"] < 1 and 0 < sp["flops_share"] < 1
    # sparsegpt with random calibration through the CLI
    r = CliRunner().invoke(main, ["-q", "sparsify", str(src), "-o", str(out), "--min-params", "0", "--method", "sparsegpt",
                                  "--calib-random", "4"])
    assert r.exit_code == 0, r.output
    assert all(x["is_2_4"] for x in sparsity.report(modelfile.import_graph(modelfile.load(out))))


def test_cli_errors(tmp_path):
    src = tmp_path / "m.onnx"
    modelfile.save(_zoo(np.random.default_rng(14)), src)
    r = CliRunner().invoke(main, ["sparsify", str(src), "-o", str(tmp_path / "o.onnx"), "--method", "sparsegpt"])
    assert r.exit_code == 2 and "needs calibration data" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["sparsify", str(src), "-o", str(src)])
    assert r.exit_code == 2 and "input" in r.output
    r = CliRunner().invoke(main, ["sparsify", str(src), "-o", str(tmp_path / "o.onnx"), "--pattern", "3"])
    assert r.exit_code == 2 and "pattern" in r.output


# ---------------------------------------------------------------- stacked with quantization
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_weights_stay_2_4(tmp_path, mode):
    from onnxopt import api as quant
    rng = np.random.default_rng(15)
    src = tmp_path / "m.onnx"
    modelfile.save(_mlp_model(rng, k=64, hidden=128, cout=32), src)  # above min_params, and FP8-sized for TensorRT
    cfg = quant.QuantConfig(mode=mode, sparsity="2:4", progress=False, high_precision="fp32")
    res = quant.quantize(src, tmp_path / "q.onnx", config=cfg, calib_random=4)
    graph = modelfile.import_graph(modelfile.load(res.path))
    rows = {r["weight"]: r for r in sparsity.report(graph)}
    assert len(rows) == 3
    for r in rows.values():
        assert r["is_2_4"], r
    # and the stored (quantized) weights themselves are 2:4 with zero points 0
    stored = {t.name: t for t in modelfile.load(res.path).graph.initializer}
    want = TensorProto.INT8 if mode == "int8" else TensorProto.FLOAT8E4M3FN
    for r in rows.values():
        t = stored[r["weight"]]
        assert t.data_type == want
        assert sparsity.is_2_4(numpy_helper.to_array(t).astype(np.float32), r["axis"])


def test_asymmetric_dequantize_prunes_to_the_zero_point():
    rng = np.random.default_rng(16)
    q = rng.integers(0, 256, (16, 8)).astype(np.uint8)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.float32(0.05), "s"),
             numpy_helper.from_array(np.uint8(128), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = _graph(_model(nodes, [_vi("x", [2, 16])], [_vi("y", [2, 8])], inits))
    assert not sparsity.report(graph)[0]["is_2_4"]
    sparsity.sparsify(graph, min_params=0, progress=False)
    out = _const(graph, "q")
    deq = (out.astype(np.float32) - 128) * 0.05
    assert sparsity.is_2_4(deq, 0) and sparsity.report(graph)[0]["is_2_4"]
    # kept: the 2 largest |q - 128| of each group of 4 along K
    ref = np.where(sparsity.keep_mask(np.abs(q.astype(np.float32) - 128), 0), q, 128)
    np.testing.assert_array_equal(out, ref)


def test_batched_feeds_merge_only_dynamic_batches():
    specs = [calib.InputSpec("x", ("N", 4), np.dtype(np.float32))]
    x = np.arange(40, dtype=np.float32).reshape(10, 1, 4)
    data = calib.CalibData(specs, [lambda: {"x": x}])
    merged = list(sparsegpt._Batched(data, max_batch=4))
    assert [b["x"].shape[0] for b in merged] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in merged]), x[:, 0])
    fixed = calib.CalibData([calib.InputSpec("x", (1, 4), np.dtype(np.float32))], [lambda: {"x": x}])
    assert len(list(sparsegpt._Batched(fixed))) == 10


def test_cli_quantize_with_sparsity(tmp_path):
    pytest.importorskip("onnxopt.quant")
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    modelfile.save(_mlp_model(np.random.default_rng(17), k=64, hidden=128, cout=32), src)
    r = CliRunner().invoke(main, ["-q", "quantize", str(src), "-o", str(out), "--int8", "--calib-random", "4",
                                  "--sparsity", "2:4", "--sparsity-method", "sparsegpt", "--high-precision", "fp32"])
    assert r.exit_code == 0, r.output
    rows = sparsity.report(modelfile.import_graph(modelfile.load(out)))
    assert len(rows) == 3 and all(x["is_2_4"] for x in rows)
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--calib-random", "4", "--sparsity", "4"])
    assert r.exit_code == 2 and "pattern" in r.output


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_no_pruned_weight_stays_in_memory(tmp_path, monkeypatch, method):
    """Inside modelfile.spilling, pruned weights go to the spill file; the graph holds no weight array afterwards
    (SparseGPT reads weights through graph.read_values, never through the caching `.values`)."""
    import onnx_graphsurgeon as gs
    rng = np.random.default_rng(20)
    monkeypatch.setattr(modelfile, "SPILL_BYTES", 1 << 15)  # small weights spill like big ones
    k, hidden = 64, 256
    inits = [_w(rng, (k, hidden), "w1"), _w(rng, (hidden, k), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")]
    model = _model(nodes, [_vi("x", ["n", k])], [_vi("y", ["n", k])], inits)
    data = calib.CalibData.random(calib.input_specs(model), 4, shapes={"x": (8, k)})
    with modelfile.spilling(tmp_path):
        graph = _graph(model)
        rep = sparsity.sparsify(graph, method=method, data=data, progress=False)
        assert rep["pruned"] == 2 and all(r["method"] == method for r in rep["layers"])
        for name in ("w1", "w2"):
            const = graph.tensors()[name]
            assert isinstance(const._values, gs.ir.tensor.LazyValues), name
            assert sparsity.is_2_4(const._values.load(), 0)
