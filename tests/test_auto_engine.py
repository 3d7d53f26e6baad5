"""--auto with tied layers (autoquant.groups) and the TensorRT-RTX engine report as cost model (--cost-model rtx).

Tied groups: on tiny transformers, an attention block's two BMMs always share a format whatever the errors say,
and the target is still met. Engine cost model (marker `rtx`, real CPU builds): a MiniLM-shaped block (12 heads
of 32, 31 tokens) whose FP8 attention does not fuse and whose INT4 projection after the attention runs as an FP16
GEMM; the rounds drop those formats and the saved graph's engine runs every quantized layer in its kernel."""
from __future__ import annotations

import json
import math

import numpy as np
from onnx import helper as onnx_helper
import pytest
from click.testing import CliRunner

import tiny
from onnxopt import autoquant, modelfile, pipeline
from onnxopt.autoquant import engine as aq_engine
from onnxopt.autoquant import groups
from onnxopt.autoquant.choose import collapse
from onnxopt.autoquant.candidates import Layer
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.passes import AutoQuant
from onnxopt.trt import rtx_available
from onnxopt.trt import report as R
from onnxopt.trt.build import BuildConfig

needs_rtx = [pytest.mark.rtx, pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")]


def rtx_test(fn):
    for m in needs_rtx:
        fn = m(fn)
    return fn


def _layers(errors: dict, params: dict, group: dict) -> dict:
    out = {}
    for n, err in errors.items():
        out[n] = Layer(n, "MatMul", ["none", *err], {}, params[n], macs=1e6, error={"none": 0.0, **err}, group=group.get(n, ""))
    return out


# ---------------------------------------------------------------- tied groups in the choice
def test_attention_bmms_tied_in_tiny_transformer():
    graph = modelfile.import_graph(pipeline.load(tiny.transformer(), 17))
    p = AutoQuant(("fp8", "int8"), bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    found = groups.tie(graph, cands.layers)
    assert list(found) == ["attention:attn_softmax"]
    assert found["attention:attn_softmax"]["members"] == ["o_proj", "attn_qk", "attn_pv"]
    assert found["attention:attn_softmax"]["follow"] == ["attn_qk", "attn_pv"]   # the reader decides the block
    assert cands.layers["attn_qk"].group == cands.layers["attn_pv"].group == cands.layers["o_proj"].group == "attention:attn_softmax"
    assert cands.layers["attn_qk"].follows and not cands.layers["o_proj"].follows
    assert all(not l.group for n, l in cands.layers.items() if n not in ("attn_qk", "attn_pv", "o_proj"))


def test_tied_layers_share_a_format_and_budget_holds():
    # alone, qk would take int8 and pv fp8; tied, the group takes the format of least summed error (fp8: 3e-4)
    errors = {"a": {"fp8": 1e-4, "int8": 2e-4}, "qk": {"fp8": 2e-4, "int8": 1e-4}, "pv": {"fp8": 1e-4, "int8": 5e-4},
              "b": {"fp8": 3e-4, "int8": 1e-4}}
    params = {"a": 1000, "qk": 0, "pv": 0, "b": 1000}
    layers = _layers(errors, params, {"qk": "att", "pv": "att"})
    for budget in (1e-3, 5e-4, 3e-4, 1e-4, 0.0):
        mix = autoquant.mix_for_error(layers, budget)
        assert mix["qk"] == mix["pv"]
        assert sum(layers[n].error[f] for n, f in mix.items()) <= budget + 1e-12
    mix = autoquant.mix_for_error(layers, 1e-3)
    assert mix["qk"] == mix["pv"] == "fp8" and mix["a"] != "none" and mix["b"] != "none"
    untied = autoquant.mix_for_error(_layers(errors, params, {}), 1e-3)
    assert (untied["qk"], untied["pv"]) == ("int8", "fp8")   # what the tie prevents
    # a format one member lacks is no candidate of the group
    layers["pv"].formats.remove("fp8")
    mix = autoquant.mix_for_error(layers, 1e-3)
    assert mix["qk"] == mix["pv"] == "int8"
    units, members = collapse(layers)
    assert units["att"].formats == ["none", "int8"] and members["att"] == ["qk", "pv"]
    assert math.isclose(units["att"].error["int8"], 6e-4)


def test_tied_bits_target():
    errors = {n: {"fp8": 1e-4 * (i + 1), "int8": 2e-4, "int4": 1e-2} for i, n in enumerate(("a", "b", "c"))}
    layers = _layers(errors, {"a": 1000, "b": 1000, "c": 2000}, {"a": "g", "b": "g"})
    for bits in (4, 6, 8, 12):
        mix = autoquant.mix_for_bits(layers, bits)
        assert mix["a"] == mix["b"]
        assert autoquant.bits_of(mix, layers)["weight_bits"] <= bits + 1e-9


def test_tied_search_meets_target(tmp_path):
    """End to end on a tiny transformer: the BMMs share a format in the saved graph and the target is met."""
    model, calib = tmp_path / "t.onnx", tmp_path / "c.npz"
    tiny.save(tiny.transformer(d=64, heads=2, seq=16), model)
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 50, (16, 16)).astype(np.int64))
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--target-cosine", "0.999", "--calib", str(calib),
                                  "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "r.json").read_text())["autoquant"]
    assert a["met"] is True and a["verified"]["cosine"] >= 0.999
    assert a["layers"]["attn_qk"]["choice"] == a["layers"]["attn_pv"]["choice"]
    assert a["layers"]["attn_qk"]["group"] == "attention:attn_softmax" and "both BMMs" in a["groups"]["attention:attn_softmax"]["reason"]
    assert a["layers"]["attn_qk"]["choice"] in ("none", a["layers"]["o_proj"]["choice"])   # the BMMs follow o_proj
    assert a["cost_model"] == {"name": "bits", "rounds": []}
    q = {l.name: l for l in R.quantized_layers(modelfile.import_graph(modelfile.load(tmp_path / "q.onnx")))}
    assert ("attn_qk" in q) == ("attn_pv" in q) and (not q.get("attn_qk") or q["attn_qk"].dtype == q["attn_pv"].dtype)


