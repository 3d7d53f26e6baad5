"""NVFP4 / MXFP8 (onnxopt.formats.nvfp4, .mxfp8): numerics against ml_dtypes, the standard-ONNX emulation
against the numpy reference bit for bit in ORT, the written real form, the CLI, and TensorRT-RTX FP4 kernels."""
import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import onnxopt
import tiny
from onnxopt import formats
from onnxopt import ort as ortx
from onnxopt.cli import main
from onnxopt.emulate import emulated_view
from onnxopt.formats import emulation, mxfp8, nvfp4
from onnxopt.inspection import inspect_path

F32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------- element numerics
@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=F32))
def test_e2m1_rounding_is_ml_dtypes_float4(y):
    ref = y.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = nvfp4.round_e2m1(y)
    assert np.array_equal(np.abs(got), np.abs(ref))  # ±0 aside
    assert np.array_equal(nvfp4.NVFP4_FORMAT.cast(y).astype(np.float32), ref)


def test_e2m1_ties_round_to_even():
    y = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, -0.25], np.float32)
    assert nvfp4.round_e2m1(y).tolist() == [0, 1, 1, 2, 2, 4, 4, 6, -4, 0]


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(2.0 ** -100, 2.0 ** 100, width=32)))
def test_e8m0_scale_is_the_smallest_power_of_two_and_ml_dtypes_encodes_it(amax):
    codes = mxfp8.e8m0_codes(amax)
    scale = mxfp8.scale_of_codes(codes)
    r = amax.astype(np.float64) / 448.0
    assert np.all(scale >= r) and np.all(scale / 2 < r)
    assert np.array_equal(scale.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8), codes)


def test_weight_scales_follow_the_recipe():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    plain = nvfp4.NVFP4_FORMAT.quantize_parts(w, clip=np.ones((4, 32), np.float32))
    assert plain.scale == np.float32(np.float32(np.abs(w).max()) / np.float32(6) / np.float32(448))
    amax = np.abs(w).reshape(4, 16, 32).max(1)
    assert np.array_equal(plain.block_scales, (amax / 6 / plain.scale).astype(ml_dtypes.float8_e4m3fn))
    assert plain.block_scales.astype(np.float32).max() <= 448
    assert np.abs(plain.dequantize() - w).max() <= np.abs(w).max() / 6 * 1.05  # half the widest E2M1 step
    searched = nvfp4.NVFP4_FORMAT.quantize_parts(w)  # per-block clip search: never a larger block error
    err = lambda p: np.square(p.dequantize() - w).reshape(4, 16, 32).sum(1)  # noqa: E731
    assert np.all(err(searched) <= err(plain) + 1e-12) and err(searched).sum() < err(plain).sum()


# ---------------------------------------------------------------- emulation subgraphs (ORT) == numpy reference
def _emulate(fmt, x, amax=None, opset=19):
    xv = gs.Variable("x", dtype=x.dtype, shape=list(x.shape))
    out = gs.Variable("y", dtype=np.float32, shape=list(x.shape))
    g = gs.Graph(inputs=[xv], outputs=[out], opset=opset)
    if fmt == "nvfp4":
        nvfp4.emulate_dynamic(g, xv, nvfp4.activation_scale(amax), out, "e")
    else:
        mxfp8.emulate_dynamic(g, xv, out, "e")
    m = gs.export_onnx(g)
    m.ir_version = 10
    return ortx.session(m, level="disable").run(None, {"x": x})[0]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([np.float16, np.float32]), st.floats(1e-3, 1e4))
def test_nvfp4_emulation_is_bit_exact(seed, dtype, amax):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 4, 32)) * np.exp2(rng.integers(-14, 6, (3, 4, 32)))).astype(dtype)
    x[0, 0, :16] = 0  # an all-zero block: scale 0, output 0
    got = _emulate("nvfp4", x, amax)
    assert np.array_equal(_bits(got), _bits(nvfp4.fake_quant_activation(x.astype(np.float32), amax)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([np.float16, np.float32]))
def test_mxfp8_emulation_is_bit_exact(seed, dtype):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, 64)) * np.exp2(rng.integers(-20, 14, (2, 64)))).astype(dtype)
    x[1, :32] = 0
    got = _emulate("mxfp8", x, opset=23)
    assert np.array_equal(_bits(got), _bits(mxfp8.fake_quant_activation(x.astype(np.float32))))


