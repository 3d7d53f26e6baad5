"""INT4 blockwise weight-only quantization (packing, DequantizeLinear, ORT) and AWQ (scales, clip)."""
from __future__ import annotations


import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tiny
from onnxopt import calib, modelfile
from onnxopt.rewrite import awq
from onnxopt import graph as G
from onnxopt.formats import INT4
from onnxopt.errors import OnnxoptError
from onnxopt.quant import int4_weights

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=21):
    return tiny.graph_model(nodes, inputs, outputs, inits, opset)


_run, _rel = tiny.run, tiny.rel_err


def _config(**kw):
    base = dict(awq="none", block_size=128, int8_layers=None, exclude=(), op_types=("Conv", "ConvTranspose", "MatMul", "Gemm"),
                high_precision="fp32", provider="cpu", memory_budget_mb=256, progress=False)
    base.update(kw)
    return base


def _select(graph, **kw):
    c = _config(**kw)
    return int4_weights.select_layers(graph, exclude=c["exclude"], op_types=c["op_types"], int8_layers=c["int8_layers"])


def _mlp(k=256, n=96, outliers=(), gemm=False, seq=24):
    """x -> LayerNorm (a few huge channels) -> MatMul [k, n] (or Gemm transB) -> Relu -> MatMul [n, 64]."""
    gamma = np.ones(k, np.float32)
    gamma[list(outliers)] = 25.0
    w1 = RNG.standard_normal((n, k) if gemm else (k, n)).astype(np.float32) * 0.05
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln"),
             helper.make_node("Gemm", ["h", "w1"], ["a"], name="fc1", transB=1) if gemm else
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="fc1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    shape = [seq, k] if gemm else [1, seq, k]
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(RNG.standard_normal(k).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(RNG.standard_normal((n, 64)).astype(np.float32) * 0.1, "w2")]
    return _model(nodes, [("x", shape)], ["y", "a"], inits)


def _data(model, n=8, seed=1):
    return calib.CalibData.random(calib.input_specs(model), n, seed=seed)


def _feed(model, seed=7):
    spec = calib.input_specs(model)[0]
    return {spec.name: np.random.default_rng(seed).standard_normal(spec.shape).astype(np.float32)}


# ---------------------------------------------------------------- packing and DequantizeLinear
@pytest.mark.parametrize("k,block,gemm", [(256, 128, False), (200, 64, False), (256, 0, False), (256, 32, True), (96, 0, True)])
def test_int4_weights_round_trip_and_run_in_ort(k, block, gemm):
    m = _mlp(k=k, gemm=gemm)
    ref_graph = modelfile.import_graph(m)
    fc1 = next(n for n in ref_graph.nodes if n.name == "fc1")
    w = G.to_kn(fc1, np.asarray(fc1.inputs[1].values))
    q_ref, s_ref = INT4.quantize_weight(w, 1, block_size=block)

    graph = modelfile.import_graph(m)
    report = int4_weights.quantize_int4(graph, None, **_config(block_size=block))
    assert report["layers"]["fc1"]["bits"] == 4
    out = modelfile.export_graph(graph, opset=21)
    onnx.checker.check_model(out)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and "w1" in n.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    eff = int4_weights.fusable_block_size(k, block)  # one block along K is written as two (TensorRT fuses only those)
    assert attrs.get("block_size", 0) == eff and eff and eff < k
    assert attrs["axis"] == ((1 if eff else 0) if gemm else (0 if eff else 1))
    inits = {t.name: t for t in out.graph.initializer}
    packed = inits[dq.input[0]]
    assert packed.data_type == TensorProto.INT4 and len(packed.raw_data) == (w.size + 1) // 2
    q = numpy_helper.to_array(packed)
    assert q.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(q.astype(np.int8), q_ref.T if gemm else q_ref)
    scale = numpy_helper.to_array(inits[dq.input[1]])
    s_ref = s_ref if eff == block else np.repeat(s_ref[:1], 2, axis=0)
    assert scale.shape == (s_ref.T if gemm else s_ref).shape

    # ORT at ORT_DISABLE_ALL computes with exactly the dequantized weight.
    feed = _feed(m)
    got = _run(out, feed)[1]
    deq = INT4.fake_quant(w, 1, block_size=block)
    h = _run(_model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"])], [("x", list(feed["x"].shape))], ["h"],
                    [t for t in m.graph.initializer if t.name in ("g", "b")]), feed)[0]
    np.testing.assert_allclose(got, h @ deq, rtol=1e-4, atol=1e-4)


