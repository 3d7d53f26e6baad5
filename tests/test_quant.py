import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tiny
import onnxopt
from onnxopt import QuantConfig, modelfile, opset_upgrade, ort
from onnxopt.errors import OnnxoptError
from onnxopt.quant import rules

SHAPES = {"cnn": {"x": (2, 3, 16, 16)}, "tr": {"ids": (2, 16)}}


def _graph(model):
    return modelfile.import_graph(opset_upgrade.infer_shapes(model))


def _q(tmp_path, model, mode, **kw):
    src = tiny.save(model, tmp_path / "m.onnx")
    shapes = SHAPES["cnn" if model.graph.name == "cnn" else "tr"]
    res = onnxopt.quantize(src, tmp_path / f"m.{mode}.onnx", config=QuantConfig(mode=mode, progress=False, **kw),
                           calib_random=8, shapes=shapes)
    return src, res, shapes


def _consumers(model, name):
    return [n for n in model.graph.node if name in n.input]


# ---------------------------------------------------------------- rules, one test each
def _plan(model, **kw):
    return rules.plan(_graph(model), QuantConfig(**kw))


def test_rule_op_types_and_norms_stay_high_precision():
    p = _plan(tiny.transformer())
    names = {n.name for n in p.nodes}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_up", "mlp_down", "attn_qk", "attn_pv"} == names
    assert all(n.op != "LayerNormalization" and n.op != "Softmax" for n in p.nodes)
    p = _plan(tiny.transformer(), op_types=("Conv",))
    assert not p.nodes and "op MatMul is not quantized" in p.skipped.values()


def test_rule_user_exclude_by_regex():
    p = _plan(tiny.transformer(), exclude=("mlp_.*",))
    assert p.skipped["mlp_up"].startswith("excluded") and p.skipped["mlp_down"].startswith("excluded")


def test_rule_conv_kernels_follow_tensorrt():
    # conv1: 3 -> 16 channels at the network input; conv2: 16 -> 16.
    p = _plan(tiny.cnn(), mode="int8")
    assert {"conv1", "conv2", "conv3", "deconv"} <= {n.name for n in p.nodes}
    p = _plan(tiny.cnn(), mode="fp8")
    assert "no TensorRT fp8 kernel" in p.skipped["conv1"]
    assert p.skipped["conv2"] == "16 channels or fewer: FP16 is faster than FP8"
    assert "conv3" in {n.name for n in p.nodes}
    # Depthwise: INT8 stays FP16 (TensorRT pads it to 4 channels per group: a larger engine); FP8 has no kernel.
    w = nh.from_array(np.random.default_rng(0).standard_normal((32, 1, 3, 3)).astype(np.float32), "w")
    g = h.make_graph([h.make_node("Conv", ["x", "w"], ["y"], name="dw", group=32, pads=[1, 1, 1, 1])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 32, 8, 8])], [h.make_tensor_value_info("y", T.FLOAT, None)], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    assert _plan(m, mode="int8").skipped["dw"].startswith("INT8 depthwise conv: TensorRT pads it")
    assert "dw" in _plan(m, mode="fp8").skipped


def test_bias_correction_removes_the_mean_shift_of_weight_quantization(tmp_path):
    # A grouped conv (2 channels per group; INT8 depthwise stays FP16) on inputs with a large mean: weight
    # rounding shifts every output by ΔW·E[x].
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((32, 2, 3, 3)).astype(np.float32), "w")
    b = nh.from_array(np.zeros(32, np.float32), "b")
    g = h.make_graph([h.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=16, pads=[1, 1, 1, 1])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 32, 8, 8])], [h.make_tensor_value_info("y", T.FLOAT, None)], [w, b])
    src = tiny.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "m.onnx")
    x = (5.0 + rng.standard_normal((8, 1, 32, 8, 8))).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    errs = {}
    for bc in (False, True):
        res = onnxopt.quantize(src, tmp_path / f"q{bc}.onnx", config=QuantConfig(mode="int8", bias_correction=bc, high_precision="fp32",
                                                                                    progress=False), data=tmp_path / "c.npz")
        ref = ort.session(modelfile.load(src)).run(None, {"x": x[0]})[0]
        got = ort.session(modelfile.load(res.path)).run(None, {"x": x[0]})[0]
        errs[bc] = np.abs((got - ref)[..., 1:-1, 1:-1].mean(axis=(0, 2, 3))).mean()  # per-channel mean error, inside the padding
    assert errs[True] < 0.5 * errs[False]


