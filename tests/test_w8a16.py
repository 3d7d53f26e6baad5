"""W8A16 (formats/w8a16.py), the registry's proof: INT8 per-channel weight-only added as one module. Its numbers
against ONNX Runtime at ORT_DISABLE_ALL, the written graph, `quantize --w8a16` from the CLI, `--auto --formats
fp8,w8a16`, `inspect` and the engine report (a recorded TensorRT-RTX log everywhere, a real CPU build under `rtx`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import numpy_helper as nh

import tiny
from onnxopt import QuantConfig, api, formats, modelfile, ort, quantize
from onnxopt.passes import Autocast
from onnxopt.passes import Int4 as WeightOnly
from onnxopt.cli import main
from onnxopt.inspection import engine_findings, inspect_path
from onnxopt.trt import report as R
from onnxopt.trt import rtx_available

W8A16 = formats.get("w8a16")
WEIGHTS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "mlp_up": "w_up", "mlp_down": "w_dn"}
LOG = Path(__file__).parent / "data" / "rtx" / "example_w8a16.log"


def test_registered_with_int8_numbers_and_weight_only_facts():
    assert "w8a16" in formats.modes() and "w8a16" in formats.weight_only() and "w8a16" in formats.auto_candidates()
    assert "w8a16" not in formats.static() and "w8a16" not in formats.auto_defaults()
    assert (W8A16.qmax, W8A16.qmin, W8A16.bits, W8A16.np_dtype) == (formats.INT8.qmax, formats.INT8.qmin, 8, np.dtype(np.int8))
    assert W8A16.weights == "per-channel" and W8A16.activations == "none" and not W8A16.awq
    assert formats.weight_bits()["w8a16"] == 8 and formats.activation_bits()["w8a16"] == 16
    # INT8 codes are W8A8's and W8A16's: the layer's role names the format (the default stays INT8)
    assert formats.from_storage("int8") is formats.INT8 and formats.from_storage("int8", weight_only=True) is W8A16
    assert formats.from_engine("Int8") is formats.INT8 and formats.from_engine("Int8", weight_only=True) is W8A16
    assert formats.from_storage("int4", weight_only=True) is formats.INT4 is formats.from_storage("int4")
    assert formats.from_storage("float8_e4m3fn", weight_only=True) is formats.FP8


def test_dequantize_only_weight_is_what_ort_computes():
    """The DQ-only weight the format writes runs in ORT exactly as its numpy emulation (activations untouched)."""
    rng = np.random.default_rng(0)
    x_val = (rng.standard_normal((4, 32)) * 3).astype(np.float32)
    w = (rng.standard_normal((32, 8)) * 0.1).astype(np.float32)
    w[:, 3] *= 1e-3  # a weak channel keeps its own scale
    x = gs.Variable("x", dtype=np.float32, shape=[4, 32])
    y = gs.Variable("y", dtype=np.float32, shape=[4, 8])
    mm = gs.Node("MatMul", inputs=[x, gs.Constant("w", w)], outputs=[y])
    g = gs.Graph(nodes=[mm], inputs=[x], outputs=[y], opset=19)
    q, s = W8A16.quantize_weight(w, 1, "fp16")
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and s.shape == (1, 8)
    mm.inputs[1] = W8A16.write_weight(g, "w", q, s.reshape(-1), {"axis": 1}, zero_point=False)
    g.toposort()
    got = ort.session(modelfile.export_graph(g, opset=19), level="disable").run(None, {"x": x_val})[0]
    np.testing.assert_allclose(got, x_val @ W8A16.fake_quant(w, 1, "fp16"), rtol=1e-5, atol=1e-6)
    assert np.abs(W8A16.fake_quant(w, 1, "fp32") - w).max() <= np.abs(w).max(axis=0).max() / 127 / 2 + 1e-7


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("w8a16")
    src = tiny.save(tiny.transformer(d=64), d / "t.onnx")
    out = quantize(src, d / "t.w8a16.onnx", config=QuantConfig(mode="w8a16", high_precision="fp32", progress=False),
                   calib_random=2, shapes={"ids": (2, 16)})
    return d, src, out.path, out.report


def test_written_graph_equals_numpy_emulation(written):
    """The whole written model (FP32 elsewhere) gives exactly the FP32 model with each weight replaced by
    W8A16.fake_quant, both run in ORT at ORT_DISABLE_ALL."""
    d, src, path, _ = written
    ref = onnx.load(src)
    for t in ref.graph.initializer:
        if t.name in WEIGHTS.values():
            t.CopyFrom(nh.from_array(W8A16.fake_quant(nh.to_array(t), 1, "fp32").astype(np.float32), t.name))
    ids = np.random.default_rng(5).integers(0, 50, (3, 16)).astype(np.int64)
    want = ort.session(ref, level="disable").run(None, {"ids": ids})[0]
    got = ort.session(modelfile.load(path), level="disable").run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = ort.session(onnx.load(src), level="disable").run(None, {"ids": ids})[0]
    assert np.abs(got - plain).max() > 1e-4  # the weights really are quantized


def test_recipe_is_the_per_layer_pass_alone():
    """No AWQ pass for a format without AWQ (QuantConfig's default awq is "full", INT4's)."""
    passes = api.recipe(QuantConfig(mode="w8a16")).passes
    assert [type(p) for p in passes] == [WeightOnly, Autocast] and passes[0].format == "w8a16"
    assert passes[0].min_opset == W8A16.min_opset == 19  # per-axis DequantizeLinear with FP16 scales, not INT4's 21


def test_written_graph_structure(written):
    d, src, path, report = written
    assert [o.version for o in modelfile.load(path).opset_import if o.domain in ("", "ai.onnx")] == [19]
    g = modelfile.import_graph(modelfile.load(path))
    by = {n.name: n for n in g.nodes}
    assert not [n for n in g.nodes if n.op == "QuantizeLinear"]  # no activation Q/DQ
    for layer in WEIGHTS:
        dq = by[layer].inputs[1].inputs[0]
        assert dq.op == "DequantizeLinear" and "block_size" not in dq.attrs and dq.attrs["axis"] == 1
        codes, scale = dq.inputs[0], dq.inputs[1]
        assert codes.values.dtype == np.int8 and scale.values.shape == (codes.values.shape[1],)
        assert not isinstance(by[layer].inputs[0].inputs[0] if by[layer].inputs[0].inputs else None, gs.Node) \
            or by[layer].inputs[0].inputs[0].op != "DequantizeLinear"
    for bmm in ("attn_qk", "attn_pv"):  # no constant weight: left alone
        assert all(not t.inputs or t.inputs[0].op != "DequantizeLinear" for t in by[bmm].inputs)
    assert report["w8a16"]["coverage"] == {"quantized": 6, "skipped": 2, "int8": 0}


def test_inspect_names_it(written):
    ins = inspect_path(written[2])
    s = ins.summary()
    assert s["formats"] == {"W8A16": 6} and s["weight_only_layers"] == s["quantized_layers"] == 6 and ins.lint == []
    assert not engine_findings(modelfile.import_graph(modelfile.load(written[2]))).fp16_layers


def test_cli_quantize_w8a16_and_its_option_errors(written, tmp_path):
    d, src, _, _ = written
    r = CliRunner().invoke(main, ["quantize", str(src), "--w8a16", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert "quantized 6/8 layers to w8a16 weight-only (per-channel, round-to-nearest), 2 skipped" in r.output
    q = onnx.load(tmp_path / "q.onnx")
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in q.graph.initializer) == 6
    for extra, msg in ((["--awq", "clip"], "error: --awq applies to --int4"),
                       (["--block-size", "64"], "error: --block-size applies to --int4 only; --w8a16 has per-channel weights"),
                       (["--smoothquant", "0.5"], "--w8a16 is weight-only"),
                       (["--calib-method", "mse"], "--w8a16 is weight-only")):
        r = CliRunner().invoke(main, ["quantize", str(src), "--w8a16", "-o", str(tmp_path / "x.onnx"), *extra])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (extra, r.output)
        assert not (tmp_path / "x.onnx").exists()


def test_auto_offers_w8a16(written, tmp_path):
    """`--auto --formats fp8,w8a16`: a candidate of every weighted MatMul at 8/16 bits; a tight target takes it,
    and the written graph holds it as written by --w8a16 (INT8 DQ weight, no activation Q/DQ)."""
    d, src, _, _ = written
    np.savez(tmp_path / "c.npz", ids=np.random.default_rng(3).integers(0, 50, (16, 16)).astype(np.int64))
    out, rep = tmp_path / "a.onnx", tmp_path / "a.json"
    r = CliRunner().invoke(main, ["quantize", str(src), "--auto", "--formats", "fp8,w8a16", "--target-cosine", "0.99995",
                                  "--calib", str(tmp_path / "c.npz"), "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    layers = json.loads(rep.read_text())["autoquant"]["layers"]
    assert {n for n, l in layers.items() if "w8a16" in l["candidates"]} == set(WEIGHTS)
    assert all(layers[n]["sensitivity"]["w8a16"] < layers[n]["sensitivity"]["fp8"] for n in WEIGHTS)
    chosen = {n for n, l in layers.items() if l.get("format") == "w8a16"}
    assert chosen and "w8a16" in r.output
    g = modelfile.import_graph(modelfile.load(out))
    by = {n.name: n for n in g.nodes}
    for n in chosen:
        dq = by[n].inputs[1].inputs[0]
        assert dq.op == "DequantizeLinear" and dq.inputs[0].values.dtype == np.int8
        assert not by[n].inputs[0].inputs or by[n].inputs[0].inputs[0].op != "DequantizeLinear"
    assert inspect_path(out).summary()["formats"].get("W8A16") == len(chosen)


def _example(tmp_path) -> Path:
    """The example transformer of tests/test_rtx.py (d=256, 64 tokens) in W8A16, as the recorded log was built."""
    base = tmp_path / "model.onnx"
    modelfile.save(tiny.transformer(d=256, heads=4, seq=64), base)
    out = tmp_path / "model.w8a16.onnx"
    quantize(base, out, config=QuantConfig(mode="w8a16", progress=False), calib_random=4, shapes={"ids": (1, 64)})
    return out


def test_engine_report_names_it_from_recorded_log(tmp_path):
    """TensorRT-RTX 1.7.1's kernels for the example (recorded; tests/data/rtx/example_w8a16.log): each weight's
    DequantizeLinear fused into one `CastMulCastFc` GEMM with an Int8 constant and Half activations."""
    log = R.parse_log(LOG.read_text())
    fc = [k for k in log.kernels if "CastMulCastFc" in k.name]
    assert len(fc) == 6 and all(k.precision == "w8a16-weight" and k.computes and "Int8" in k.constants for k in fc)
    assert all(k.inputs and set(k.inputs) <= {"Half"} for k in fc)
    rep = R.engine_report(modelfile.load(_example(tmp_path)), log)
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 6
    assert rep["kernel_precisions"] == {"w8a16-weight": 6} and not rep["fallbacks"] and not rep["int4_dq_kernels"]
    assert {r["graph"] for r in rep["layers"]} == {"w8a16 weight-only"} and rep["padding"]["bytes"] == 0
    assert rep["weights"]["vs_fp16"] < 0.55


@pytest.mark.rtx
@pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")
@pytest.mark.parametrize("cc", ["8.9", "12.0"])
def test_rtx_build_runs_w8a16_kernels(tmp_path, cc):
    src = _example(tmp_path)
    r = CliRunner().invoke(main, ["build", str(src), "--backend", "rtx", "--compute-capability", cc, "-o",
                                  str(tmp_path / "m.plan"), "--shapes", "ids:1x64/2x64/2x64", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 6 and not rep["fallbacks"]
    assert rep["kernel_precisions"] == {"w8a16-weight": 6} and not rep["int4_dq_kernels"]
    assert rep["attention"]["fused_by_precision"] == {"fp16": 1}
    assert rep["weights"]["engine_weights_memory"] < 0.55 * rep["weights"]["fp16_bytes"]
