"""ALBERT-style weight sharing: one layer's weights read at every depth. The written graph stores each shared
weight once (one set of codes and scales), in FP8, INT8 and INT8 + SmoothQuant (one smoothing scale from the
statistics of every use), and stays close to FP32."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import calib, ort
from onnxopt.api import QuantConfig, quantize

D, F, T, DEPTH = 32, 64, 16, 4


def _shared_stack(identity: bool) -> onnx.ModelProto:
    """DEPTH pre-norm blocks x + W2·relu(W1·LN(x) + b1) + b2 sharing W1, W2, b1, b2 and the LN constants
    (as torch exports ALBERT: with `identity`, each later use reads the weight through its own Identity)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)
    w2 = (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)
    gamma = np.ones(D, np.float32)
    gamma[3] = 12.0  # an outlier channel, as trained LayerNorms have: SmoothQuant has something to move
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (gamma, "gamma"),
                                                       (np.zeros(D, np.float32), "beta"),
                                                       (rng.standard_normal(F).astype(np.float32) * 0.1, "b1"),
                                                       (rng.standard_normal(D).astype(np.float32) * 0.1, "b2"))]
    nodes, x = [], "x"
    for i in range(DEPTH):
        w1n, w2n = "W1", "W2"
        if identity and i:
            w1n, w2n = f"W1_use{i}", f"W2_use{i}"
            nodes += [helper.make_node("Identity", ["W1"], [w1n], name=f"id1_{i}"),
                      helper.make_node("Identity", ["W2"], [w2n], name=f"id2_{i}")]
        nodes += [helper.make_node("LayerNormalization", [x, "gamma", "beta"], [f"h{i}"], name=f"ln{i}", axis=-1),
                  helper.make_node("MatMul", [f"h{i}", w1n], [f"u{i}"], name=f"fc1_{i}"),
                  helper.make_node("Add", [f"u{i}", "b1"], [f"ub{i}"], name=f"add1_{i}"),
                  helper.make_node("Relu", [f"ub{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", w2n], [f"v{i}"], name=f"fc2_{i}"),
                  helper.make_node("Add", [f"v{i}", "b2"], [f"vb{i}"], name=f"add2_{i}"),
                  helper.make_node("Add", [x, f"vb{i}"], [f"x{i + 1}"], name=f"res{i}")]
        x = f"x{i + 1}"
    g = helper.make_graph(nodes, "albert_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, T, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, T, D)).astype(np.float32)


def _outputs(model, xs) -> np.ndarray:
    sess = ort.session(model, level="disable")
    return np.stack([sess.run(None, {"x": x})[0] for x in xs]).astype(np.float64)


def _stored_weights(model: onnx.ModelProto) -> dict:
    """{shape: count} of the 2-D initializers read by a DequantizeLinear (the stored weight codes)."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            key = tuple(inits[n.input[0]].dims)
            out[key] = out.get(key, 0) + 1
    return out


@pytest.mark.parametrize("identity", [False, True], ids=["one-initializer", "identity-per-use"])
@pytest.mark.parametrize("mode,smoothquant,bound", [("fp8", None, 0.995), ("int8", None, 0.995), ("int8", "auto", 0.995),
                                                   ("int8", 0.5, 0.995)])
def test_shared_weights_stored_once_and_close_to_fp32(tmp_path, identity, mode, smoothquant, bound):
    src = tmp_path / "m.onnx"
    onnx.save(_shared_stack(identity), src)
    xs = _data(8, 1)
    cfg = QuantConfig(mode=mode, smoothquant=smoothquant, progress=False, high_precision="fp32")
    np.savez(tmp_path / "c.npz", x=_data(16, 0))
    res = quantize(str(src), tmp_path / "q.onnx", config=cfg, data=str(tmp_path / "c.npz"))
    q = onnx.load(res.path)
    # W1 [D, F] and W2 [F, D]: one stored tensor each, read by every depth (before the fix, SmoothQuant wrote a
    # smoothed copy per use: DEPTH of each).
    assert _stored_weights(q) == {(D, F): 1, (F, D): 1}
    assert sum(n.op_type == "MatMul" for n in q.graph.node) == 2 * DEPTH
    ref, out = _outputs(onnx.load(src), xs), _outputs(q, xs)
    cos = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > bound, cos
    if smoothquant is not None:
        sq = res.report["smoothquant"]
        shared = [g for g in sq["groups"] if g.get("shared_weight_activations")]
        assert shared and all(len(g["shared_weight_activations"]) == DEPTH for g in shared)


def test_shared_smoothing_is_exact_in_fp32(tmp_path):
    """SmoothQuant alone (no quantization) on the shared stack: the same function, weights still stored once."""
    from onnxopt import modelfile
    from onnxopt.rewrite import smoothquant
    m = _shared_stack(True)
    graph = modelfile.import_graph(m)
    np.savez(tmp_path / "c.npz", x=_data(8, 0))
    data = calib.CalibData.from_path(tmp_path / "c.npz", calib.input_specs(m))
    rep = smoothquant.smooth(graph, data, alpha=0.5, progress=False)
    out = modelfile.export_graph(graph.cleanup().toposort())
    xs = _data(4, 1)
    ref, got = _outputs(m, xs), _outputs(out, xs)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    shapes = [tuple(i.dims) for i in out.graph.initializer if len(i.dims) == 2]
    assert sorted(shapes) == sorted([(D, F), (F, D)])
    assert any(g.get("shared_weight_activations") for g in rep["groups"])


def _use_inputs(model: onnx.ModelProto, xs) -> dict:
    """{weight: [rows of every use's FP32 input]}: W1 reads LN outputs h_i, W2 the ReLU outputs r_i."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {"W1": [f"h{i}" for i in range(DEPTH)], "W2": [f"r{i}" for i in range(DEPTH)]}
    for ts in names.values():
        m.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ts])
    sess = ort.session(m, level="disable")
    outs = [t for ts in names.values() for t in ts]
    got = [dict(zip(outs, sess.run(outs, {"x": x}))) for x in xs]
    return {w: np.concatenate([g[t].reshape(-1, g[t].shape[-1]) for g in got for t in ts]).astype(np.float64)
            for w, ts in names.items()}


def _codes(model: onnx.ModelProto, shape) -> np.ndarray:
    inits = {i.name: i for i in model.graph.initializer}
    (q,) = [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node if n.op_type == "DequantizeLinear"
            and n.input[0] in inits and tuple(inits[n.input[0]].dims) == shape]
    return np.asarray(q).astype(np.float32)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_shared_weight_rounded_for_all_uses(tmp_path, mode):
    """A weight read at every depth is rounded with error feedback against the Hessian summed over its uses
    (quant.shared_rounding): the written codes are that numpy rounding of the FP32 activations' Σ XᵀX, its
    output error summed over the uses is below round-to-nearest's on held-out data, and it is still stored once."""
    from onnxopt import formats
    from onnxopt.quant import shared_rounding
    src = tmp_path / "m.onnx"
    model = _shared_stack(True)
    onnx.save(model, src)
    cal, held = _data(16, 0), _data(16, 1)
    np.savez(tmp_path / "c.npz", x=cal)
    out = {}
    for on in (True, False):
        cfg = QuantConfig(mode=mode, progress=False, high_precision="fp32", shared_rounding=on,
                          shared_lead_high_precision=False)   # every depth quantized: the Hessian of all uses
        out[on] = onnx.load(quantize(str(src), tmp_path / f"q{on}.onnx", config=cfg, data=str(tmp_path / "c.npz")).path)
        assert _stored_weights(out[on]) == {(D, F): 1, (F, D): 1}
    f = formats.get(mode)
    x_cal, x_held = _use_inputs(model, cal), _use_inputs(model, held)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for wname in ("W1", "W2"):
        w = weights[wname]
        scale = f.scale_of(f.weight_amax(w, 1), "fp32")
        want = shared_rounding.round_with_feedback(f, w, 1, scale, x_cal[wname].T @ x_cal[wname])
        got, rtn = _codes(out[True], w.shape), _codes(out[False], w.shape)
        np.testing.assert_array_equal(rtn, f.to_float(f.cast(w / scale)))
        assert np.mean(got == f.to_float(want)) > 0.99       # summation order may flip a rare tie
        assert np.mean(got != rtn) > 0.05                     # error feedback moved codes
        h = x_held[wname].T @ x_held[wname]
        err = {k: shared_rounding.output_error(w, c * scale, 1, h) for k, c in (("feedback", got), ("nearest", rtn))}
        assert err["feedback"] < 0.9 * err["nearest"], err
    xs = _data(8, 2)
    ref = _outputs(model, xs)
    cos = {on: float((ref * (o := _outputs(out[on], xs))).sum() / np.linalg.norm(ref) / np.linalg.norm(o)) for on in out}
    assert cos[True] >= cos[False] - 1e-4, cos



def _producer_ops(model: onnx.ModelProto, node_name: str) -> tuple:
    """(op writing input 0, op writing input 1) of a node ("" for a graph input or initializer)."""
    made = {o: n.op_type for n in model.graph.node for o in n.output}
    (node,) = [n for n in model.graph.node if n.name == node_name]
    return made.get(node.input[0], ""), made.get(node.input[1], "")


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("identity", [False, True], ids=["one-initializer", "identity-per-use"])
def test_first_use_of_shared_weights_kept_high_precision(tmp_path, mode, identity):
    """The layers up to the first use of a weight that later depths share stay high precision (their error would
    pass through every later use): depth 0's GEMMs read the FP32 weight and unquantized inputs, deeper ones the
    one stored codes through Q/DQ; the report says why; without the option every depth is quantized."""
    src = tmp_path / "m.onnx"
    onnx.save(_shared_stack(identity), src)
    np.savez(tmp_path / "c.npz", x=_data(16, 0))
    out = {}
    for on in (True, False):
        cfg = QuantConfig(mode=mode, progress=False, high_precision="fp32", shared_lead_high_precision=on)
        res = quantize(str(src), tmp_path / f"q{on}.onnx", config=cfg, data=str(tmp_path / "c.npz"))
        out[on] = (onnx.load(res.path), res.report)
    q, rep = out[True]
    assert _stored_weights(q) == {(D, F): 1, (F, D): 1}
    for i in range(DEPTH):
        for fc in (f"fc1_{i}", f"fc2_{i}"):
            act, wt = _producer_ops(q, fc)
            if i == 0:
                assert act != "DequantizeLinear" and wt != "DequantizeLinear", (fc, act, wt)
            else:
                assert act == wt == "DequantizeLinear", (fc, act, wt)
            assert _producer_ops(out[False][0], fc) == ("DequantizeLinear",) * 2
    skipped = rep["qdq"]["skipped"]
    assert {n for n, r in skipped.items() if "first use" in r} == {"fc1_0", "fc2_0"}
    # depth 0 is the FP32 model's: its output (the residual sum x1) equal to the reference's
    xs = _data(4, 1)

    def x1(model):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.output.extend([helper.make_tensor_value_info("x1", TensorProto.FLOAT, None)])
        sess = ort.session(m, level="disable")
        return np.stack([sess.run(["x1"], {"x": x})[0] for x in xs])
    np.testing.assert_allclose(x1(q), x1(_shared_stack(identity)), rtol=1e-5, atol=1e-5)


def test_leading_layers_only_where_a_weight_is_shared_along_a_path():
    """Parallel branches reading one weight (not one after the other) and unshared weights keep every layer
    quantized; a chain of uses names the layers up to the last first use."""
    from types import SimpleNamespace

    import onnx_graphsurgeon as gs

    from onnxopt.quant import shared_rounding

    def mm(name, x, w):
        y = gs.Variable(f"y_{name}", np.float32, (1, T, D))
        return gs.Node("MatMul", name, inputs=[x, w], outputs=[y])

    def place_of(nodes):
        g = gs.Graph(nodes=nodes)
        return g, SimpleNamespace(nodes=nodes, weights=[(n, 1, n.inputs[1], 1) for n in nodes])

    w, v = gs.Constant("W", np.zeros((D, D), np.float32)), gs.Constant("V", np.zeros((D, D), np.float32))
    x = gs.Variable("x", np.float32, (1, T, D))
    a, b = mm("a", x, w), mm("b", x, w)                       # two branches, one weight
    assert shared_rounding.leading_layers(*place_of([a, b])) == []
    p = mm("p", x, v)
    c0 = mm("c0", p.outputs[0], w)
    c1 = mm("c1", c0.outputs[0], w)                            # a chain: c0 then c1 read W
    others, last = [], c1.outputs[0]
    for i in range(6):                                         # six unshared layers after the chain
        others.append(mm(f"o{i}", last, gs.Constant(f"U{i}", np.zeros((D, D), np.float32))))
        last = others[-1].outputs[0]
    assert shared_rounding.leading_layers(*place_of([p, c0, c1] + others)) == ["p", "c0"]
    assert shared_rounding.leading_layers(*place_of([p, c0, c1])) == []   # 2 of 3 layers: more than LEAD_MAX


def test_shared_hessians_one_per_input_set_within_the_budget():
    """Weights read by the same inputs share one summed Hessian, fed by every use; past the byte budget none is
    collected (those weights keep nearest rounding)."""
    from types import SimpleNamespace

    import onnx_graphsurgeon as gs

    from onnxopt.quant import shared_rounding
    xs = [gs.Variable(f"x{i}", np.float32, (1, T, D)) for i in range(3)]
    wq, wk = (gs.Constant(n, np.zeros((D, D), np.float32)) for n in ("Wq", "Wk"))
    nodes = [gs.Node("MatMul", f"{w.name}_{i}", inputs=[x, w], outputs=[gs.Variable(f"y{w.name}{i}", np.float32, (1, T, D))])
             for i, x in enumerate(xs) for w in (wq, wk)]
    place = SimpleNamespace(weights=[(n, 1, n.inputs[1], 1) for n in nodes])
    feeds, hs = shared_rounding.hessian_reducers(place)
    assert set(hs) == {"Wq", "Wk"} and hs["Wq"] is hs["Wk"]            # one XᵀX for Q and K
    assert {k: len(v) for k, v in feeds.items()} == {"x0": 1, "x1": 1, "x2": 1}
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, T, D)).astype(np.float32) for _ in xs]
    for x, r in zip(xs, rows):
        feeds[x.name][0].update(r)
    want = sum(r.reshape(-1, D).astype(np.float64).T @ r.reshape(-1, D) for r in rows) / (3 * T)
    np.testing.assert_allclose(shared_rounding.hessian_values(hs)["Wq"], want, rtol=1e-5)
    assert shared_rounding.hessian_reducers(place, max_bytes=8 * D * D - 1) == ({}, {})