def test_rule_small_gemm_and_gemv():
    p = _plan(tiny.cnn())
    assert p.skipped["fc"] == "N=10 < 16"
    p = _plan(tiny.transformer(seq=1))  # M = batch * 1 with a dynamic batch: not provably GEMV
    assert "q_proj" in {n.name for n in p.nodes}
    m = tiny.transformer(seq=1)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    p = _plan(m)
    assert p.skipped["q_proj"] == "GEMV (M=1)"


def test_rule_integer_and_shape_subgraph_untouched():
    # A float MatMul inside a shape computation: Shape -> Cast(float) -> MatMul(const) -> Cast(int64) -> Reshape.
    w = nh.from_array(np.eye(2, dtype=np.float32) * 1.0, "w")
    big = nh.from_array(np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32), "big")
    nodes = [h.make_node("Shape", ["x"], ["s"], name="shape"),
             h.make_node("Cast", ["s"], ["sf"], name="tofloat", to=T.FLOAT),
             h.make_node("Unsqueeze", ["sf", "ax"], ["sf2"], name="unsq"),
             h.make_node("MatMul", ["sf2", "w"], ["sm"], name="shape_matmul"),
             h.make_node("Squeeze", ["sm", "ax"], ["sm2"], name="sq"),
             h.make_node("Cast", ["sm2"], ["si"], name="toint", to=T.INT64),
             h.make_node("Reshape", ["x", "si"], ["xr"], name="reshape"),
             h.make_node("MatMul", ["xr", "big"], ["y"], name="data_matmul")]
    ax = nh.from_array(np.array([0], np.int64), "ax")
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [w, big, ax])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    p = _plan(m)
    assert {n.name for n in p.nodes} == {"data_matmul"}
    assert p.skipped["shape_matmul"] in ("part of a shape subgraph",) or p.skipped["shape_matmul"].startswith("K=")


def test_rule_conditioning_gemv_stays_high_precision():
    """A time-embedding MLP whose projection is broadcast over a feature map ([B, 32] -> [B, 32, 1, 1] + map) is
    per-sample conditioning: both its GEMMs stay high precision; a 2-D MLP that is the data path is quantized."""
    rng = np.random.default_rng(0)
    init = [nh.from_array(rng.standard_normal(s).astype(np.float32), n)
            for n, s in (("w1", (32, 32)), ("w2", (32, 32)), ("wc", (32, 32, 3, 3)), ("wm", (32, 32)))]
    init.append(nh.from_array(np.array([2, 3], np.int64), "axes"))
    nodes = [h.make_node("MatMul", ["emb", "w1"], ["e1"], name="time_linear_1"),
             h.make_node("Relu", ["e1"], ["e1r"], name="act"),
             h.make_node("MatMul", ["e1r", "w2"], ["e2"], name="time_proj"),
             h.make_node("Unsqueeze", ["e2", "axes"], ["e4"], name="unsq"),
             h.make_node("Add", ["x", "e4"], ["xe"], name="add_cond"),
             h.make_node("Conv", ["xe", "wc"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("MatMul", ["v", "wm"], ["z"], name="data_mlp")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 32, 8, 8]),
                                  h.make_tensor_value_info("emb", T.FLOAT, ["B", 32]),
                                  h.make_tensor_value_info("v", T.FLOAT, ["N", 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, None), h.make_tensor_value_info("z", T.FLOAT, None)], init)
    p = _plan(onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)])))
    assert {n.name for n in p.nodes} == {"conv", "data_mlp"}
    for name in ("time_linear_1", "time_proj"):
        assert p.skipped[name].startswith("per-sample conditioning GEMM"), p.skipped[name]