def test_int8_layers_keep_per_channel_int8():
    m = _mlp()
    graph = modelfile.import_graph(m)
    report = int4_weights.quantize_int4(graph, None, **_config(int8_layers="fc2"))
    assert report["layers"]["fc2"]["bits"] == 8 and report["layers"]["fc1"]["bits"] == 4
    out = modelfile.export_graph(graph, opset=21)
    inits = {t.name: t for t in out.graph.initializer}
    dqs = {n.input[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    w2q = next(v for k, v in dqs.items() if "w2" in k)
    assert inits[w2q.input[0]].data_type == TensorProto.INT8
    assert {a.name: helper.get_attribute_value(a) for a in w2q.attribute} == {"axis": 1}
    all4 = modelfile.import_graph(m)
    int4_weights.quantize_int4(all4, None, **_config())
    feed = _feed(m)
    ref = _run(m, feed)[0]
    assert _rel(_run(out, feed)[0], ref) < _rel(_run(modelfile.export_graph(all4, opset=21), feed)[0], ref)


def test_bad_options_are_user_errors():
    m = _mlp()
    with pytest.raises(OnnxoptError, match="block-size"):
        int4_weights.quantize_int4(modelfile.import_graph(m), None, **_config(block_size=100))
    with pytest.raises(OnnxoptError, match="awq"):
        int4_weights.quantize_int4(modelfile.import_graph(m), None, **_config(awq="best"))
    with pytest.raises(OnnxoptError, match="calibration data"):
        int4_weights.quantize_int4(modelfile.import_graph(m), None, **_config(awq="full"))
    with pytest.raises(OnnxoptError, match="int8-layers"):
        int4_weights.quantize_int4(modelfile.import_graph(m), None, **_config(int8_layers="("))


# ---------------------------------------------------------------- AWQ
def _layer_error(model, feed, ref):
    return _rel(_run(model, feed)[1], ref)  # output 'a': the first layer, whose input has the outliers


@pytest.mark.parametrize("gemm", [False, True])
def test_awq_beats_rtn_on_activation_outliers(gemm):
    m = _mlp(outliers=(3, 50, 130), gemm=gemm)
    feed = _feed(m)
    ref = _run(m, feed)[1]
    errs = {}
    for method in ("none", "lite", "clip", "full"):
        graph = modelfile.import_graph(m)
        report = int4_weights.quantize_int4(graph, _data(m), **_config(awq=method))
        errs[method] = _layer_error(modelfile.export_graph(graph, opset=21), feed, ref)
        if method in ("lite", "full"):
            group = next(g for g in report["awq_search"]["groups"] if g["layers"] == ["fc1"])
            assert group["alpha"] is not None and "LayerNormalization 'ln'" in group["fold"]
    assert errs["lite"] < 0.8 * errs["none"]
    assert errs["clip"] < errs["none"]
    assert errs["full"] < 0.8 * errs["none"] and errs["full"] <= min(errs["lite"], errs["clip"]) * 1.05


def test_awq_scaled_fp32_graph_is_exact_before_quantization():
    m = _mlp(outliers=(3, 50, 130))
    graph = modelfile.import_graph(m)
    layers, _ = _select(graph)
    report, clips = awq.apply(graph, _data(m), layers, method="full", block_size=128, high_precision="fp32", progress=False)
    assert any(g["alpha"] is not None for g in report["groups"])
    # Clip ratios, or (INT4 values, scales) where error-feedback rounding ran (enough rows for fc2's K).
    assert set(clips) == {"fc1", "fc2"}
    for c in clips.values():
        assert (c[0].dtype == np.int8) if isinstance(c, tuple) else ((c >= 0.5) & (c <= 1.0)).all()
    feed = _feed(m)
    for a, b in zip(_run(modelfile.export_graph(graph), feed), _run(m, feed)):
        assert _rel(a, b) <= 1e-5


def test_clip_search_coordinate_descent_never_worse_than_blockwise():
    k, n, b = 256, 32, 64
    x = RNG.standard_normal((512, k)).astype(np.float32)
    x[:, :8] *= 10
    x[:, 64:72] += x[:, :8]  # correlated channels in different blocks: the blocks interact
    h = x.T @ x
    w = RNG.standard_normal((k, n)).astype(np.float32)
    r0, info0 = awq.search_clip(h, w, b, sweeps=0)
    r2, info2 = awq.search_clip(h, w, b, sweeps=2)
    assert info0["clip"] < info0["rtn"]
    assert info2["clip"] <= info0["clip"] + 1e-12
    err = lambda r: float(np.sum((x @ (INT4.fake_quant(w, 1, block_size=b, clip=r) - w)) ** 2))  # noqa: E731
    assert err(r2) <= err(np.ones_like(r2))


def test_gram_and_channel_mean_reducers_stream():
    xs = [RNG.standard_normal((2, 5, 6)).astype(np.float32) for _ in range(3)]
    g, mean = awq.Gram(-1), awq.ChannelMeanAbs(-1)
    for x in xs:
        g.update(x)
        mean.update(x)
    rows = np.concatenate([x.reshape(-1, 6) for x in xs])
    np.testing.assert_allclose(g.value, rows.T @ rows, rtol=1e-5)
    np.testing.assert_allclose(mean.value, np.abs(rows).mean(0), rtol=1e-6)


def test_int4_model_is_under_30_percent_of_fp16(tmp_path):
    """End to end through quantize(): a MatMul-dominated model shrinks to <= 0.30x its FP16 size."""
    from onnxopt import QuantConfig, quantize
    from onnxopt.api import convert
    k = 512
    nodes, inits, x = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(RNG.standard_normal((k, k)).astype(np.float32) * 0.05, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    m = _model(nodes, [("x", [1, 16, k])], [x], inits, opset=17)
    src = tmp_path / "mlp.onnx"
    modelfile.save(m, src)
    fp16 = convert(src, tmp_path / "fp16.onnx")
    res = quantize(src, tmp_path / "int4.onnx", config=QuantConfig(mode="int4", awq="full", progress=False),
                   calib_random=4)
    ratio = (tmp_path / "int4.onnx").stat().st_size / fp16.stat().st_size
    assert ratio <= 0.30, ratio
    assert all(v["bits"] == 4 for v in res.report["int4"]["layers"].values())
    feed = _feed(m)
    from onnxopt.cast.autocast import fp32_view
    got = _run(fp32_view(modelfile.load(tmp_path / "int4.onnx")), feed)[0]
    assert _rel(got, _run(m, feed)[0]) < 0.2


def test_cli_int4_options(tmp_path):
    import json

    from click.testing import CliRunner

    from onnxopt.cli import main
    src = tmp_path / "mlp.onnx"
    modelfile.save(_mlp(outliers=(3,)), src)
    r = CliRunner().invoke(main, ["-q", "quantize", str(src), "--int4", "--awq", "lite", "--block-size", "64", "--int8-layers", "fc2",
                                  "--calib-random", "4", "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "q.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "q.json").read_text())["int4"]
    assert rep["awq"] == "lite" and rep["block_size"] == 64
    assert rep["layers"]["fc1"]["bits"] == 4 and rep["layers"]["fc2"]["bits"] == 8
    r = CliRunner().invoke(main, ["quantize", str(src), "--int4", "--block-size", "100", "--calib-random", "4", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "block-size" in r.output and "Traceback" not in r.output


def test_awq_falls_back_to_row_samples_under_a_tight_budget():
    m = _mlp(outliers=(3, 50, 130))
    feed = _feed(m)
    ref = _run(m, feed)[1]
    graph = modelfile.import_graph(m)
    layers, _ = _select(graph)
    report, clips = awq.apply(graph, _data(m), layers, method="full", block_size=128, high_precision="fp32",
                              memory_budget_mb=0, progress=False)
    assert report["statistics"] == "sampled rows" and set(clips) == {"fc1", "fc2"}
    for a, b in zip(_run(modelfile.export_graph(graph), feed), _run(m, feed)):
        assert _rel(a, b) <= 1e-5
    rtn = modelfile.import_graph(m)
    int4_weights.quantize_int4(rtn, None, **_config())
    graph2 = modelfile.import_graph(m)
    int4_weights.quantize_int4(graph2, _data(m), **_config(awq="full", memory_budget_mb=0))
    assert _layer_error(modelfile.export_graph(graph2, opset=21), feed, ref) < _layer_error(modelfile.export_graph(rtn, opset=21), feed, ref)


def test_no_module_level_import_circle():
    """No import circle anywhere in the package (module-level imports, read from the source): AWQ's searches
    use onnxopt.formats; only the INT4 writer imports awq."""
    import ast
    from pathlib import Path

    import onnxopt
    root = Path(onnxopt.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    edges = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(f.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                mod = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                for a in node.names:
                    deps.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        edges[name] = {d for d in deps if d in mods and d != name}
    assert "onnxopt.quant.int4_weights" not in edges["onnxopt.rewrite.awq"]

    state = {}

    def visit(n, path):
        state[n] = 1
        for d in edges[n]:
            if state.get(d) == 1:
                # a package importing its own submodule (and back) is how packages work; real circles are between peers
                cyc = path[path.index(d):] + [d]
                if not all(c == d or c.startswith(d + ".") or d.startswith(c + ".") for c in cyc):
                    raise AssertionError(" -> ".join(cyc))
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2
    for n in edges:
        if n not in state:
            visit(n, [n])
