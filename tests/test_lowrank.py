"""Low-rank branch (onnxopt.rewrite.lowrank, passes.LowRank): exact in FP32, graph structure, the branch kept FP16 by the
placement rules, error reduction of the quantized residual, bad options, and a TensorRT-RTX build."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxopt import QuantConfig, modelfile, ort, quantize
from onnxopt.rewrite import lowrank
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.passes import QDQ, LowRank
from onnxopt.trt import rtx_available

K, N, M = 64, 48, 40


def model(outlier: float = 20.0) -> onnx.ModelProto:
    """MatMul [K,N] (one outlier row) -> Gemm transB [M,N] with bias; Conv 3x3 64->32 (pads, stride 2, bias)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[3] *= outlier  # an outlier input channel (row): what smoothing leaves in a weight
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(rng.standard_normal((M, N)).astype(np.float32) / 8, "Wg"),
             numpy_helper.from_array(rng.standard_normal(M).astype(np.float32), "bg"),
             numpy_helper.from_array((rng.standard_normal((32, 64, 3, 3)) * 0.1).astype(np.float32), "Wc"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bc")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Gemm", ["y", "Wg", "bg"], ["z"], name="gemm", transB=1),
             helper.make_node("Conv", ["img", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])]
    g = helper.make_graph(nodes, "lr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K]),
                                        helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 64, 8, 8])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", M]),
                           helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 32, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def feed(seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((8, K)).astype(np.float32), "img": rng.standard_normal((2, 64, 8, 8)).astype(np.float32)}


def run(m, f):
    return ort.session(m, level="disable").run(None, f)


def split(rank, fake=lambda w: w, m=None):
    m = m or model()
    g = modelfile.import_graph(m)
    rep = lowrank.split(g, [n for n in g.nodes if n.op in lowrank.OPS], fake_quant=fake, bits=8, rank=rank, progress=False)
    return modelfile.export_graph(g), rep


@pytest.mark.parametrize("rank", [4, 31])   # 31: the largest rank the 32-output Conv takes
def test_unquantized_residual_reproduces_the_layer(rank):
    base = run(model(), feed())
    out, rep = split(rank)
    assert set(rep["layers"]) == {"mm", "gemm", "conv"} and not rep["skipped"]
    for a, b in zip(base, run(out, feed())):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert rep["layers"]["conv"]["rank"] == rank and rep["extra_bytes"] == rank * ((K + N) + (N + M) + (576 + 32)) * 2
    if rank == 31:  # near full rank: the branch holds nearly all the Conv's energy
        assert rep["layers"]["conv"]["energy"] > 0.97


