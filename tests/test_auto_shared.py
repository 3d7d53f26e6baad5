"""--auto on ALBERT-style shared weights (one layer's weights read at every depth, tests/test_shared_weights.py's
stack): INT8 brings its SmoothQuant variant as a candidate, a shared weight's uses take one smoothing scale (from
every use), and the written graph stores the smoothed weight once and computes what the gated graph measured."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_shared_weights import DEPTH, D, F, _data, _outputs, _shared_stack, _stored_weights

from onnxopt import autoquant, formats, metrics, modelfile, ort, pipeline
from onnxopt.passes import AutoQuant
from onnxopt.quant import writer


def test_int8_brings_its_smoothquant_variant():
    """`--formats int8` offers int8-sq too (SmoothQuant's INT8: the search keeps whichever costs less error), as
    does int8 beside formats without static activations; beside FP8 (the default fp8,int8) nothing is added;
    `variants=False` offers exactly what was asked."""
    sq = formats.INT8_SQ.name
    assert AutoQuant((formats.INT8.name,), bits=8).formats == (formats.INT8.name, sq)
    assert AutoQuant((formats.INT8.name, formats.INT4.name), bits=8).formats == (formats.INT8.name, formats.INT4.name, sq)
    assert AutoQuant((formats.FP8.name, formats.INT8.name), bits=8).formats == (formats.FP8.name, formats.INT8.name)
    assert AutoQuant(bits=8).formats == formats.auto_defaults()
    assert AutoQuant((formats.FP8.name,), bits=8).formats == (formats.FP8.name,)
    assert AutoQuant((formats.INT8.name, sq), bits=8).formats == (formats.INT8.name, sq)
    assert AutoQuant((formats.INT8.name,), bits=8, variants=False).formats == (formats.INT8.name,)


def _calibrated(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_shared_stack(True), src)
    graph = modelfile.import_graph(pipeline.load(str(src), 21))
    p = AutoQuant((formats.INT8.name, formats.INT8_SQ.name), bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    feeds = [{"x": x} for x in _data(16, 0)]
    amax, means = autoquant.calibrate(graph, feeds, cands, provider="cpu", memory_budget_mb=512, progress=False)
    return src, graph, p, cands, amax, means


@pytest.mark.parametrize("smoothed", ["fc1", "fc1+fc2"])
def test_shared_weight_smoothed_once_gated_equals_written(tmp_path, smoothed):
    """Every use of the shared W1 (and W2) in int8-sq: one s for all DEPTH activations of a weight, W ⊙ s stored
    once (before: a smoothed copy per use, DEPTH tensors), and the written graph's output equals the gated graph's
    for the same mix (ORT, exact fake quantization)."""
    src, graph, p, cands, amax, means = _calibrated(tmp_path)
    sq = formats.INT8_SQ.name
    fc1 = [f"fc1_{i}" for i in range(DEPTH)]
    fc2 = [f"fc2_{i}" for i in range(DEPTH)]
    assert all(sq in cands.layers[n].formats for n in fc1)
    by_layer = {n: sm for sm in cands.smooth.values() for n in sm.layers}
    s1 = [by_layer[n].s for n in fc1]
    assert all(np.array_equal(s1[0], s) for s in s1) and s1[0].max() > 2  # one s, the outlier channel moved
    mix = {n: sq for n in fc1}
    mix.update({n: sq if smoothed == "fc1+fc2" else formats.INT8.name for n in fc2})
    gated = modelfile.import_graph(pipeline.load(str(src), 21))
    index = autoquant.build_gated(gated, cands, amax, means, "fp32", 128)
    gsess = ort.session(modelfile.export_graph(gated, opset=21), level="disable")
    writer.write(graph, writer.QuantPlan.from_mix(mix, configs=p.configs(), amax=amax, means=means, smooth=cands.smooth),
                 high_precision="fp32")
    out = modelfile.export_graph(graph, opset=21)
    assert _stored_weights(out) == {(D, F): 1, (F, D): 1}
    xs = _data(4, 1)
    gates = np.zeros(len(index), np.float32)
    for key in mix.items():
        gates[index[key]] = 1
    g = np.stack([gsess.run(None, {"x": x, autoquant.GATES: gates})[0] for x in xs]).astype(np.float64)
    w = _outputs(out, xs)
    np.testing.assert_allclose(w, g, rtol=1e-4, atol=1e-4)
    ref = _outputs(onnx.load(src), xs).reshape(4, -1)
    assert metrics.mean_cosine_score(ref, w.reshape(4, -1)) > 0.995


def test_auto_int8_on_shared_stack_meets_target_weights_once(tmp_path):
    """`quantize --auto --formats int8` on the shared stack (the outlier LayerNorm channel before W1): every reader
    of a shared weight takes one format, the written file stores each weight once, and ORT on the saved graph meets
    the target on the held-out calibration quarter."""
    import json

    from click.testing import CliRunner

    from onnxopt.cli import main
    src, out, rep = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    onnx.save(_shared_stack(True), src)
    xs = _data(32, 0)
    np.savez(tmp_path / "c.npz", x=xs)
    r = CliRunner().invoke(main, ["quantize", str(src), "--auto", "--formats", formats.INT8.name, "--target-cosine", "0.995",
                                  "--calib", str(tmp_path / "c.npz"), "-o", str(out), "--report", str(rep),
                                  "--high-precision", "fp32"])
    assert r.exit_code == 0, r.output
    a = json.loads(rep.read_text())["autoquant"]
    fc1 = {a["layers"][f"fc1_{i}"]["choice"] for i in range(DEPTH)}
    fc2 = {a["layers"][f"fc2_{i}"]["choice"] for i in range(DEPTH)}
    sq, i8 = formats.INT8_SQ.name, formats.INT8.name
    assert fc1 == {sq} and len(fc2) == 1                       # one format per shared weight; W1 smoothed
    err = a["layers"]["fc1_0"]["sensitivity"]
    assert err[sq] < 0.5 * err[i8]                             # the outlier channel: SmoothQuant is what INT8 needs
    q = onnx.load(out)
    assert _stored_weights(q) == {(D, F): 1, (F, D): 1}        # each weight once (INT8 codes), read by every depth
    assert a["met"] is True
    held = xs[-8:]
    ref, got = _outputs(onnx.load(src), held).reshape(8, -1), _outputs(q, held).reshape(8, -1)
    assert metrics.mean_cosine_score(ref, got) >= 0.995


@pytest.mark.parametrize("identity", [False, True], ids=["one-initializer", "identity-per-use"])
def test_excluded_first_use_keeps_the_lead(tmp_path, identity):
    """`--exclude` of a shared weight's first use (fc1_0) does not move the lead's cut to its first planned use
    (before: fc1_1, which made the lead 2 of 7 planned layers, over LEAD_MAX, so nothing was kept): depth 0's other
    layer (fc2_0) stays high precision, depth 1 on is quantized."""
    from onnxopt.api import QuantConfig, quantize
    src = tmp_path / "m.onnx"
    onnx.save(_shared_stack(identity), src)
    np.savez(tmp_path / "c.npz", x=_data(16, 0))
    cfg = QuantConfig(mode=formats.INT8.name, progress=False, high_precision="fp32", exclude=("^fc1_0$",))
    res = quantize(str(src), tmp_path / "q.onnx", config=cfg, data=str(tmp_path / "c.npz"))
    skipped = res.report["qdq"]["skipped"]
    assert {n for n, r in skipped.items() if "first use" in r} == {"fc2_0"}
    assert "fc1_0" in skipped and "fc1_1" not in skipped and "fc2_1" not in skipped
