"""--auto with low-rank branch candidates ("<format>+lr", autoquant/branch.py): candidates with their costs, the
gated graph equal to the written graph for a mix of branch and plain candidates, and the CLI."""
import json

import numpy as np
import onnx
import pytest
import tiny
from click.testing import CliRunner

from onnxopt import autoquant, modelfile, ort, pipeline
from onnxopt.rewrite import lowrank
from onnxopt.autoquant import branch
from onnxopt.autoquant.candidates import base_format
from onnxopt.cli import main
from onnxopt.compare import evaluation_session
from onnxopt.passes import AutoQuant
from onnxopt.quant import writer

WEIGHTED = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_up", "mlp_down")
RANK = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.transformer_and_ids(tmp_path_factory.mktemp("lr"))


def _setup(path, ids, fmts):
    graph = modelfile.import_graph(pipeline.load(str(path), 23))
    p = AutoQuant(fmts, bits=8, lowrank=RANK)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    branch.add_candidates(graph, cands, rank=RANK, budget=0.1, high_precision="fp32", progress=False)
    feeds = [{"ids": ids[i:i + 1]} for i in range(len(ids))]
    amax, means = autoquant.calibrate(graph, feeds, cands, provider="cpu", memory_budget_mb=512, progress=False)
    return graph, p, cands, amax, means, feeds


def test_branch_candidates_and_their_cost(model):
    path, _, ids = model
    graph, p, cands, *_ = _setup(path, ids, ("fp8", "nvfp4"))
    for n in WEIGHTED:
        l = cands.layers[n]
        # nvfp4 brings its weight-only form, which takes no branch (the branch is for W4A4's and W8A8's residual)
        assert l.formats == ["none", "fp8", "nvfp4", "nvfp4-wo", "fp8+lr", "nvfp4+lr"], (n, l.formats)
        k, nn = l.wshape
        assert list(l.branch) == ["fp8+lr", "nvfp4+lr"]
        assert l.branch["nvfp4+lr"].rank == RANK and l.branch["nvfp4+lr"].params == RANK * (k + nn)
        l.macs = 1000.0
        # the branch's 16-bit factors and MACs are charged on top of the residual's format
        assert l.weight_bits("nvfp4+lr") == pytest.approx(l.weight_bits("nvfp4") + 16 * RANK * (k + nn))
        assert l.branch_macs("fp8+lr") == pytest.approx(1000.0 * RANK * (k + nn) / (k * nn))
        assert l.activation_bits("fp8+lr") == pytest.approx(l.activation_bits("fp8") + 16 * l.branch_macs("fp8+lr"))
    assert all("+lr" not in f for f in cands.layers["attn_qk"].formats)  # attention BMMs: no weight, no branch
    mix = {n: "none" for n in cands.layers}
    mix["mlp_up"] = "nvfp4+lr"
    bits = autoquant.bits_of(mix, cands.layers)
    up = cands.layers["mlp_up"]
    assert bits["branch_layers"] == 1 and bits["branch_bytes"] == 2 * up.branch["nvfp4+lr"].params
    assert bits["branch_macs"] == pytest.approx(up.branch_macs("nvfp4+lr"))


@pytest.mark.parametrize("fmts", [("fp8", "nvfp4"), ("fp8", "int8")])
def test_branch_candidate_gated_equals_written(model, fmts):
    path, _, ids = model
    graph, p, cands, amax, means, feeds = _setup(path, ids, fmts)
    other = fmts[1]
    autoquant.block_awq(graph, feeds, cands, p.formats, high_precision="fp32", provider="cpu", memory_budget_mb=512,
                        progress=False)
    branch.block_awq(graph, feeds, cands, high_precision="fp32", provider="cpu", memory_budget_mb=512, progress=False)
    if other == "nvfp4":  # the residual's own AWQ result (and smoothing, SVDQuant's order), not the whole weight's
        assert ("mlp_up", "nvfp4+lr") in cands.block_clips and ("mlp_up", "nvfp4") in cands.block_clips
        smoothed = [n for (n, c) in cands.block_smooth if c == "nvfp4+lr"]
        assert smoothed, "no branch candidate took a smoothing"
        for n in smoothed:  # its own factors: the SVD of s ⊙ W
            assert cands.layers[n].branch["nvfp4+lr"] is not cands.layers[n].branch["fp8+lr"]
    gated = modelfile.import_graph(pipeline.load(str(path), 23))
    index = autoquant.build_gated(gated, cands, amax, means, "fp32", 128)
    mix = {"q_proj": other + "+lr", "k_proj": other, "v_proj": "fp8+lr", "o_proj": other + "+lr", "mlp_up": "fp8",
           "mlp_down": other + "+lr"}
    gates = np.zeros(len(index), np.float32)
    for key in mix.items():
        gates[index[key]] = 1
    x = ids[:4]
    gsess = ort.session(modelfile.export_graph(gated, opset=23), level="disable")
    want = gsess.run(None, {"ids": x, autoquant.GATES: gates})[0]
    assert branch.split(graph, mix, cands) == 4
    plan = writer.QuantPlan.from_mix({n: base_format(f) for n, f in mix.items()}, configs=p.configs(),
                                     amax=amax, means=means,
                                     clips={n: c for n, f in mix.items() if (c := cands.clip_of(n, f)) is not None},
                                     block_smooth={n: sm for n, f in mix.items() if (sm := cands.smooth_of(n, f)) is not None})
    info = writer.write(graph, plan, high_precision="fp32", block_dtype=np.float32)
    assert [info[n]["format"] for n in mix] == [base_format(f) for f in mix.values()]
    out = modelfile.export_graph(graph, opset=23)
    branch_nodes = [n for n in out.graph.node if lowrank.is_branch(n)]
    assert len(branch_nodes) == 3 * 4  # down, up, add per branch; the branch GEMMs read the unquantized input
    got = evaluation_session(out)[0].run(None, {"ids": x})[0]
    ref = gsess.run(None, {"ids": x, autoquant.GATES: np.zeros_like(gates)})[0]
    err = float(np.abs(got - ref).max())
    assert err > 1e-3  # the mix moves the output...
    np.testing.assert_allclose(want, got, rtol=0, atol=1e-4 * err)  # ...and the gated graph moves it identically
    # the branch lowers the layer's error where it matters: the branch candidate of one layer alone vs plain
    def alone(key):
        g = np.zeros_like(gates)
        g[index[key]] = 1
        return float(np.abs(gsess.run(None, {"ids": ids, autoquant.GATES: g})[0] - gsess.run(
            None, {"ids": ids, autoquant.GATES: np.zeros_like(gates)})[0]).mean())
    assert alone(("mlp_down", other + "+lr")) < alone(("mlp_down", other))


