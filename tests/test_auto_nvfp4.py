"""--auto with block formats (issue 24): NVFP4 and MXFP8 as per-layer candidates. The gated graph's NVFP4 layer is
the writer's own nodes lowered for ONNX Runtime (formats.emulation), so it computes what the written file computes
under the exact emulation; the search mixes NVFP4 / FP8 / FP16 to a cosine target."""
import json

import numpy as np
import onnx
import pytest
import tiny
from click.testing import CliRunner

from onnxopt import autoquant, modelfile, ort, pipeline
from onnxopt.cli import main
from onnxopt.compare import evaluation_session
from onnxopt.passes import AutoQuant
from onnxopt.quant import writer

WEIGHTED = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_up", "mlp_down")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.transformer_and_ids(tmp_path_factory.mktemp("nv"))


def _setup(path, ids, fmts):
    graph = modelfile.import_graph(pipeline.load(str(path), 23))
    p = AutoQuant(fmts, bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    feeds = [{"ids": ids[i:i + 1]} for i in range(len(ids))]
    amax, means = autoquant.calibrate(graph, feeds, cands, provider="cpu", memory_budget_mb=512, progress=False)
    return graph, p, cands, amax, means


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_block_candidate_gated_equals_written(model, fmt):
    path, _, ids = model
    graph, p, cands, amax, means = _setup(path, ids, ("fp8", fmt))
    feeds = [{"ids": ids[i:i + 1]} for i in range(len(ids))]
    autoquant.block_awq(graph, feeds, cands, p.formats, high_precision="fp32", provider="cpu", memory_budget_mb=512,
                        progress=False, smooth=True)  # NVFP4: its helpers (smoothing, AWQ + error feedback); MXFP8 none
    assert bool(cands.block_clips) == (fmt == "nvfp4")
    wo = ["nvfp4-wo"] if fmt == "nvfp4" else []  # NVFP4 brings its weight-only form (W4A16)
    for n in WEIGHTED:
        assert cands.layers[n].formats == ["none", "fp8", fmt] + wo, (n, cands.layers[n].formats)
    assert fmt not in cands.layers["attn_qk"].formats and "attention BMM" in cands.layers["attn_qk"].reasons[fmt]
    gated = modelfile.import_graph(pipeline.load(str(path), 23))
    index = autoquant.build_gated(gated, cands, amax, means, "fp32", 128)
    mix = {"q_proj": fmt, "v_proj": "fp8", "o_proj": fmt, "mlp_up": fmt, "mlp_down": fmt, **{"k_proj": f for f in wo}}
    gates = np.zeros(len(index), np.float32)
    for key in mix.items():
        gates[index[key]] = 1
    x = ids[:4]
    gsess = ort.session(modelfile.export_graph(gated, opset=23), level="disable")
    want = gsess.run(None, {"ids": x, autoquant.GATES: gates})[0]
    plan = writer.QuantPlan.from_mix(mix, configs=p.configs(), amax=amax, means=means,
                                     clips={n: cands.clip_of(n, f) for n, f in mix.items() if cands.clip_of(n, f) is not None},
                                     block_smooth={n: cands.smooth_of(n, f) for n, f in mix.items() if cands.smooth_of(n, f)})
    info = writer.write(graph, plan, high_precision="fp32", block_dtype=np.float32)  # evaluated before Autocast
    assert [info[n]["format"] for n in mix] == list(mix.values())
    out = modelfile.export_graph(graph, opset=23)
    ops = [n.op_type for n in out.graph.node]
    dyn = {"nvfp4": "TRT_FP4DynamicQuantize", "mxfp8": "TRT_MXFP8DynamicQuantize"}[fmt]
    assert ops.count(dyn) == 4  # the real TensorRT form in the file: one dynamic quantizer per block layer
    smoothed = [n.name for n in out.graph.node if n.op_type == "Mul" and n.name.endswith("_w4a4_smooth")]
    assert smoothed == (["o_proj_w4a4_smooth"] if fmt == "nvfp4" else [])  # o_proj's NVFP4 takes x / s (alpha 0.25)
    got = evaluation_session(out)[0].run(None, {"ids": x})[0]
    ref = gsess.run(None, {"ids": x, autoquant.GATES: np.zeros_like(gates)})[0]
    err = float(np.abs(got - ref).max())
    assert err > 1e-3  # the mix moves the output...
    np.testing.assert_allclose(want, got, rtol=0, atol=1e-4 * err)  # ...and the gated graph moves it identically


def test_auto_mixes_nvfp4_to_a_cosine_target(model, tmp_path):
    path, calib, ids = model
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--formats", "fp8,nvfp4", "--target-cosine", "0.995",
                                  "--calib", str(calib), "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    a = json.loads(rep.read_text())["autoquant"]
    assert a["met"] and a["met_on"] == "written graph" and a["verified_written"]["cosine"] >= 0.995
    choice = {n: a["layers"][n]["choice"] for n in WEIGHTED}
    assert "nvfp4" in choice.values(), choice
    m = onnx.load(str(out))
    assert any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in m.graph.initializer)
    assert sum(n.op_type == "TRT_FP4DynamicQuantize" for n in m.graph.node) == list(choice.values()).count("nvfp4")