# ---------------------------------------------------------------- bad input
def test_cost_model_rtx_without_the_module(monkeypatch, tmp_path):
    import onnxopt.trt as trt
    monkeypatch.setattr(trt, "rtx_available", lambda: False)
    model, calib = tmp_path / "t.onnx", tmp_path / "c.npz"
    tiny.save(tiny.transformer(), model)
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--bits", "8", "--cost-model", "rtx",
                                  "--calib", str(calib), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "rtx extra" in r.output and "Traceback" not in r.output
    assert not calib.exists() and not (tmp_path / "q.onnx").exists()   # checked before any work (the calib file is not even read)
    with pytest.raises(OnnxoptError, match="--cost-model tflops"):
        AutoQuant(bits=8, cost_model="tflops")
    r = CliRunner().invoke(main, ["quantize", str(model), "--fp8", "--cost-model", "bits", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and "--cost-model applies to --auto only" in r.output


# ---------------------------------------------------------------- engine report as cost model (real builds)
@pytest.fixture(scope="module")
def minilm_shaped(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto_engine")
    model, calib = d / "t31.onnx", d / "c.npz"
    tiny.save(tiny.transformer(d=384, heads=12, seq=31), model)
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 50, (16, 31)).astype(np.int64))
    return model, calib


def _auto(tmp_path, model, calib, *args, profile=((1, 31),) * 3):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", *args, "--cost-model", "rtx", "--calib", str(calib),
                                  "-o", str(out), "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    engine = R.engine_report_of(out, BuildConfig(profiles={"ids": profile}))
    return json.loads(rep.read_text())["autoquant"], engine


@rtx_test
def test_rtx_rounds_drop_unfused_fp8_attention(minilm_shaped, tmp_path):
    a, engine = _auto(tmp_path, *minilm_shaped, "--formats", "fp8", "--target-cosine", "0.99")
    rounds = [r for r in a["cost_model"]["rounds"] if isinstance(r["round"], int)]   # after the attention probes
    assert len(rounds) >= 2 and rounds[0]["fused_attention"] == {}   # FP8 attention at 31 tokens does not fuse
    assert {(x["layer"], x["format"]) for x in rounds[0]["no_savings"]} == {("attn_qk", "fp8"), ("attn_pv", "fp8")}
    assert rounds[-1]["no_savings"] == [] and a["met"] is True
    assert "did not fuse" in a["layers"]["attn_qk"]["not_candidates"]["fp8"]
    assert engine["quantized_in_quantized_kernels"] == engine["quantized_layers"] == rounds[-1]["quantized_layers"] > 0
    assert not engine["attention"]["quantized_unfused"] and engine["attention"]["fused_by_precision"] == {"fp16": 1}


@rtx_test
def test_rtx_probe_tries_each_attention_format(minilm_shaped, tmp_path):
    """FP8 and INT8 candidates for the attention block at 31 tokens: whichever the choice takes, the other format
    is probed in its own build first; FP8 (unfused at 31) leaves the BMMs' candidates, INT8 (fused) stays."""
    a, engine = _auto(tmp_path, *minilm_shaped, "--formats", "fp8,int8", "--target-cosine", "0.99")
    rows = a["cost_model"]["rounds"]
    probes = [r for r in rows if "probe" in r]
    assert len(probes) == 1 and probes[0]["round"] == f"probe {probes[0]['probe']}" and probes[0]["probed_blocks"] == 1
    dropped = {(x["layer"], x["format"]) for r in rows for x in r["no_savings"]}
    assert dropped == {("attn_qk", "fp8"), ("attn_pv", "fp8")}        # INT8 fused at 31 tokens, FP8 did not
    assert probes[0]["fused_attention"] == ({"int8": 1} if probes[0]["probe"] == "int8" else {})
    assert rows[-1]["no_savings"] == [] and a["met"] is True and len(rows) <= 3
    assert a["layers"]["attn_qk"]["choice"] in ("int8", "none") and "did not fuse" in a["layers"]["attn_pv"]["not_candidates"]["fp8"]
    assert engine["quantized_in_quantized_kernels"] == engine["quantized_layers"] and not engine["attention"]["quantized_unfused"]


@rtx_test
def test_int8_attention_fuses_only_into_an_int8_reader(monkeypatch, tmp_path):
    """Tiny transformer, 12 heads x 64 tokens, real builds through the engine Writer: INT8 attention before an FP8
    o_proj does not fuse (FP8 attention does); the INT8 probe of an all-FP8 mix sets the whole block (o_proj and
    both BMMs) INT8, which fuses, so INT8 stays a candidate of the BMMs."""
    model, calib = tmp_path / "t64.onnx", tmp_path / "c.npz"
    tiny.save(tiny.transformer(d=384, heads=12, seq=64), model)
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 50, (8, 64)).astype(np.int64))
    seen = {}

    def refine(mix, choose, writer, layers, verify, max_rounds=3):
        fp8 = {n: ("fp8" if "fp8" in layers[n].formats else "none") for n in mix}
        seen["int8_before_fp8"] = writer.engine_report({**{n: "int8" if f == "fp8" else f for n, f in fp8.items()}, "o_proj": "fp8"})
        seen["fp8_before_int8"] = writer.engine_report({**fp8, "o_proj": "int8"})
        seen["probes"] = aq_engine.probe(fp8, writer, layers)
        return mix, []
    monkeypatch.setattr(aq_engine, "refine", refine)
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--bits", "8", "--cost-model", "rtx", "--calib", str(calib),
                                  "-o", str(tmp_path / "q.onnx"), "-q"])
    assert r.exit_code == 0, r.output
    bad, good = seen["int8_before_fp8"]["attention"], seen["fp8_before_int8"]["attention"]
    assert bad["fused_by_precision"] == {} and bad["quantized_unfused"] == ["attn_softmax"]
    assert seen["int8_before_fp8"]["quantized_in_quantized_kernels"] == seen["int8_before_fp8"]["quantized_layers"] == 8
    assert good["fused_by_precision"] == {"fp8": 1}
    (p,) = seen["probes"]   # the mix is all FP8: only INT8 is probed
    # the probe sets the block through its reader: o_proj and both BMMs INT8, and the block fuses as INT8
    assert p["probe"] == "int8" and p["counts"]["int8"] == 3 and p["fused_attention"] == {"int8": 1}
    assert p["no_savings"] == [] and p["quantized_in_quantized_kernels"] == p["quantized_layers"] == 8


