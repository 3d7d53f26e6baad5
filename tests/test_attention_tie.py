"""--auto never quantizes part of an attention block: the block's reader (its output projection) decides and the
two BMMs follow it (autoquant/groups.py rule_attention_block; quant/rules.py `_plan_attention_reader`). The
defect it fixes: the terrain UNet's `--auto` mix kept two proj_out convs FP16 behind FP8 attention, and
TensorRT-RTX left exactly those two blocks quantized and unfused."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from onnxopt import autoquant, modelfile, pipeline
from onnxopt.autoquant import groups
from onnxopt.autoquant.candidates import base_format
from onnxopt.autoquant.choose import collapse
from onnxopt.cli import main
from onnxopt.passes import AutoQuant
from onnxopt.trt import rtx_available
from onnxopt.trt import report as R
from onnxopt.trt.build import BuildConfig

BMMS = ("attn_qk", "attn_pv")


def _cands(fmts):
    graph = modelfile.import_graph(pipeline.load(tiny.transformer(d=64, heads=2), 17))
    p = AutoQuant(fmts, bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    groups.tie(graph, cands.layers)
    return cands.layers


def _whole(mix: dict) -> bool:
    """The block is all FP16 or quantized as one: both BMMs in the format of the output projection."""
    qk, pv, o = mix["attn_qk"], mix["attn_pv"], mix["o_proj"]
    return qk == pv and (qk == "none" or qk == base_format(o))


@pytest.mark.parametrize("fmts", [("fp8",), ("fp8", "int8"), ("fp8", "nvfp4")])
def test_no_mix_quantizes_part_of_an_attention_block(fmts):
    """Every mix the choice can make, over budgets and bit targets and with the errors that made the terrain mix
    (BMMs nearly free, the output projection the most sensitive layer): the block is whole."""
    layers = _cands(fmts)
    assert layers["o_proj"].group == layers["attn_qk"].group == layers["attn_pv"].group != ""
    rng = np.random.default_rng(0)
    for n, l in layers.items():
        l.error = {f: (0.0 if f == "none" else float(rng.uniform(1e-5, 1e-3))) for f in l.formats}
    for b in BMMS:
        layers[b].error = {f: (0.0 if f == "none" else 1e-8) for f in layers[b].formats}
    layers["o_proj"].error = {f: (0.0 if f == "none" else 5e-2 if f == "fp8" else 8e-2) for f in layers["o_proj"].formats}
    seen = set()
    for budget in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 6e-2, 1.0):
        mix = autoquant.mix_for_error(layers, budget)
        assert _whole(mix), (budget, {k: mix[k] for k in ("attn_qk", "attn_pv", "o_proj")})
        assert sum(layers[n].error[f] for n, f in mix.items()) <= budget + 1e-12
        seen.add((mix["attn_qk"], mix["o_proj"]))
    for bits in (4.5, 6, 8, 12, 16):
        mix = autoquant.mix_for_bits(layers, bits)
        assert _whole(mix), (bits, {k: mix[k] for k in ("attn_qk", "attn_pv", "o_proj")})
    assert ("none", "none") in seen and ("fp8", "fp8") in seen, seen   # both ends were chosen: the test is not vacuous
    if "nvfp4" in fmts:   # the reader keeps its own formats; the BMMs (no NVFP4 kernel) then stay FP16
        layers["o_proj"].error["nvfp4"] = 1e-9
        mix = autoquant.mix_for_bits(layers, 4.5)
        assert mix["o_proj"] == "nvfp4" and mix["attn_qk"] == mix["attn_pv"] == "none"


def test_unit_error_and_cost_count_each_member_at_its_own_format():
    layers = _cands(("fp8", "nvfp4"))
    for n, l in layers.items():
        l.error = {f: 0.0 if f == "none" else 1e-4 for f in l.formats}
    units, members = collapse(layers)
    u = units[layers["o_proj"].group]
    assert sorted(members[u.name]) == sorted(["o_proj", *BMMS])
    assert u.formats == layers["o_proj"].formats   # the reader's formats, NVFP4 included
    assert u.error["fp8"] == pytest.approx(3e-4) and u.error["nvfp4"] == pytest.approx(1e-4)  # BMMs at FP16 under NVFP4
    o = layers["o_proj"]
    assert u.weight_bits("nvfp4") == pytest.approx(o.weight_bits("nvfp4"))
    assert u.activation_bits("nvfp4") == pytest.approx(o.activation_bits("nvfp4") + sum(layers[b].activation_bits("none") for b in BMMS))
    assert u.activation_bits("fp8") == pytest.approx(sum(layers[n].activation_bits("fp8") for n in ("o_proj", *BMMS)))


def test_written_auto_graph_has_no_half_quantized_attention(tmp_path):
    """End to end: the output projection kept out of --auto (no candidate), so the BMMs must stay FP16 too
    (before the tie, --auto wrote FP8 BMMs and softmax Q/DQ in front of an FP16 o_proj)."""
    model, calib = tiny.transformer_and_ids(tmp_path)[:2]
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--formats", "fp8,int8", "--target-cosine", "0.99",
                                  "--exclude", "^o_proj$", "--calib", str(calib), "-o", str(out), "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    a = json.loads(rep.read_text())["autoquant"]
    assert a["layers"]["o_proj"]["candidates"] == ["none"]
    q = {l.name: l for l in R.quantized_layers(modelfile.import_graph(modelfile.load(out)))}
    assert q, "something is quantized"
    assert not set(BMMS) & set(q)
    g = modelfile.import_graph(modelfile.load(out))
    sm = next(n for n in g.nodes if n.op == "Softmax")
    assert not any(c.op == "QuantizeLinear" for c in sm.outputs[0].outputs)   # no softmax output Q/DQ
    # and with o_proj free to choose, the written block is whole
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--formats", "fp8,int8", "--target-cosine", "0.99",
                                  "--calib", str(calib), "-o", str(out), "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    q = {l.name: l for l in R.quantized_layers(modelfile.import_graph(modelfile.load(out)))}
    assert ("attn_qk" in q) == ("attn_pv" in q)
    if "attn_qk" in q:
        assert "o_proj" in q and q["attn_qk"].dtype == q["attn_pv"].dtype == q["o_proj"].dtype


@pytest.mark.rtx
@pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")
def test_auto_with_fp16_reader_builds_no_quantized_unfused_attention(tmp_path):
    """TensorRT-RTX: the --auto graph whose output projection cannot be quantized has no quantized attention block
    left unfused (its attention fuses in FP16)."""
    model = tiny.save(tiny.transformer(d=256, heads=4, seq=64), tmp_path / "t.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 50, (16, 64)).astype(np.int64))
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--formats", "fp8", "--target-cosine", "0.99",
                                  "--exclude", "^o_proj$", "--calib", str(calib), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rep = R.engine_report_of(out, BuildConfig(profiles={"ids": ((1, 64),) * 3}))
    a = rep["attention"]
    assert a["blocks"] == 1 and a["quantized_unfused"] == [] and a["unfused"] == []
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] > 0