# ---------------------------------------------------------------- the written graph
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("nvfp4")
    src = tiny.save(tiny.transformer(d=64, seq=16), d / "t.onnx")
    out = {}
    for mode, wo in (("nvfp4", False), ("nvfp4", True), ("mxfp8", False), ("fp8", False)):
        cfg = onnxopt.QuantConfig(mode=mode, weight_only=wo, progress=False)
        res = onnxopt.quantize(src, d / f"t.{mode}{'w' if wo else ''}.onnx", config=cfg, calib_random=4, shapes={"ids": (2, 16)})
        out[mode + ("w" if wo else "")] = res
    out["src"] = src
    return out


def test_real_form_is_what_tensorrt_reads(written):
    m = onnx.load(written["nvfp4"].path)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 23
    ops = [n for n in m.graph.node if n.op_type == nvfp4.DYNAMIC_OP]
    assert ops and all(n.domain == "trt" for n in ops)
    attrs = {a.name: a.i for a in ops[0].attribute}
    assert attrs == {"axis": -1, "block_size": 16, "scale_type": onnx.TensorProto.FLOAT8E4M3FN}
    fp4 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == 6  # q/k/v/o and the MLP
    assert all(len(t.raw_data) == (np.prod(t.dims) + 1) // 2 for t in fp4)  # two codes a byte
    scales = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:  # every FP4 tensor scale stays FP32 (amax / 2688 underflows FP16)
        if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in fp4}:
            block_dq = next(p for p in m.graph.node if n.input[1] in p.output)
            assert scales[block_dq.input[1]].data_type == onnx.TensorProto.FLOAT


def test_report_gives_reasons_for_fp8_layers(written):
    r = written["nvfp4"].report["blockfp"]
    assert r["coverage"]["nvfp4"] == 6 and r["coverage"]["fp8"] == 2
    assert r["fp8_reasons"]["attn_qk"].startswith("attention BMM") and r["fp8_reasons"]["attn_pv"].startswith("attention BMM")


@pytest.mark.parametrize("k,n,why", [(64, 64, None), (40, 64, "not a multiple"), (16, 64, "tiny GEMM"), (64, 16, "tiny GEMM")])
def test_block_rules(k, n, why):
    from onnxopt.quant import rules
    x = gs.Variable("x", dtype=np.float32, shape=[8, k])
    node = gs.Node("MatMul", inputs=[x, gs.Constant("w", np.zeros((k, n), np.float32))], outputs=[gs.Variable("y", dtype=np.float32)])
    reason = rules.block_format_reason(node, 16)
    assert (reason is None) if why is None else (why in reason)
    conv = gs.Node("Conv", inputs=[gs.Variable("a", dtype=np.float32), gs.Constant("c", np.zeros((32, 32, 3, 3), np.float32))])
    assert "no NVFP4 convolution" in rules.block_format_reason(conv, 16)


def test_emulation_lowering_removes_every_block_op_and_runs(written):
    for key in ("nvfp4", "nvfp4w", "mxfp8"):
        m = onnx.load(written[key].path)
        low = emulation.lower_for_ort(m)
        assert not emulation.has_block_formats(low)
        sess = ortx.session(emulated_view(m), level="disable")
        ids = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int64)
        y = sess.run(None, {"ids": ids})[0]
        assert np.isfinite(y).all()


def test_weight_lowering_equals_the_dequantized_weight(written):
    m = onnx.load(written["nvfp4"].path)
    g = onnxopt.modelfile.import_graph(m)
    dq = next(n for n in g.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)
              and n.inputs[0].dtype == nvfp4.NVFP4_FORMAT.np_dtype)
    sdq = dq.inputs[1].inputs[0]
    p = nvfp4.Fp4Weight(np.asarray(dq.inputs[0].values), np.asarray(sdq.inputs[0].values), np.float32(sdq.inputs[1].values))
    consumer = dq.outputs[0].outputs[0]
    emulation.lower_graph(g)
    assert np.array_equal(_bits(consumer.inputs[0].values), _bits(p.dequantize()))


def test_compare_runs_the_emulation(written):
    res = {k: onnxopt.compare(written["src"], written[k].path, n_random=2, shapes={"ids": (2, 16)}) for k in ("fp8", "nvfp4", "mxfp8")}
    cos = {k: min(o["cosine"] for o in v.values()) for k, v in res.items()}
    assert all(0.95 < c <= 1.0 for c in cos.values()), cos
    assert abs(cos["mxfp8"] - cos["fp8"]) < 0.002, cos


def test_inspect_names_format_and_block(written):
    fmt = {l.name: l.format for l in inspect_path(written["nvfp4"].path).layers}
    assert fmt["q_proj"] == "nvfp4/16" and fmt["attn_qk"] == "fp8"
    assert {l.format for l in inspect_path(written["nvfp4w"].path).layers if l.format} == {"W4A16-nvfp4/16"}
    assert inspect_path(written["mxfp8"].path).summary()["formats"]["mxfp8/32"] == 6
    assert inspect_path(written["nvfp4"].path).lint == []