def test_rule_mha_head_size_and_switch():
    p = _plan(tiny.transformer(d=64, heads=2))  # head size 32: supported
    assert {"attn_qk", "attn_pv"} <= {n.name for n in p.nodes}
    p = _plan(tiny.transformer(d=72, heads=2))  # head size 36: not a fused-MHA size
    assert "head size 36" in p.skipped["attn_qk"]
    p = _plan(tiny.transformer(), quantize_mha=False)
    assert p.skipped["attn_pv"] == "MHA quantization is off"


def test_int8_attention_only_before_an_int8_output_projection():
    """INT8 attention BMMs follow their output projection (TensorRT fuses INT8 MHA only into an INT8 reader):
    with o_proj quantized both BMMs are; with o_proj excluded both stay FP16 with the reason."""
    p = _plan(tiny.transformer(d=64, heads=2), mode="int8")
    assert {"attn_qk", "attn_pv", "o_proj"} <= {n.name for n in p.nodes}
    p = _plan(tiny.transformer(d=64, heads=2), mode="int8", exclude=["^o_proj$"])
    names = {n.name for n in p.nodes}
    assert not {"attn_qk", "attn_pv", "o_proj"} & names and {"q_proj", "k_proj", "v_proj"} <= names
    for bmm in ("attn_qk", "attn_pv"):
        assert p.skipped[bmm].startswith("INT8 attention fuses only into an INT8 output projection (o_proj"), p.skipped[bmm]
        assert not any(n.name == bmm for n, _ in sum(p.activations.values(), []))
    p = _plan(tiny.transformer(d=64, heads=2), mode="fp8")
    assert {"attn_qk", "attn_pv", "o_proj"} <= {n.name for n in p.nodes}


def test_fp8_attention_only_before_an_fp8_output_projection():
    """The same rule for FP8 (the terrain UNet's FP8 attention before an FP16 proj_out did not fuse in
    TensorRT-RTX): with o_proj excluded the BMMs stay FP16 and their inputs get no Q/DQ."""
    p = _plan(tiny.transformer(d=64, heads=2), mode="fp8", exclude=["^o_proj$"])
    names = {n.name for n in p.nodes}
    assert not {"attn_qk", "attn_pv", "o_proj"} & names and {"q_proj", "k_proj", "v_proj"} <= names
    for bmm in ("attn_qk", "attn_pv"):
        assert p.skipped[bmm].startswith("FP8 attention fuses only into an FP8 output projection (o_proj"), p.skipped[bmm]
        assert not any(n.name == bmm for n, _ in sum(p.activations.values(), []))
    assert not p.fixed_amax   # no softmax output quantized


def test_rule_residual_add_gets_skip_input_quantized_and_concat_shares_scale():
    p = _plan(tiny.cnn(), mode="int8")
    assert [(n.name, i) for n, i in p.residuals] == [("residual", 0)]
    assert any({"r1", "cat"} <= set(g) for g in p.shared_scales)


@pytest.mark.parametrize("op, shape, attrs, axis", [
    ("Conv", (8, 4, 3, 3), {}, 0),
    ("ConvTranspose", (4, 8, 3, 3), {}, 1),
    ("MatMul", (4, 32), {}, 1),
    ("Gemm", (32, 4), {"transB": 1}, 0),
    ("Gemm", (4, 32), {"transB": 0}, 1),
])
def test_weight_axis_is_output_channel(tmp_path, op, shape, attrs, axis):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w *= (np.arange(shape[axis]) + 1).reshape([-1 if i == axis else 1 for i in range(len(shape))])  # distinct channel ranges
    conv = op in ("Conv", "ConvTranspose")
    xshape = [2, 4, 8, 8] if conv else ["N", 4]
    node = h.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, xshape)], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    rules.MIN_GEMM_DIM, old = 4, rules.MIN_GEMM_DIM
    try:
        src = tiny.save(m, tmp_path / "m.onnx")
        res = onnxopt.quantize(src, tmp_path / "q.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=2,
                               shapes={"x": (2, 4, 8, 8) if conv else (2, 4)})
    finally:
        rules.MIN_GEMM_DIM = old
    q = onnx.load(str(res.path))
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w"))
    assert h.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == axis
    inits = {t.name: nh.to_array(t) for t in q.graph.initializer}
    qw = inits[dq.input[0]]
    assert qw.dtype == np.int8 and qw.shape == shape and np.abs(qw).max() == 127
    scale = inits[dq.input[1]].astype(np.float32)
    assert scale.shape == (shape[axis],) and inits[dq.input[1]].dtype == np.float16
    deq = qw.astype(np.float32) * scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    np.testing.assert_allclose(deq, w, atol=float(scale.max()) / 2 + 1e-6)


