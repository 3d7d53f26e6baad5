"""--auto's weight-only NVFP4 candidate ("nvfp4-wo", W4A16): offered beside NVFP4 W4A4 only, written by the same
weight writer as `--nvfp4 --weight-only` (FP4 codes, FP8 block scales, FP32 tensor scale; no dynamic quantizer on
its input), costed as 4.5-bit weights with 16-bit activations, and named apart from W4A4 in the reports."""
import json

import numpy as np
import onnx
import pytest
import tiny
from click.testing import CliRunner
from onnx import numpy_helper

import onnxopt
from onnxopt import autoquant, formats, modelfile, ort, pipeline
from onnxopt.cli import main
from onnxopt.compare import evaluation_session
from onnxopt.formats import nvfp4
from onnxopt.inspection import inspect_path
from onnxopt.passes import AutoQuant
from onnxopt.quant import writer

WO = formats.NVFP4_WO.name


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.transformer_and_ids(tmp_path_factory.mktemp("nvwo"))


def test_offered_only_with_nvfp4():
    assert WO in formats.auto_candidates() and WO not in formats.modes() and WO not in formats.auto_defaults()
    assert formats.auto_with_variants(("fp8", "nvfp4")) == ("fp8", "nvfp4", WO)
    assert formats.auto_with_variants(("nvfp4",)) == ("nvfp4", WO)
    for fmts in (("fp8",), ("fp8", "int8"), ("mxfp8",), ("fp8", "int4"), ("fp8", "mxfp8")):
        assert WO not in formats.auto_with_variants(fmts), fmts
    assert formats.auto_with_variants(("int8",)) == ("int8", "int8-sq")  # int8's own variant unchanged
    assert WO in AutoQuant(("fp8", "nvfp4"), bits=8).formats and WO not in AutoQuant(("fp8",), bits=8).formats
    assert formats.with_weight_only_variant() == ("nvfp4",)  # --weight-only still goes with --nvfp4 alone


def test_cost_is_four_bit_weights_and_sixteen_bit_activations(model):
    assert formats.weight_bits()[WO] == formats.weight_bits()["nvfp4"] == 4.5  # E2M1 + an FP8 scale per 16
    assert formats.activation_bits()[WO] == 16.0 and formats.activation_bits()["nvfp4"] == 4.5
    path, _, ids = model
    graph = modelfile.import_graph(pipeline.load(str(path), 23))
    p = AutoQuant(("fp8", "nvfp4"), bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_up", "mlp_down"):
        assert cands.layers[n].formats == ["none", "fp8", "nvfp4", WO], n
    assert WO not in cands.layers["attn_qk"].formats and "attention BMM" in cands.layers["attn_qk"].reasons[WO]
    layer = cands.layers["mlp_up"]
    layer.macs = 1000.0
    assert layer.weight_bits(WO) == 4.5 * layer.params and layer.activation_bits(WO) == 16 * 1000.0
    mix = {n: "none" for n in cands.layers}
    mix["mlp_up"] = WO
    assert autoquant.bits_of(mix, {"mlp_up": layer})["macs_8bit"] == 0.0  # its MACs run in 16 bits


def _initializers(m) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _weight_parts(m, const_prefix: str):
    """(codes, FP8 block scales, FP32 tensor scale) of the NVFP4 weight whose codes initializer starts with `const_prefix`."""
    inits = _initializers(m)
    fp4 = [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1 and t.name.startswith(const_prefix)]
    assert len(fp4) == 1, fp4
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == fp4[0])
    sdq = next(n for n in m.graph.node if dq.input[1] in n.output)
    return inits[fp4[0]], inits[sdq.input[0]], inits[sdq.input[1]]