@rtx_test
@pytest.mark.slow
def test_rtx_rounds_drop_int4_after_attention(minilm_shaped, tmp_path):
    """INT4 at 4 bits: the projection after the fused attention runs as an FP16 GEMM with a batch-1 profile."""
    sens = minilm_shaped[0].parent / "int4.json"   # shared with the --engine-shapes test
    a, engine = _auto(tmp_path, *minilm_shaped, "--formats", "int8,int4", "--bits", "4", "--sensitivity", str(sens))
    rounds = [r for r in a["cost_model"]["rounds"] if isinstance(r["round"], int)]   # after the attention probes
    assert [(x["layer"], x["format"]) for x in rounds[0]["no_savings"]] == [("o_proj", "int4")]
    assert rounds[0]["quantized_in_quantized_kernels"] == rounds[0]["quantized_layers"] - 1
    assert rounds[-1]["no_savings"] == [] and rounds[-1]["quantized_in_quantized_kernels"] == rounds[-1]["quantized_layers"]
    assert a["layers"]["o_proj"]["choice"] != "int4" and "fp16 kernel" in a["layers"]["o_proj"]["not_candidates"]["int4"]
    assert a["layers"]["o_proj"]["engine_no_savings"] == {"int4": "TensorRT-RTX ran it in fp16 kernel"}
    assert a["counts"]["int4"] == 5 and a["layers"]["attn_qk"]["choice"] == a["layers"]["attn_pv"]["choice"]
    assert engine["quantized_in_quantized_kernels"] == engine["quantized_layers"] == rounds[-1]["quantized_layers"]
    assert not engine["int4_dq_kernels"] and not engine["attention"]["quantized_unfused"]