# ---------------------------------------------------------------- numerics and graph structure
@pytest.mark.parametrize("which", ["cnn", "tr"])
@pytest.mark.parametrize("mode, floor", [("int8", 0.999), ("fp8", 0.995)])
def test_quantized_graph_is_close_to_fp32(tmp_path, which, mode, floor):
    model = tiny.cnn() if which == "cnn" else tiny.transformer()
    src, res, shapes = _q(tmp_path, model, mode)
    m = onnxopt.compare(src, res.path, shapes=shapes, n_random=4)
    (metrics,) = m.values()
    assert metrics["cosine"] >= floor
    q = onnx.load(str(res.path))
    assert q.ir_version <= modelfile.MAX_IR_VERSION
    assert all(o.version >= (19 if mode == "fp8" else 13) for o in q.opset_import if o.domain == "")
    qtype = T.FLOAT8E4M3FN if mode == "fp8" else T.INT8
    inits = {t.name: t for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[n.input[2]].data_type == qtype and not nh.to_array(inits[n.input[2]]).astype(np.float32).any()
            assert inits[n.input[1]].data_type == T.FLOAT16  # scales follow the FP16 graph
    # Weights are stored pre-quantized: no float initializer feeds a quantized layer's weight input.
    for n in q.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose") and n.input[1] in inits:
            assert n.name in res.report["qdq"]["skipped"]
    # Graph I/O keeps its dtype; the rest is FP16.
    assert q.graph.output[0].type.tensor_type.elem_type == T.FLOAT
    assert {t.data_type for t in q.graph.initializer} <= {T.FLOAT16, T.INT8, T.FLOAT8E4M3FN, T.INT64}


def test_lint_clean_and_coverage_full_on_outputs(tmp_path):
    from onnxopt.inspection import inspect_path
    for model in (tiny.cnn(), tiny.transformer()):
        _, res, _ = _q(tmp_path, model, "fp8")
        ins = inspect_path(res.path)
        s = ins.summary()
        assert ins.lint == []
        assert s["quantized_layers"] == s["layers"] - len(res.report["qdq"]["skipped"])


def test_lint_flags_partial_and_asymmetric_placements():
    from onnxopt.inspection import lint
    # Q/DQ on the activation only (a quantized weight alone would be weight-only W8A16, which is fine)
    w = nh.from_array(np.ones((16, 16), np.float32), "w")
    s = nh.from_array(np.array(0.1, np.float32), "s")
    zp = nh.from_array(np.array(3, np.int8), "zp")
    nodes = [h.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="xq"),
             h.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="xdq"),
             h.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
             h.make_node("QuantizeLinear", ["y", "s", "zp"], ["yq"], name="q"),
             h.make_node("DequantizeLinear", ["yq", "s", "zp"], ["yd"], name="dq"),
             h.make_node("Softmax", ["yd"], ["z"], name="sm")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 16])], [h.make_tensor_value_info("z", T.FLOAT, None)], [w, s, zp])
    issues = lint(modelfile.import_graph(h.make_model(g, opset_imports=[h.make_opsetid("", 19)])))
    text = "\n".join(issues)
    assert "mm (MatMul): only some data inputs" in text
    assert "non-zero zero point" in text
    assert "feeds Softmax" in text


def test_fp8_softmax_output_amax_is_one(tmp_path):
    _, res, _ = _q(tmp_path, tiny.transformer(), "fp8")
    assert res.report["qdq"]["activations"]["p"] == 1.0