def _layer_io(path, ids, names):
    """The FP32 model's tensors `names` on `ids` (ORT, every tensor an output)."""
    m = onnx.load(str(path))
    for n in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = ort.session(m, level="disable")
    return dict(zip(names, sess.run(list(names), {"ids": ids})))


def test_nvfp4_candidate_with_awq_matches_numpy_and_beats_plain(model):
    """--auto's NVFP4 candidate carries AWQ's clip search + error-feedback rounding: the gated layer output equals
    the numpy reference (NVFP4 activation blocks x the AWQ weight), and its output error is below the plain one's."""
    from onnxopt import formats
    from onnxopt.formats import nvfp4
    path, _, ids = model
    graph, p, cands, amax, means = _setup(path, ids, ("fp8", "nvfp4"))
    more = np.concatenate([ids, np.random.default_rng(4).integers(0, 50, ids.shape).astype(np.int64)])
    feeds = [{"ids": more[i:i + 1]} for i in range(len(more))]
    autoquant.block_awq(graph, feeds, cands, p.formats, high_precision="fp32", provider="cpu", memory_budget_mb=512,
                        progress=False, smooth=True)
    assert {("mlp_up", "nvfp4"), ("q_proj", "nvfp4")} <= set(cands.block_clips)
    assert isinstance(cands.block_clips[("mlp_up", "nvfp4")], tuple)  # 512 rows >= 4 x K = 4 x 128: error feedback ran
    gated = modelfile.import_graph(pipeline.load(str(path), 23))
    index = autoquant.build_gated(gated, cands, amax, means, "fp32", 128)
    gated.outputs.append(gated.tensors()["u0"])  # mlp_up's output, behind its weight and activation gates
    x = ids[:4]
    gates = np.zeros(len(index), np.float32)
    gates[index[("mlp_up", "nvfp4")]] = 1
    got = ort.session(modelfile.export_graph(gated, opset=23), level="disable").run(["u0"], {"ids": x, autoquant.GATES: gates})[0]
    io = _layer_io(path, x, ["x1", "u0"])
    w = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == "w_up"))
    sm = cands.smooth_of("mlp_up", "nvfp4")
    xq = (nvfp4.fake_quant_activation(io["x1"], amax["fp8"]["x1"]) if sm is None else
          nvfp4.fake_quant_activation(io["x1"] / sm.s, sm.amax))
    w_awq = formats.NVFP4.fake_quant(w if sm is None else w * sm.s[:, None], 1, "fp32",
                                     clip=cands.block_clips[("mlp_up", "nvfp4")])
    want = xq @ w_awq
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))

    def rel(y):
        return float(np.sum((y - io["u0"]) ** 2) / np.sum(io["u0"] ** 2))
    plain = rel(nvfp4.fake_quant_activation(io["x1"], amax["fp8"]["x1"]) @ formats.NVFP4.fake_quant(w, 1, "fp32"))
    assert rel(want) < 0.9 * plain, (rel(want), plain)


@pytest.mark.rtx
def test_auto_nvfp4_with_helpers_builds_fp4_kernels(model, tmp_path):
    """--auto's NVFP4 layers with their helpers (smoothed ones: a Mul in front of the dynamic quantizer) all run
    TensorRT-RTX FP4 kernels for SM 12.0, no fallbacks."""
    from onnxopt.trt import rtx_available
    if not rtx_available():
        pytest.skip("tensorrt_rtx is not importable (install the rtx extra)")
    import onnxopt
    from onnxopt.api import QuantConfig, recipe
    from onnxopt.trt import report
    from onnxopt.trt.build import BuildConfig
    path, calib, _ = model
    rec = recipe(QuantConfig(auto=True, formats=("fp8", "nvfp4"), bits=4.5))
    aq = next(p for p in rec.passes if p.name == "autoquant")
    aq.block_smooth = True  # the opt-in helper, on the Python API
    aq.formats = ("fp8", "nvfp4")  # W4A4 alone: under a weight-bit budget its weight-only form (nvfp4-wo) takes the layers
    out = tmp_path / "q.onnx"
    layers = onnxopt.run(rec, str(path), str(out), data=str(calib), progress=False).report["autoquant"]["layers"]
    nv = {n for n, l in layers.items() if l["choice"] == "nvfp4"}
    assert len(nv) >= 4 and any(layers[n].get("smoothing") for n in nv), layers
    rep = report.engine_report_of(out, config=BuildConfig(profiles={"ids": ((1, 16),) * 3}), targets=["12.0"])
    assert rep["fallbacks"] == []
    got = {r["engine"] for r in rep["layers"] if r["graph"].startswith("nvfp4")}
    assert got == {"nvfp4"} and sum(r["graph"].startswith("nvfp4") for r in rep["layers"]) == len(nv)
