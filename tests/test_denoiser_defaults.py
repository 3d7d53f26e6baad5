"""Denoiser-aware FP8 defaults (onnxopt.denoiser): a diffusion denoiser is recognised from its graph and `quantize
--fp8 --calib` defaults to error-feedback rounding and the low-rank branch there; explicit options turn each off;
other graphs, presets, other modes and random calibration keep today's plan."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import denoiser
from onnxopt.cli import main

import tiny


def run(*args):
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    return r.exit_code, r.output


def _io(inputs, outputs) -> onnx.ModelProto:
    g = h.make_graph([], "io", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                     [h.make_tensor_value_info(n, t, s) for n, t, s in outputs])
    return h.make_model(g)


def test_detect_sdxl_terrain_and_not_others():
    sdxl = _io([("sample", T.FLOAT, ["B", 4, 128, 128]), ("timestep", T.FLOAT, ["B"]),
                ("encoder_hidden_states", T.FLOAT, ["B", 77, 2048]), ("text_embeds", T.FLOAT, ["B", 1280]),
                ("time_ids", T.FLOAT, ["B", 6])], [("out_sample", T.FLOAT, ["B", 4, 128, 128])])
    assert denoiser.detect(sdxl) == denoiser.Recognised("sample", "timestep", "out_sample")
    terrain = _io([("noisy", T.FLOAT, ["batch", 1, 128, 128]), ("sigma", T.FLOAT, ["batch"]),
                   ("difficulty", T.FLOAT, ["batch"])], [("denoised", T.FLOAT, ["batch", 1, 128, 128])])
    assert denoiser.detect(terrain) == denoiser.Recognised("noisy", "sigma", "denoised")
    minilm = _io([("input_ids", T.INT64, ["B", "S"]), ("attention_mask", T.INT64, ["B", "S"])],
                 [("last_hidden_state", T.FLOAT, ["B", "S", 384])])
    cnn = _io([("images", T.FLOAT, ["B", 3, 224, 224])], [("logits", T.FLOAT, ["B", 1000])])
    # an image-to-image net without a noise level, and one whose output has other channels, are not denoisers
    seg = _io([("x", T.FLOAT, ["B", 3, 64, 64])], [("y", T.FLOAT, ["B", 3, 64, 64])])
    wrong_c = _io([("sample", T.FLOAT, ["B", 4, 64, 64]), ("timestep", T.FLOAT, ["B"])], [("y", T.FLOAT, ["B", 8, 64, 64])])
    assert [denoiser.detect(m) for m in (minilm, cnn, seg, wrong_c, tiny.cnn(), tiny.transformer())] == [None] * 6


def _denoiser_model() -> onnx.ModelProto:
    """sample [N,8,16,16], timestep [N] -> conv -> SiLU(+ t) -> conv 32->48 -> SiLU -> conv -> out [N,8,16,16]:
    a tiny epsilon predictor whose middle conv FP8 quantizes (the outer ones are too narrow for an FP8 kernel)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((32, 8, 3, 3)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((48, 32, 3, 3)) / 17).astype(np.float32)
    w3 = (rng.standard_normal((8, 48, 3, 3)) / 20).astype(np.float32)
    nodes = [h.make_node("Conv", ["sample", "w1"], ["c1"], name="conv_in", pads=[1, 1, 1, 1]),
             h.make_node("Reshape", ["timestep", "tshape"], ["t4"], name="t_reshape"),
             h.make_node("Add", ["c1", "t4"], ["a"], name="t_add"),
             h.make_node("Sigmoid", ["a"], ["sg"], name="sig"), h.make_node("Mul", ["a", "sg"], ["s"], name="silu"),
             h.make_node("Conv", ["s", "w2"], ["c2"], name="conv_mid", pads=[1, 1, 1, 1]),
             h.make_node("Sigmoid", ["c2"], ["sg2"], name="sig2"), h.make_node("Mul", ["c2", "sg2"], ["s2"], name="silu2"),
             h.make_node("Conv", ["s2", "w3"], ["out_sample"], name="conv_out", pads=[1, 1, 1, 1])]
    g = h.make_graph(nodes, "den", [h.make_tensor_value_info("sample", T.FLOAT, ["N", 8, 16, 16]),
                                    h.make_tensor_value_info("timestep", T.FLOAT, ["N"])],
                     [h.make_tensor_value_info("out_sample", T.FLOAT, ["N", 8, 16, 16])],
                     [nh.from_array(w1, "w1"), nh.from_array(w2, "w2"), nh.from_array(w3, "w3"),
                      nh.from_array(np.array([-1, 1, 1, 1], np.int64), "tshape")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def den(tmp_path_factory):
    d = tmp_path_factory.mktemp("den")
    onnx.save(_denoiser_model(), d / "den.onnx")
    rng = np.random.default_rng(1)
    np.savez(d / "calib.npz", sample=(rng.standard_normal((16, 1, 8, 16, 16)) * 3).astype(np.float32),
             timestep=rng.uniform(0, 2, (16, 1)).astype(np.float32))
    return d


def _quantize(d, name, *flags):
    code, out = run("quantize", d / "den.onnx", "--calib", d / "calib.npz", "-o", d / f"{name}.onnx",
                    "--report", d / f"{name}.json", *flags)
    assert code == 0, out
    return json.loads((d / f"{name}.json").read_text()), onnx.load(str(d / f"{name}.onnx"))


def test_fp8_on_a_denoiser_defaults_to_the_recipe_and_says_so(den):
    rep, m = _quantize(den, "dflt", "--fp8")
    d = rep["denoiser"]
    assert (d["recognised"], d["sample"], d["level"], d["output"]) == (True, "sample", "timestep", "out_sample")
    assert d["defaults_on"] == {"weight_rounding": "feedback", "lowrank": "auto"}
    assert d["turn_off"] == {"weight_rounding": "--weight-rounding nearest", "lowrank": "--lowrank none"}
    assert rep["qdq"]["error_feedback"]["layers"]            # rounded with feedback
    assert "lowrank" in rep                                    # the branch pass ran (auto ranks: 0 on random weights)
    assert not rep.get("smoothquant")                          # not part of the recipe (measured to lose 4 dB)


def test_explicit_options_turn_each_default_off(den):
    rep, _ = _quantize(den, "nofb", "--fp8", "--weight-rounding", "nearest")
    assert "error_feedback" not in rep["qdq"] and rep["denoiser"]["defaults_on"] == {"lowrank": "auto"}
    rep, _ = _quantize(den, "nolr", "--fp8", "--lowrank", "0")
    assert rep["denoiser"]["defaults_on"] == {"weight_rounding": "feedback"} and "lowrank" not in rep
    rep, _ = _quantize(den, "sq", "--fp8", "--smoothquant", "0.5")   # an option outside the recipe adds to it
    assert rep["denoiser"]["defaults_on"] == {"weight_rounding": "feedback", "lowrank": "auto"} and rep["smoothquant"]["groups"]
    rep, m = _quantize(den, "off", "--fp8", "--lowrank", "none", "--weight-rounding", "nearest", "--smoothquant", "none")
    assert rep["denoiser"]["not_applied"] == "every recipe option was given explicitly"
    assert "error_feedback" not in rep["qdq"] and "lowrank" not in rep and not rep.get("smoothquant")
    assert [n.op_type for n in m.graph.node].count("Mul") == 2  # only the SiLUs': no SmoothQuant Mul
    plain, _ = _quantize(den, "int8", "--int8")
    assert plain["denoiser"]["defaults_on"] == {} and "no denoiser recipe" in plain["denoiser"]["not_applied"]


def test_random_calibration_and_summary_line(den):
    r = CliRunner().invoke(main, ["quantize", str(den / "den.onnx"), "--fp8", "--calib-random", "4", "--shapes",
                                  "sample:2x8x16x16", "--shapes", "timestep:2", "-o", str(den / "r.onnx")])
    assert r.exit_code == 0, r.output
    assert ("recognised a diffusion denoiser (sample, timestep -> out_sample); denoiser defaults not applied: "
            "no calibration data") in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["quantize", str(den / "den.onnx"), "--fp8", "--calib", str(den / "calib.npz"),
                                  "-o", str(den / "s.onnx")])
    assert r.exit_code == 0, r.output
    assert ("recognised a diffusion denoiser (sample, timestep -> out_sample): denoiser defaults on: error-feedback "
            "weight rounding (off: --weight-rounding nearest), low-rank branch (auto ranks) (off: --lowrank none)"
            ) in " ".join(r.output.split())


def test_preset_keeps_its_recipe(den):
    from onnxopt import presets
    cfg, d = denoiser.apply(presets.config("sdxl", "fp8"), _denoiser_model(), preset="sdxl")
    assert cfg == presets.config("sdxl", "fp8") and d.not_applied == "--preset sdxl keeps its own recipe"


def test_big_denoiser_keeps_the_plain_plan_and_says_how_to_ask():
    from onnxopt.api import QuantConfig
    cfg, d = denoiser.apply(QuantConfig(mode="fp8"), _denoiser_model(), max_bytes=1000)
    assert cfg == QuantConfig(mode="fp8") and not d.switched_on
    assert d.not_applied.endswith("add --weight-rounding feedback --lowrank auto to apply it")
    cfg, d = denoiser.apply(QuantConfig(mode="fp8"), _denoiser_model())
    assert (cfg.weight_rounding, cfg.smoothquant, cfg.lowrank) == ("feedback", None, "auto")


def test_non_denoiser_has_no_denoiser_section(tmp_path):
    m, calib = tiny.model_and_calib(tmp_path, tiny.cnn(), (8, 3, 16, 16))
    code, out = run("quantize", m, "--fp8", "--calib", calib, "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json")
    assert code == 0, out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "denoiser" not in rep and "error_feedback" not in rep["qdq"] and not rep.get("lowrank")


@pytest.mark.slow
def test_terrain_default_fp8_as_a_stranger_runs_it(tmp_path):
    """The real terrain UNet, everything at its defaults: calib-data trajectory (1-4 steps), quantize --fp8 (the
    denoiser recipe), final samples on held-out seeds 1000-1007 at 1 and 3 steps >= 30 dB (BENCHMARKS.md
    "Denoiser-aware FP8 defaults": 38.83 / 40.65 dB)."""
    from terrain import terrain_unet

    from onnxopt import sampler as S
    t = terrain_unet()
    calib, q, rep = tmp_path / "c.npz", tmp_path / "q.onnx", tmp_path / "r.json"
    assert run("calib-data", "trajectory", t, "--sampler", "consistency", "-o", calib)[0] == 0
    code, out = run("quantize", t, "--fp8", "--calib", calib, "-o", q, "--report", rep)
    assert code == 0, out
    d = json.loads(rep.read_text())["denoiser"]
    assert (d["sample"], d["level"], d["output"]) == ("noisy", "sigma", "denoised") and len(d["defaults_on"]) == 2
    for steps in (1, 3):
        res = S.compare_sampled(t, str(q), S.SamplerOptions("consistency", steps, None, tuple(range(1000, 1008))))
        assert res.final.psnr_mean >= 30.0 and res.final.psnr_worst >= 26.0, (steps, res.final)