def _int4_written(tmp_path, identity: bool):
    src = tmp_path / "m.onnx"
    onnx.save(_shared_stack(identity), src)
    np.savez(tmp_path / "c.npz", x=_data(16, 0))
    cfg = QuantConfig(mode="int4", awq="none", progress=False, high_precision="fp32")
    return src, quantize(str(src), tmp_path / "q.onnx", config=cfg, data=str(tmp_path / "c.npz"))


@pytest.mark.parametrize("identity", [False, True], ids=["one-initializer", "identity-per-use"])
def test_int4_shared_weight_codes_once_dequantized_per_use(tmp_path, identity):
    """INT4 of a weight read by several GEMMs: the codes stored once, one DequantizeLinear per use with its own copy
    of the scales (TensorRT-RTX 1.7.1 cannot build one DQ, or one scale tensor, feeding several GEMMs; before, the
    Identity export stored DEPTH copies of the codes and the plain export one shared DQ). The numbers are the
    FP32 graph's with each weight replaced by its INT4 round trip (numpy)."""
    from onnxopt import formats
    src, res = _int4_written(tmp_path, identity)
    q = onnx.load(res.path)
    inits = {i.name: i for i in q.graph.initializer}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
           and inits[n.input[0]].data_type == TensorProto.INT4]
    codes = {n.input[0] for n in dqs}
    assert len(codes) == 2 and len(dqs) == 2 * DEPTH  # W1, W2 once; a DQ per MatMul
    assert len({n.input[1] for n in dqs}) == 2 * DEPTH and len({n.output[0] for n in dqs}) == 2 * DEPTH
    readers = {}
    for n in q.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    assert all(len(readers[n.output[0]]) == 1 and readers[n.output[0]][0].op_type == "MatMul" for n in dqs)
    ref = onnx.load(src)
    int4 = formats.get("int4")
    for t in ref.graph.initializer:
        if t.name in ("W1", "W2"):
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(int4.fake_quant(w, 1, "fp32", block_size=128).astype(np.float32), t.name))
    xs = _data(4, 1)
    np.testing.assert_allclose(_outputs(q, xs), _outputs(ref, xs), rtol=1e-5, atol=1e-5)


@pytest.mark.rtx
def test_int4_shared_weight_builds_with_tensorrt_rtx(tmp_path):
    """The one-initializer export (no Identity per use) crashed TensorRT-RTX 1.7.1's Myelin with one shared INT4
    DequantizeLinear (vector::_M_range_check); with a DQ per use it builds, every INT4 layer in an INT4 kernel."""
    from onnxopt import trt
    if not trt.rtx_available():
        pytest.skip("TensorRT-RTX not installed")
    from onnxopt.trt import report
    _, res = _int4_written(tmp_path, False)
    rep = report.engine_report_of(res.path)  # before: the build failed (Myelin), no layer in a kernel
    fused = {r["name"] for r in rep["layers"] if r["quantized_kernel"]}
    # fc1 (K=32, N=64) in the fused INT4 GEMM at every depth; fc2 (N=32) gets a dequantizing kernel + FP16 GEMM,
    # exactly as with one stored copy per use (measured with the old writer on the Identity export)
    assert rep["quantized_layers"] == 2 * DEPTH and fused == {f"fc1_{i}" for i in range(DEPTH)}