def test_cli_auto_with_lowrank_candidates(model, tmp_path):
    path, calib, ids = model
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--formats", "fp8,nvfp4", "--bits", "5.5",
                                  "--lowrank", str(RANK), "--calib", str(calib), "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    a = json.loads(rep.read_text())["autoquant"]
    lr = a["lowrank"]
    assert lr["rank"] == RANK and lr["candidate_layers"] == len(WEIGHTED)
    for n in WEIGHTED:
        assert {"fp8+lr", "nvfp4+lr"} <= set(a["layers"][n]["candidates"])
        assert a["layers"][n]["branch"]["rank"] == RANK and "nvfp4+lr" in a["layers"][n]["sensitivity"]
    chosen = {n: a["layers"][n]["choice"] for n in WEIGHTED}
    with_branch = [n for n, f in chosen.items() if f.endswith("+lr")]
    assert sorted(lr["chosen"]) == sorted(with_branch) and a["branch_layers"] == len(with_branch)
    assert a["branch_bytes"] == lr["bytes"] == sum(a["layers"][n]["branch"]["bytes"] for n in with_branch)
    assert a["weight_bits"] <= 5.5 + 1e-6  # the branch's bytes count in the budget
    m = onnx.load(str(out))
    assert sum(lowrank.is_branch(n) for n in m.graph.node) == 3 * len(with_branch)
    assert "low-rank branch on" in r.output


def test_cli_lowrank_auto_refusals(model, tmp_path):
    path, calib, _ = model
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--bits", "8", "--lowrank", "1.5", "--calib", str(calib),
                                  "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "--lowrank 1.5" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--bits", "8", "--lowrank-budget", "0.2",
                                  "--calib", str(calib), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "--lowrank-budget needs --lowrank auto" in r.output


def test_psnr_of_worst_needs_target_psnr(model, tmp_path):
    path, calib, _ = model
    r = CliRunner().invoke(main, ["quantize", str(path), "--auto", "--target-cosine", "0.99", "--psnr-of", "worst",
                                  "--calib", str(calib), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "--psnr-of judges --target-psnr's held-out seeds" in r.output, r.output


def _resnet(path, c=64):
    """conv0 -> relu -> conv1 (3x3) -> Add(conv1, conv0) -> relu -> conv2 (3x3): a residual block."""
    return tiny.residual_block(path, c, kernels=(1, 3, 3), size=6)


def test_conv_branch_gated_equals_written(tmp_path):
    """A 3x3 Conv with fp8+lr (the branch a Conv pair, bias correction on the residual's error) beside plain FP8
    layers; the Convs feeding the residual Add take no branch (split, the rules would place that Add's Q/DQ
    differently), with the reason."""
    path = tmp_path / "res.onnx"
    feeds = _resnet(path)
    graph = modelfile.import_graph(pipeline.load(str(path), 21))
    p = AutoQuant(("fp8",), bits=8, lowrank=RANK)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    why = branch.add_candidates(graph, cands, rank=RANK, budget=0.1, high_precision="fp32", progress=False)
    assert cands.layers["conv2"].formats == ["none", "fp8", "fp8+lr"]
    for n in ("conv0", "conv1"):
        assert cands.layers[n].formats == ["none", "fp8"] and "residual Add" in why[n]
    amax, means = autoquant.calibrate(graph, feeds, cands, provider="cpu", memory_budget_mb=512, progress=False)
    gated = modelfile.import_graph(pipeline.load(str(path), 21))
    index = autoquant.build_gated(gated, cands, amax, means, "fp32", 128)
    x = np.concatenate([f["x"] for f in feeds])
    gsess = ort.session(modelfile.export_graph(gated, opset=21), level="disable")
    ref = gsess.run(None, {"x": x, autoquant.GATES: np.zeros(len(index), np.float32)})[0]
    for mix in ({"conv0": "fp8", "conv1": "fp8", "conv2": "fp8+lr"}, {"conv1": "fp8", "conv2": "fp8+lr"}):
        gates = np.zeros(len(index), np.float32)
        for key in mix.items():
            gates[index[key]] = 1
        want = gsess.run(None, {"x": x, autoquant.GATES: gates})[0]
        g = modelfile.import_graph(pipeline.load(str(path), 21))
        branch.split(g, mix, cands)
        writer.write(g, writer.QuantPlan.from_mix({n: base_format(f) for n, f in mix.items()}, configs=p.configs(),
                                                  amax=amax, means=means), high_precision="fp32")
        got = ort.session(modelfile.export_graph(g, opset=21), level="disable").run(None, {"x": x})[0]
        err = np.abs(got - ref).max()
        assert err > 1e-3
        np.testing.assert_allclose(want, got, rtol=0, atol=1e-3 * err)
