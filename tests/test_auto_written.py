"""--auto verifies what it ships: the gated graph's "this mix" is the written graph's output (a residual Add's
Q/DQ owned by the Conv feeding it, bias correction on that Conv), and the report's verification is the written
graph's own."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
import tiny

from onnxopt import autoquant, metrics, modelfile, ort, pipeline
from onnxopt.cli import main
from onnxopt.passes import AutoQuant
from onnxopt.quant import writer


def _resnet(path, c=256):
    """conv0 -> relu -> conv1(bias) -> Add(conv1, conv0) -> relu -> conv2(bias): a residual block (128 Ki weights a layer)."""
    return tiny.residual_block(path, c)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_residual_add_gated_equals_written(tmp_path, fmt):
    """conv1 in 8 bits: the written graph quantizes the residual Add's other input (owned by conv1) and folds
    conv1's bias correction; the gated graph must model both (before the fix its bias-correction Identity hid
    conv1 as the Add's owner, so the Add went unquantized and the two graphs disagreed by ~1e-2)."""
    path = tmp_path / "res.onnx"
    feeds = _resnet(path)
    graph = modelfile.import_graph(pipeline.load(str(path), 21))
    p = AutoQuant(("fp8", "int8"), bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    assert fmt in cands.layers["conv1"].formats
    assert [(a.name, i) for a, i in cands.plans[fmt].residuals] == [("residual", 1)]
    amax, means = autoquant.calibrate(graph, feeds, cands, provider="cpu", memory_budget_mb=512, progress=False)
    gated = modelfile.import_graph(pipeline.load(str(path), 21))
    index = autoquant.build_gated(gated, cands, amax, means, "fp32", 128)
    gates = np.zeros(len(index), np.float32)
    gates[index[("conv1", fmt)]] = 1
    x = np.concatenate([f["x"] for f in feeds])
    want = ort.session(modelfile.export_graph(gated, opset=21), level="disable").run(None, {"x": x, autoquant.GATES: gates})[0]
    info = writer.write(graph, writer.QuantPlan.from_mix({"conv1": fmt}, configs=p.configs(), amax=amax, means=means),
                        high_precision="fp32")
    assert info["conv1"]["bias_correction"] > 0
    out = modelfile.export_graph(graph, opset=21)
    res = next(n for n in out.graph.node if n.name == "residual")
    assert [i.endswith("dequantized") for i in res.input] == [False, True]  # the skip input quantized, for conv1
    got = ort.session(out, level="disable").run(None, {"x": x})[0]
    ref = ort.session(modelfile.load(str(path)), level="disable").run(None, {"x": x})[0]
    err = np.abs(got - ref).max()
    assert err > 1e-3  # quantization moves the output...
    np.testing.assert_allclose(want, got, rtol=0, atol=1e-3 * err)  # ...and both graphs move it the same way


def test_report_verifies_the_written_graph(tmp_path):
    """The report's verification is the written graph's, on the same held-out batches: equal to what ORT gives
    on the saved model (before `--auto` judged only the gated graph)."""
    path = tmp_path / "res.onnx"
    feeds = _resnet(path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds]))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--target-cosine", "0.999", "--calib", str(calib),
                                  "-o", str(out), "--report", str(rep), "--high-precision", "fp32"])
    assert r.exit_code == 0, r.output
    a = json.loads(rep.read_text())["autoquant"]
    assert a["met_on"] == "written graph" and a["met"]
    w, g = a["verified_written"], a["verified"]
    assert w["n"] == g["n"] == 2
    x = np.load(calib)["x"][-2:]
    ref = ort.session(modelfile.load(str(path)), level="disable").run(None, {"x": x})[0].reshape(2, -1)
    got = ort.session(modelfile.load(str(out)), level="disable").run(None, {"x": x})[0].reshape(2, -1)
    assert w["cosine"] == pytest.approx(metrics.mean_cosine_score(ref.astype(np.float64), got.astype(np.float64)), abs=1e-6)
    assert w["cosine"] == pytest.approx(g["cosine"], abs=1e-4)
    assert a["written_repairs"][-1]["written"] == w["cosine"]