@rtx_test
@pytest.mark.slow
def test_rtx_engine_shapes_change_the_fallbacks(minilm_shaped, tmp_path):
    """The same INT4 mix with a batch 1..2 deployment profile: the builder runs o_proj in its INT4 kernel, so round 0
    drops nothing; the saved graph built with the static batch-1 profile still runs o_proj unquantized."""
    sens = minilm_shaped[0].parent / "int4.json"
    dyn = ((1, 31), (2, 31), (2, 31))
    a, engine = _auto(tmp_path, *minilm_shaped, "--formats", "int8,int4", "--bits", "4", "--sensitivity", str(sens),
                      "--engine-shapes", "ids:1x31/2x31/2x31", profile=dyn)
    rounds = [r for r in a["cost_model"]["rounds"] if isinstance(r["round"], int)]   # after the attention probes
    assert a["cost_model"]["engine_shapes"] == {"ids": [[1, 31], [2, 31], [2, 31]]}
    assert len(rounds) == 1 and rounds[0]["no_savings"] == []
    assert a["layers"]["o_proj"]["choice"] == "int4" and "int4" in a["layers"]["o_proj"]["candidates"]
    assert engine["quantized_in_quantized_kernels"] == engine["quantized_layers"] == rounds[0]["quantized_layers"]
    static = R.engine_report_of(tmp_path / "q.onnx", BuildConfig(profiles={"ids": ((1, 31),) * 3}))
    assert [r["name"] for r in static["layers"] if not r["quantized_kernel"]] == ["o_proj"]


# ---------------------------------------------------------------- --engine-shapes
def test_engine_shapes_bad_input(monkeypatch, tmp_path):
    import onnxopt.trt as trt
    monkeypatch.setattr(trt, "rtx_available", lambda: True)   # every error below comes before any build
    model, calib = tmp_path / "t.onnx", tmp_path / "c.npz"
    tiny.save(tiny.transformer(seq=16), model)
    np.savez(calib, ids=np.zeros((4, 16), np.int64))
    cases = {("--engine-shapes", "tokens:1x16"): "the graph has no input tokens; its inputs are ids",
             ("--engine-shapes", "ids:1x16x1"): "3 dimensions given, the input has 2",
             ("--engine-shapes", "ids:1x8/2x8/2x8"): "dimension 1 of the input is fixed at 16",
             ("--engine-shapes", "ids:2x16/1x16/2x16"): "need min <= opt <= max",
             ("--engine-shapes", "ids=1x16"): "bad --engine-shapes entry 'ids=1x16'"}
    for args, msg in cases.items():
        out, sens = tmp_path / "q.onnx", tmp_path / "s.json"
        r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--bits", "8", "--cost-model", "rtx", *args,
                                      "--calib", str(calib), "--sensitivity", str(sens), "-o", str(out)])
        assert r.exit_code == 2 and r.output.count("error:") == 1 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output and not out.exists() and not sens.exists()  # nothing measured
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--bits", "8", "--engine-shapes", "ids:1x16",
                                  "--calib", str(calib), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and "add --cost-model rtx" in r.output
    r = CliRunner().invoke(main, ["quantize", str(model), "--fp8", "--engine-shapes", "ids:1x16", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and "--engine-shapes applies to --auto only" in r.output
    two = tiny.transformer(seq=16)
    two.graph.input.append(onnx_helper.make_tensor_value_info("mask", 7, ["N", 16]))
    graph = modelfile.import_graph(two)
    with pytest.raises(OnnxoptError, match="not the dynamic input.s. mask"):
        aq_engine.check_shapes(graph, {"ids": ((1, 16),) * 3})
    aq_engine.check_shapes(graph, {"ids": ((1, 16),) * 3, "mask": ((1, 16), (2, 16), (2, 16))})
    assert AutoQuant(bits=8, cost_model="rtx", engine_shapes={"ids": [[1, 16], [2, 16], [2, 16]]}).engine_shapes == \
        AutoQuant(bits=8, cost_model="rtx", engine_shapes=("ids:1x16/2x16/2x16",)).engine_shapes == {"ids": ((1, 16), (2, 16), (2, 16))}