def test_registry_knows_the_formats():
    assert {"nvfp4", "mxfp8"} <= set(formats.modes())
    assert formats.from_storage("float4_e2m1fn") is formats.NVFP4
    assert formats.from_engine("FP4E2M1") is formats.NVFP4


# ---------------------------------------------------------------- CLI
def test_cli_refuses_weight_only_outside_nvfp4(tmp_path):
    src = tiny.save(tiny.transformer(), tmp_path / "t.onnx")
    r = CliRunner().invoke(main, ["quantize", src, "--fp8", "--weight-only", "--calib-random", "2", "--shapes", "ids:1x16"])
    assert r.exit_code == 2 and "--weight-only applies to --nvfp4 only" in r.output


def test_cli_nvfp4_without_blockable_layers_is_one_line(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "c.onnx")
    r = CliRunner().invoke(main, ["quantize", src, "--nvfp4", "--calib-random", "2", "--shapes", "x:1x3x16x16"])
    assert r.exit_code == 2 and "nothing to quantize to NVFP4" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- TensorRT-RTX for SM 12.0
@pytest.mark.rtx
def test_rtx_runs_every_nvfp4_layer_in_an_fp4_kernel(tmp_path):
    pytest.importorskip("polygraphy")
    from onnxopt import trt
    if not trt.rtx_available():
        pytest.skip("TensorRT-RTX not installed")
    from onnxopt.trt import report
    src = tiny.save(tiny.transformer(d=128, seq=16), tmp_path / "t.onnx")
    res = onnxopt.quantize(src, tmp_path / "t.nvfp4.onnx", config=onnxopt.QuantConfig(mode="nvfp4", progress=False),
                           calib_random=4, shapes={"ids": (2, 16)})
    rep = report.engine_report_of(res.path, targets=["12.0"])
    rows = {r["name"]: r for r in rep["layers"]}
    fp4 = [n for n, r in rows.items() if r["graph"].startswith("nvfp4")]
    assert len(fp4) == 6 and all(rows[n]["engine"] == "nvfp4" for n in fp4)
    assert rep["fallbacks"] == []


# ---------------------------------------------------------------- an input shared across attention blocks
def test_value_projections_of_a_shared_input_keep_fp8(tmp_path):
    """SDXL's cross-attention: every block's K/V projections read encoder_hidden_states. TensorRT-RTX 1.7.1 merges
    the FP4 GEMMs reading one quantized input and cannot compile two merged value projections at batch > 1
    (BENCHMARKS.md "NVFP4 at batch 2"), so those stay FP8 (reason in the report); keys, queries, outputs NVFP4."""
    from onnxopt.quant import rules
    src = tiny.save(tiny.cross_attention(blocks=2), tmp_path / "ca.onnx")
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((4, 1, 16, 64)).astype(np.float32),
             enc=rng.standard_normal((4, 1, 77, 64)).astype(np.float32))
    res = onnxopt.quantize(src, tmp_path / "ca.nvfp4.onnx", config=onnxopt.QuantConfig(mode="nvfp4", progress=False), data=calib)
    r = res.report["blockfp"]
    assert r["coverage"]["nvfp4"] == 6 and r["coverage"]["fp8"] == 6
    assert {n for n, why in r["fp8_reasons"].items() if "value projection" in why} == {"b0_v_proj", "b1_v_proj"}
    fmt = {l.name: l.format for l in inspect_path(res.path).layers}
    assert all(fmt[f"b{b}_{p}_proj"] == "nvfp4/16" for b in (0, 1) for p in "qko")
    assert fmt["b0_v_proj"] == fmt["b1_v_proj"] == "fp8"
    # weight-only has no dynamic FP4 input to merge: every projection stays NVFP4
    wo = onnxopt.quantize(src, tmp_path / "ca.w.onnx", config=onnxopt.QuantConfig(mode="nvfp4", weight_only=True, progress=False),
                          data=calib)
    assert wo.report["blockfp"]["coverage"]["nvfp4"] == 8
    # one block: its value projection is the only one reading `enc`, so it stays NVFP4
    g = onnxopt.modelfile.import_graph(tiny.cross_attention(blocks=1))
    v = next(n for n in g.nodes if n.name == "b0_v_proj")
    assert rules.block_format_reason(v, 16) is None
    feeds = {"x": rng.standard_normal((2, 16, 64)).astype(np.float32), "enc": rng.standard_normal((2, 77, 64)).astype(np.float32)}
    ref = ortx.session(onnx.load(src), level="disable").run(None, feeds)[0]
    got = ortx.session(emulated_view(onnx.load(res.path)), level="disable").run(None, feeds)[0]
    assert float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98