def test_candidate_is_the_uniform_weight_only_writers_form(model, tmp_path):
    """The plan {layer: nvfp4-wo} writes exactly what `--nvfp4 --weight-only` writes for that layer (same codes, FP8
    block scales and FP32 tensor scale, no dynamic quantizer), and the layer computes x @ fake_quant(W) (numpy)."""
    path, _, ids = model
    uni = onnxopt.quantize(str(path), tmp_path / "u.onnx", config=onnxopt.QuantConfig(mode="nvfp4", weight_only=True,
                                                                                      awq="none", progress=False))
    uniform = onnx.load(uni.path)
    graph = modelfile.import_graph(pipeline.load(str(path), 23))
    mix = {"q_proj": WO, "mlp_down": WO}
    info = writer.write(graph, writer.QuantPlan.from_mix(mix), high_precision="fp32")
    assert {n: i["format"] for n, i in info.items()} == mix
    auto = modelfile.export_graph(graph, opset=23)
    assert not [n for n in auto.graph.node if n.op_type == nvfp4.DYNAMIC_OP]  # FP16 activations: no quantizer
    src = _initializers(onnx.load(str(path)))
    for layer, w in (("q_proj", "wq"), ("mlp_down", "w_dn")):
        got, want = _weight_parts(auto, w), _weight_parts(uniform, w)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8) if a.dtype.itemsize == 1 else a,
                                                         b.view(np.uint8) if b.dtype.itemsize == 1 else b), layer
        codes, bs, s = got
        ref = nvfp4.NVFP4_FORMAT.quantize_parts(src[w])  # the numpy reference of the same weight
        assert np.array_equal(codes.view(np.uint8), ref.codes.view(np.uint8)) and float(s) == float(ref.scale)
        assert np.array_equal(nvfp4.Fp4Weight(codes, bs, s).dequantize(), formats.NVFP4_WO.fake_quant(src[w], 1))
    # the written graph (ORT, exact emulation) against the FP32 model with numpy's fake-quantized weights
    ref_model = onnx.load(str(path))
    for t in ref_model.graph.initializer:
        if t.name in ("wq", "w_dn"):
            t.CopyFrom(numpy_helper.from_array(formats.NVFP4_WO.fake_quant(src[t.name], 1), t.name))
    x = ids[:4]
    want = ort.session(ref_model, level="disable").run(None, {"ids": x})[0]
    got = evaluation_session(auto)[0].run(None, {"ids": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_reports_name_it_apart_from_w4a4(model, tmp_path):
    """A weight-bit budget of 4.5 takes 4-bit weights on every GEMM; at equal weight bits the weight-only form has
    the smaller error on this model, so it carries; the report, `inspect` and the engine report's graph side name it."""
    path, calib, _ = model
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--formats", "fp8,nvfp4", "--bits", "4.5",
                                  "--calib", str(calib), "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    rj = json.loads(rep.read_text())
    layers = rj["autoquant"]["layers"]
    wo = sorted(n for n, l in layers.items() if l["choice"] == WO)
    assert wo and all(layers[n]["format"] == WO for n in wo) and rj["coverage"].get(WO) == len(wo)
    assert f"{len(wo)} {WO}" in r.output
    fmt = {l.name: l.format for l in inspect_path(str(out)).layers}
    assert all(fmt[n] == "W4A16-nvfp4/16" for n in wo)
    from onnxopt.trt import report
    rows = {l.name: l for l in report.quantized_layers(modelfile.import_graph(onnx.load(str(out))))}
    assert all(rows[n].kind == "weight-only" and rows[n].dtype == WO for n in wo)


MIX = {"q_proj": "nvfp4", "k_proj": WO, "mlp_up": "nvfp4", "mlp_down": WO}


def _write_mix(model, tmp_path):
    """MIX written by the one writer (FP32 elsewhere) at opset 23: (path, mix)."""
    path, _, _ = model
    graph = modelfile.import_graph(pipeline.load(str(path), 23))
    writer.write(graph, writer.QuantPlan.from_mix(MIX), high_precision="fp32")
    out = tmp_path / "mix.onnx"
    onnx.save(modelfile.export_graph(graph, opset=23), str(out))
    return out, MIX


def test_nvfp4_and_its_weight_only_form_side_by_side(model, tmp_path):
    """A mix of both: W4A4 layers keep their dynamic quantizer and are named nvfp4, the W4A16 ones are not."""
    out, mix = _write_mix(model, tmp_path)
    m = onnx.load(str(out))
    assert sum(n.op_type == nvfp4.DYNAMIC_OP for n in m.graph.node) == 2
    fmt = {l.name: l.format for l in inspect_path(str(out)).layers}
    assert [fmt[n] for n in mix] == ["nvfp4/16", "W4A16-nvfp4/16", "nvfp4/16", "W4A16-nvfp4/16"]
    from onnxopt.trt import report
    rows = {l.name: (l.kind, l.dtype) for l in report.quantized_layers(modelfile.import_graph(m))}
    assert rows["q_proj"] == ("w8a8", "nvfp4") and rows["k_proj"] == ("weight-only", WO)


@pytest.mark.rtx
def test_rtx_runs_w4a4_in_fp4_kernels_and_says_the_weight_only_layers_are_fp16_gemms(model, tmp_path):
    """TensorRT-RTX 1.7.1 for SM 12.0: the W4A4 layers of a mix in FP4 kernels (no fallback), the weight-only ones
    reported as what they are, high-precision GEMMs after a dequantizing kernel (FP32 here: no Autocast; not FP4 kernels)."""
    from onnxopt.trt import report, rtx_available
    from onnxopt.trt.build import BuildConfig
    if not rtx_available():
        pytest.skip("tensorrt_rtx is not importable (install the rtx extra)")
    out, mix = _write_mix(model, tmp_path)
    rep = report.engine_report_of(out, config=BuildConfig(profiles={"ids": ((1, 16),) * 3}), targets=["12.0"])
    rows = {r["name"]: r for r in rep["layers"]}
    assert [rows[n]["engine"] for n in ("q_proj", "mlp_up")] == ["nvfp4", "nvfp4"]
    assert all(rows[n]["graph"] == f"{WO} weight-only" and rows[n]["engine"] in formats.high_precision() and not rows[n]["quantized_kernel"]
               for n in ("k_proj", "mlp_down"))
    assert rep["fallbacks_by_format"] == {f"{WO} weight-only": 2}  # no "nvfp4 w8a8" among them
    assert f"2 {WO} weight-only (dequantized into high-precision GEMMs)" in report.format_report(rep)


def test_awq_clips_are_searched_once_for_both_forms(model, monkeypatch):
    """AWQ's clip search and error feedback fit the unquantized input's Gram matrix, so W4A4 and W4A16 (same
    weight numerics, no input scaling) share one search; with W4A4's opt-in smoothing the weight-only form gets its own."""
    from onnxopt.rewrite import awq
    path, _, ids = model
    calls = []
    real = awq.apply
    monkeypatch.setattr(awq, "apply", lambda *a, **k: calls.append(k.get("prescale")) or real(*a, **k))
    feeds = [{"ids": ids[i:i + 1]} for i in range(len(ids))]
    for smooth, n_calls in ((False, 1), (True, 2)):
        calls.clear()
        graph = modelfile.import_graph(pipeline.load(str(path), 23))
        p = AutoQuant(("fp8", "nvfp4"), bits=8)
        cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
        autoquant.block_awq(graph, feeds, cands, p.formats, high_precision="fp32", provider="cpu", memory_budget_mb=512,
                            progress=False, smooth=smooth)
        assert len(calls) == n_calls, smooth
        assert not any((n, WO) in cands.block_smooth for n in cands.layers)  # no W4A4 input scaling for W4A16
        for n in ("q_proj", "mlp_down"):
            assert cands.clip_of(n, WO) is not None
            if not smooth:
                assert cands.clip_of(n, WO) is cands.clip_of(n, "nvfp4")
