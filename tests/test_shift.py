"""The channel shift before INT8 (rewrite/shift.py), its statistic (calib.ChannelExtreme), SmoothQuant choosing it,
and SmoothQuant auto as --int8's default on GEMMs (onnxopt.smoothing_defaults)."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

import tiny
from onnxopt import api, calib, modelfile
from onnxopt.rewrite import shift, smoothquant

RNG = np.random.default_rng(3)


def _arr(name, shape, scale=1.0):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=20):
    return tiny.graph_model(nodes, inputs, outputs, inits, opset)


_run, _rel = tiny.run, tiny.rel_err


def _offset_block(C=16, N=12, T=8):
    """LayerNorm whose beta puts a few channels far off zero (one-sided), read by a biased MatMul, a MatMul without
    bias, a Gemm (transB, alpha, beta) and a residual Add."""
    beta = (RNG.standard_normal(C) * 0.1).astype(np.float32)
    beta[[1, 5]] = [9.0, -7.0]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["y1"], name="fc1_bias"),
             helper.make_node("MatMul", ["h", "w2"], ["y2"], name="fc2"),
             helper.make_node("Reshape", ["h", "shape2d"], ["h2"], name="flat"),
             helper.make_node("Gemm", ["h2", "w3", "c3"], ["y3"], name="gemm", transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Add", ["h", "x"], ["res"], name="residual")]
    inits = [numpy_helper.from_array(np.ones(C, np.float32), "g"), numpy_helper.from_array(beta, "b"),
             _arr("w1", [C, N], 0.3), _arr("b1", [N]), _arr("w2", [C, N], 0.3), _arr("w3", [N, C], 0.3), _arr("c3", [N]),
             numpy_helper.from_array(np.array([-1, C], np.int64), "shape2d")]
    return _model(nodes, [("x", [1, T, C])], ["y1", "y2", "y3", "res"], inits)


def test_shift_input_is_exact_and_compensates_each_bias():
    m = _offset_block()
    feed = {"x": RNG.standard_normal((1, 8, 16)).astype(np.float32)}
    ref = _run(m, feed)
    graph = modelfile.import_graph(m)
    nodes = {n.name: n for n in graph.nodes}
    assert all(shift.applicable(nodes[k]) for k in ("fc1", "fc2", "gemm"))
    c = RNG.standard_normal(16) * 3
    how = shift.shift_input(graph, [nodes["fc1"], nodes["fc2"]], c)
    assert "Sub" in how and nodes["fc1"].inputs[0] is nodes["fc2"].inputs[0]
    assert nodes["fc1"].inputs[0].inputs[0].op == "Sub"
    assert [n.op for n in nodes["fc2"].outputs[0].outputs] == ["Add"]     # fc2 had no bias: one added
    out = _run(modelfile.export_graph(graph), feed)
    for a, b in zip(out, ref):
        assert _rel(a, b) <= 1e-5
    graph = modelfile.import_graph(m)
    gemm = next(n for n in graph.nodes if n.name == "gemm")
    gemm.inputs[0].shape = None
    shift.shift_input(graph, [gemm], c)
    assert gemm.inputs[2].name.endswith("_shift_compensated")
    for a, b in zip(_run(modelfile.export_graph(graph), feed), ref):
        assert _rel(a, b) <= 1e-5


def test_shift_shared_weight_and_bias_stay_shared_for_one_centre():
    """Two activations reading one weight and bias (ALBERT's depths): one centre and cache -> one new bias constant;
    each its own centre -> each its own, exact either way."""
    C, N = 8, 6
    nodes = [helper.make_node("MatMul", [x, "w"], [f"m{i}"], name=f"fc{i}") for i, x in enumerate(("a", "b"))]
    nodes += [helper.make_node("Add", [f"m{i}", "bias"], [f"y{i}"], name=f"bias{i}") for i in range(2)]
    m = _model(nodes, [("a", [4, C]), ("b", [4, C])], ["y0", "y1"], [_arr("w", [C, N]), _arr("bias", [N])])
    feed = {"a": RNG.standard_normal((4, C)).astype(np.float32) + 3, "b": RNG.standard_normal((4, C)).astype(np.float32)}
    ref = _run(m, feed)
    for same in (True, False):
        graph = modelfile.import_graph(m)
        fc = sorted((n for n in graph.nodes if n.op == "MatMul"), key=lambda n: n.name)
        cache = {}
        cs = [np.full(C, 3.0), np.full(C, 3.0 if same else -1.0)]
        for n, c in zip(fc, cs):
            shift.shift_input(graph, [n], c, cache=cache)
        biases = {n.outputs[0].outputs[0].inputs[1].name for n in fc}
        assert len(biases) == (1 if same else 2)
        for a, b in zip(_run(modelfile.export_graph(graph), feed), ref):
            assert _rel(a, b) <= 1e-5


def test_channel_extreme_in_graph_and_on_host():
    x = [RNG.standard_normal((2, 5, 4)).astype(np.float32) + np.arange(4) for _ in range(3)]
    lo, hi = calib.ChannelExtreme(-1, 3, lowest=True), calib.ChannelExtreme(-1, 3)
    for v in x:
        lo.update(v)
        hi.update(v)
    allx = np.concatenate([v.reshape(-1, 4) for v in x])
    assert np.allclose(lo.value, allx.min(0)) and np.allclose(hi.value, allx.max(0))
    m = _model([helper.make_node("Relu", ["x"], ["r"])], [("x", [2, 5, 4])], ["r"], [])
    data = calib.CalibData.random(calib.input_specs(m), 3, seed=2)
    glo, ghi = calib.ChannelExtreme(-1, 3, lowest=True), calib.ChannelExtreme(-1, 3)
    calib.collect_graph(modelfile.import_graph(m), data, {"r": [glo, ghi]}, progress=False)
    r = np.concatenate([np.maximum(f["x"], 0).reshape(-1, 4) for f in data])
    assert np.allclose(glo.value, r.min(0)) and np.allclose(ghi.value, r.max(0))


def _ln_mlp(C=32, N=48, T=16, offset=0.0):
    """LayerNorm (offset channels; `offset`: every channel) -> FC1 -> GELU -> FC2: the GEMM inputs the shift is for."""
    beta = (RNG.standard_normal(C) * 0.1 + offset).astype(np.float32)
    beta[[2, 9, 20]] = [12.0, -9.0, 10.0]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             helper.make_node("Gelu", ["a1"], ["g1"], name="gelu"),
             helper.make_node("MatMul", ["g1", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="fc2_bias")]
    inits = [numpy_helper.from_array(np.ones(C, np.float32), "g"), numpy_helper.from_array(beta, "b"),
             _arr("w1", [C, N], 0.2), _arr("b1", [N], 0.5), _arr("w2", [N, C], 0.2), _arr("b2", [C])]
    return _model(nodes, [("x", [1, T, C])], ["y"], inits)


def test_smooth_shifts_an_offset_activation_exactly():
    m = _ln_mlp()
    data = calib.CalibData.random(calib.input_specs(m), 8, seed=1)
    graph = modelfile.import_graph(m)
    rep = smoothquant.smooth(graph, data, None, alpha="auto", progress=False)
    ln = next(g for g in rep["groups"] if g["activation"] == "h")
    assert rep["shifted"] >= 1 and "shift" in ln and ln["range_shift"][1] < 0.6 * ln["range_shift"][0]
    assert ln["error_shifted"]["smoothed"] < ln["error"]["smoothed"]
    feed = {"x": RNG.standard_normal((1, 16, 32)).astype(np.float32)}
    assert _rel(_run(modelfile.export_graph(graph), feed)[0], _run(m, feed)[0]) <= 1e-5
    graph = modelfile.import_graph(m)
    assert smoothquant.smooth(graph, data, None, alpha="auto", progress=False, shift=False)["shifted"] == 0


def test_int8_error_lower_with_the_shift_and_smoothquant(tmp_path):
    """Written INT8 graphs against FP32 in ORT, a LayerNorm output whose channels all sit off zero: SmoothQuant with
    the shift (the default) beats SmoothQuant alone, which beats plain INT8."""
    m = _ln_mlp(offset=6.0)
    data = calib.CalibData.random(calib.input_specs(m), 16, seed=4)
    feeds = [{"x": RNG.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(4)]
    ref = np.concatenate([_run(m, f)[0] for f in feeds])
    err = {}
    for name, sq in (("plain", {}), ("sq", {"smoothquant": "auto", "shift": False}), ("shift", {"smoothquant": "auto"})):
        cfg = api.QuantConfig(mode="int8", progress=False, smoothquant=sq.get("smoothquant"))
        recipe = api.recipe(cfg)
        for p in recipe.passes:
            if isinstance(p, smoothquant.SmoothQuant):
                p.shift = sq.get("shift", True)
        from onnxopt import pipeline, settings
        runner = pipeline.Runner.from_settings(recipe, settings.RunSettings(progress=False), data=data)
        out = runner.run(m, tmp_path / f"{name}.onnx")
        q = onnx.load(str(out.path))
        err[name] = _rel(np.concatenate([_run(q, f)[0] for f in feeds]).astype(np.float32), ref)
    assert err["shift"] < err["sq"] < err["plain"], err


def _cli(tmp_path, model, *args):
    from click.testing import CliRunner

    from onnxopt.cli import main
    src = tmp_path / "m.onnx"
    modelfile.save(model, src)
    out, rep = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx", tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    r = CliRunner().invoke(main, ["-q", "quantize", str(src), *args, "--calib-random", "4", "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    return json.loads(rep.read_text())


def test_int8_defaults_to_smoothquant_on_matmuls_only(tmp_path):
    rep = _cli(tmp_path, _ln_mlp(), "--int8")
    assert "SmoothQuant auto on MatMul layers" in rep["smoothquant_default"] and rep["smoothquant"]["alpha"] == "auto"
    assert "smoothquant" not in _cli(tmp_path, _ln_mlp(), "--int8", "--smoothquant", "none")
    assert "smoothquant" not in _cli(tmp_path, _ln_mlp(), "--fp8")
    assert _cli(tmp_path, _ln_mlp(), "--int8", "--smoothquant", "0.5")["smoothquant"]["alpha"] == 0.5
    conv = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                   helper.make_node("Flatten", ["c"], ["f"], name="flat"),
                   helper.make_node("Gemm", ["f", "wg"], ["y"], name="head", transB=1)], [("x", [1, 4, 8, 8])],
                  ["y"], [_arr("w", [8, 4, 3, 3]), _arr("wg", [10, 512], 0.05)])
    rep = _cli(tmp_path, conv, "--int8")
    assert "smoothquant" not in rep and "smoothquant_default" not in rep


def test_smoothing_default_needs_data_and_int8():
    from onnxopt import smoothing_defaults
    m = _ln_mlp()
    cfg = api.QuantConfig(mode="int8")
    on, note = smoothing_defaults.apply(cfg, m, given=False)
    assert on.smoothquant == "auto" and on.smoothquant_op_types == ("MatMul",) and "--smoothquant none" in note
    for kwargs in ({"given": True}, {"given": False, "has_data": False}, {"given": False, "preset": "sdxl"}):
        assert smoothing_defaults.apply(cfg, m, **kwargs) == (cfg, None)
    fp8 = api.QuantConfig(mode="fp8")
    assert smoothing_defaults.apply(fp8, m, given=False) == (fp8, None)


def test_shared_weight_statistics_skip_the_uses_kept_high_precision(tmp_path):
    """ALBERT's depth 0 stays FP16 (the lead rule): its activation's range must not set the shared weight's scale
    and centring judgement (the union with depth 0 cost the stand-in 0.02 of output cosine)."""
    C, N = 16, 8
    nodes = [helper.make_node("MatMul", ["a", "w"], ["ya"], name="fc_a"), helper.make_node("MatMul", ["b", "w"], ["yb"], name="fc_b")]
    m = _model(nodes, [("a", [1, 4, C]), ("b", [1, 4, C])], ["ya", "yb"], [_arr("w", [C, N])])
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((4, 4, C)) * 50).astype(np.float32)
    b = (rng.standard_normal((4, 4, C)) + 2).astype(np.float32)
    np.savez(tmp_path / "c.npz", a=a, b=b)
    data = calib.CalibData.from_path(tmp_path / "c.npz", calib.input_specs(m))
    feeds = [{"a": a[i:i + 1], "b": b[i:i + 1]} for i in range(4)]
    bmax = float(np.abs(b).max())
    for kept, expect in ((frozenset(), None), (frozenset({"fc_a"}), bmax)):
        graph = modelfile.import_graph(m)
        rep = smoothquant.smooth(graph, data, None, alpha="auto", progress=False, kept=kept)
        (unit,) = rep["groups"]
        assert set(unit["shared_weight_activations"]) == {"a", "b"}
        if expect is None:
            assert unit["range_shift"][0] > 10 * bmax
        else:
            assert abs(unit["range_shift"][0] - expect) <= 1e-4 * expect
        out = _run(modelfile.export_graph(graph), feeds[0])
        for x, y in zip(out, _run(m, feeds[0])):
            assert _rel(x, y) <= 1e-5