def test_graph_structure():
    out, _ = split(8)
    nodes = {n.name: n for n in out.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    down, up, add = nodes["conv/lowrank_down"], nodes["conv/lowrank_up"], nodes["conv/lowrank_add"]
    assert down.op_type == up.op_type == "Conv" and down.input[0] == "img" and up.input[0] == down.output[0]
    assert inits[down.input[1]].shape == (8, 64, 3, 3) and inits[up.input[1]].shape == (32, 8, 1, 1)
    assert {a.name: helper.get_attribute_value(a) for a in down.attribute} == {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    assert add.output[0] == "c" and nodes["conv"].output[0] in add.input and up.output[0] in add.input
    assert len(nodes["conv"].input) == 3 and nodes["conv"].input[2] == "bc"   # the bias stays on the quantized layer
    assert nodes["mm/lowrank_down"].op_type == "MatMul" and inits[nodes["mm/lowrank_down"].input[1]].shape == (K, 8)
    assert inits[nodes["gemm/lowrank_up"].input[1]].shape == (8, M)
    assert inits[nodes["gemm"].input[1]].shape == (M, N)    # transB layout kept for the residual
    assert all(lowrank.is_branch(n) for n in (down, up, add)) and not lowrank.is_branch(nodes["conv"])


def test_int8_branch_stays_fp16_and_lowers_error(tmp_path):
    """INT8 quantizes the three residuals only: the branch's GEMMs read the unquantized input, have no
    DequantizeLinear weights, and its Add gets no residual Q/DQ. With an outlier input channel, the branch nearly halves
    the output error of INT8 (numbers from ORT)."""
    modelfile.save(model(outlier=60.0), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **{k: np.stack([feed(s)[k] for s in range(4)]) for k in ("x", "img")})
    ref = run(model(outlier=60.0), feed(9))
    errs = {}
    for name, extra in (("plain", {}), ("lr", {"lowrank": 8})):
        res = quantize(tmp_path / "m.onnx", tmp_path / f"{name}.onnx", data=tmp_path / "c.npz",
                       config=QuantConfig(mode="int8", high_precision="fp32", progress=False, **extra))
        m = res.model
        out = run(onnx.load(tmp_path / f"{name}.onnx"), feed(9))
        errs[name] = [float(np.linalg.norm(o - r) / np.linalg.norm(r)) for o, r in zip(out, ref)]
    rep = res.report
    assert sorted(rep["qdq"]["layers"]) == ["conv", "gemm", "mm"]
    assert {why for n, why in rep["qdq"]["skipped"].items()} == {"low-rank branch GEMM stays high precision"}
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if lowrank.is_branch(n):
            assert all(producers.get(i) is None or producers[i].op_type not in ("DequantizeLinear",) for i in n.input), n.name
        elif n.op_type in ("MatMul", "Gemm", "Conv"):
            assert producers[n.input[1]].op_type == "DequantizeLinear" and producers[n.input[0]].op_type == "DequantizeLinear"
    assert errs["lr"][0] < 0.6 * errs["plain"][0] and errs["lr"][1] < errs["plain"][1], errs
    assert rep["lowrank"]["layers"]["mm"]["rank"] == 8


def test_int4_branch_not_quantized():
    res = quantize(model(outlier=60.0), config=QuantConfig(mode="int4", awq="none", block_size=32, lowrank=4, progress=False),
                   calib_random=2, shapes={"x": (2, K), "img": (1, 64, 8, 8)})
    assert set(res.report["lowrank"]["layers"]) == {"mm", "gemm"}    # Int4 takes MatMul/Gemm only
    assert res.report["int4"]["skipped"]["mm/lowrank_down"] == "low-rank branch GEMM stays high precision"
    assert sorted(res.report["int4"]["layers"]) == ["gemm", "mm"]


def test_auto_rank_goes_to_the_outlier_layer_within_budget():
    def int8(w):
        s = np.abs(w).max(axis=0) / 127
        return np.clip(np.rint(w / s), -127, 127) * s
    g = modelfile.import_graph(model(outlier=60.0))
    rep = lowrank.split(g, [n for n in g.nodes if n.op in lowrank.OPS], fake_quant=int8, bits=8, rank=0, budget=0.05,
                        progress=False)
    assert rep["rank"] == "auto" and rep["extra_bytes"] <= 0.05 * rep["quantized_weight_bytes"]
    assert list(rep["layers"]) == ["mm"] and rep["layers"]["mm"]["rank"] == 4   # the one layer with an outlier row
    err = rep["layers"]["mm"]["model_error"]
    assert err[1] < 0.2 * err[0]


@pytest.mark.parametrize("args, msg", [
    (["--lowrank", "1.5"], "--lowrank 1.5: the rank must be a positive integer"),  # 0 and none: the branch off
    (["--lowrank", "-3"], "the rank must be a positive integer"),
    (["--lowrank", "x"], "the rank must be a positive integer, or 'auto'"),
    (["--lowrank", "auto", "--lowrank-budget", "0"], "--lowrank-budget 0.0: give a fraction"),
    (["--lowrank-budget", "0.2"], "--lowrank-budget needs --lowrank auto"),
    (["--lowrank", "4", "--int4"], "--lowrank with --int4 needs --awq none"),
    (["--lowrank", "4", "--auto", "--target-cosine", "0.99", "--auto-stages", "2"],
     "--lowrank with --auto is measured in one gated graph"),
])
def test_bad_options_one_line_before_work(tmp_path, args, msg):
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "missing.onnx"), "--int8" if "--int4" not in args and "--auto" not in args else "--calib-random=2", *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


def test_rank_too_large_for_every_layer(tmp_path):
    modelfile.save(model(), tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "--int8", "--lowrank", "48", "--calib-random", "2",
                                  "--shapes", f"x:2x{K}", "--shapes", "img:1x64x8x8", "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "rank 48 >= min(K, N)" in r.output and not (tmp_path / "o.onnx").exists(), r.output
    with pytest.raises(OnnxoptError, match="positive integer"):
        LowRank(rank=0)
    with pytest.raises(OnnxoptError, match="needs a quantizing pass after it"):
        LowRank(4).check_recipe([LowRank(4)], 0)
    LowRank(4).check_recipe([LowRank(4), QDQ("int8")], 0)


@pytest.mark.rtx
@pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")
def test_rtx_every_quantized_layer_in_a_quantized_kernel(tmp_path):
    modelfile.save(model(outlier=60.0), tmp_path / "m.onnx")
    quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", config=QuantConfig(mode="int8", lowrank=8, progress=False),
             calib_random=2, shapes={"x": (8, K), "img": (2, 64, 8, 8)})
    r = CliRunner().invoke(main, ["build", str(tmp_path / "q.onnx"), "--backend", "rtx", "-o", str(tmp_path / "q.plan"),
                                  "--shapes", f"x:8x{K}", "--shapes", "img:2x64x8x8", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 3
    assert {ly["name"] for ly in rep["layers"]} == {"mm", "gemm", "conv"}
    from onnxopt.inspection import engine_findings
    from onnxopt.trt import report as R
    assert not R.disagreements(engine_findings(modelfile.import_graph(modelfile.load(tmp_path / "q.onnx"))), rep)   # the lint agrees