def test_fp16_input_model_works_like_fp32(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    fp16 = onnxopt.convert(src, tmp_path / "m16.onnx")
    res = onnxopt.quantize(fp16, tmp_path / "q.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=4,
                           shapes=SHAPES["cnn"])
    (m,) = onnxopt.compare(src, res.path, shapes=SHAPES["cnn"]).values()
    assert m["cosine"] > 0.999


def test_opset_is_raised_for_fp8(tmp_path):
    _, res, _ = _q(tmp_path, tiny.cnn(opset=13), "fp8")
    assert [o.version for o in onnx.load(str(res.path)).opset_import if o.domain == ""] == [19]


def test_unsupported_opset_and_nothing_to_quantize(tmp_path):
    with pytest.raises(OnnxoptError, match="opset 30 is not supported"):
        _q(tmp_path, tiny.cnn(opset=30), "int8")  # opset 5 is upgraded now: tests/test_bad_input_corpus.py
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    src = tiny.save(m, tmp_path / "relu.onnx")
    with pytest.raises(OnnxoptError, match="nothing to quantize"):
        onnxopt.quantize(src, tmp_path / "out.onnx", calib_random=1)
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(OnnxoptError, match="percentile 150 is out of range"):
        QuantConfig(mode="int8", calib_method="percentile", percentile=150)


def test_shared_weight_quantized_once(tmp_path):
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"], name="m1"), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("MatMul", ["b", "w"], ["y"], name="m2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 32])], [h.make_tensor_value_info("y", T.FLOAT, None)], [w])
    src = tiny.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "m.onnx")
    res = onnxopt.quantize(src, tmp_path / "q.onnx", config=QuantConfig(mode="fp8", progress=False), calib_random=2, shapes={"x": (4, 32)})
    q = onnx.load(str(res.path))
    fp8 = [t for t in q.graph.initializer if t.data_type == T.FLOAT8E4M3FN and len(t.dims) == 2]
    assert len(fp8) == 1
    assert nh.to_array(fp8[0]).dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("cfg", [QuantConfig(mode="int8", smoothquant=0.8, sparsity="2:4", progress=False),
                                 QuantConfig(mode="fp8", progress=False)], ids=["int8-sq-2:4", "fp8"])
def test_rewritten_weights_spill_to_disk_and_give_the_same_model(tmp_path, monkeypatch, cfg):
    """SmoothQuant, 2:4, weight quantization and FP16 conversion make new weights; inside `quantize` they
    go to a file in the work directory (modelfile.spilling) instead of memory. The output must not change."""
    src = tiny.save(tiny.transformer(), tmp_path / "t.onnx")
    kept = onnxopt.quantize(src, tmp_path / "mem.onnx", config=cfg, calib_random=4, shapes={"ids": (2, 16)})
    spilled_to = []
    real_set = modelfile.set_values

    def spy(const, values):
        real_set(const, values)
        spilled_to.append(type(const._values).__name__)
    monkeypatch.setattr(modelfile, "SPILL_BYTES", 0)
    monkeypatch.setattr(modelfile, "set_values", spy)
    spilled = onnxopt.quantize(src, tmp_path / "disk.onnx", config=cfg, calib_random=4, shapes={"ids": (2, 16)})
    assert spilled_to and set(spilled_to) == {"_LazyExternal"}
    a, b = modelfile.load(kept.path), modelfile.load(spilled.path)
    assert len(a.graph.initializer) == len(b.graph.initializer)
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert (ta.name, ta.data_type) == (tb.name, tb.data_type)
        np.testing.assert_array_equal(modelfile.to_array(ta), modelfile.to_array(tb))


def test_fp8_cast_in_threaded_chunks_equals_one_cast(monkeypatch):
    """Big weights are cast on several threads; the bytes must equal one ml_dtypes cast (saturating,
    NaN kept, any layout)."""
    import ml_dtypes

    from onnxopt.formats import FP8, fp8
    monkeypatch.setattr(fp8, "CHUNK", 1000)
    x = (np.random.default_rng(3).standard_normal((37, 211)).astype(np.float32) * 300).T  # not contiguous
    x[0, :3] = [np.nan, 1e9, -1e9]
    want = np.clip(x, -FP8.qmax, FP8.qmax).astype(ml_dtypes.float8_e4m3fn)
    got = FP8.cast(x)
    assert got.shape == x.shape and np.array_equal(got.view(np.uint8), want.view(np.uint8))
