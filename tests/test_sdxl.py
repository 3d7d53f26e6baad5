"""SDXL UNet: export recipe, calibration data, presets, and the tiny UNet through FP8 / INT8 in ORT."""
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from onnxopt import diffusion, modelfile, opset_upgrade, presets
from onnxopt import ort as ortx
from onnxopt.calib import CalibData, input_specs
from onnxopt.cli import main
from onnxopt.compare import compare
from onnxopt.errors import OnnxoptError
from onnxopt.inspection import inspect_path

TINY_PX = 256  # tiny UNet: 32x32 latents


def run(*args):
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    return r.exit_code, r.output


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------- config and presets (fast)
def test_full_config_is_sdxl_base():
    from models import sdxl_unet
    assert sdxl_unet.count_parameters("full") == sdxl_unet.FULL_PARAMETERS == 2_567_463_684
    assert sdxl_unet.head_dims(sdxl_unet.unet_config("full")) == [64, 64, 64]
    tiny = sdxl_unet.unet_config("tiny")
    assert sdxl_unet.head_dims(tiny) == [32, 32, 32]
    full = sdxl_unet.unet_config("full")
    for key in ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block", "cross_attention_dim",
                "projection_class_embeddings_input_dim", "addition_embed_type"):
        assert tiny[key] == full[key], key
    with pytest.raises(OnnxoptError, match="unknown scale"):
        sdxl_unet.unet_config("huge")


def test_presets():
    fp8 = presets.config("sdxl", "fp8")
    assert (fp8.mode, fp8.calib_method, fp8.quantize_mha, fp8.smoothquant) == ("fp8", "max", True, None)
    int8 = presets.config("sdxl", "int8", provider="cpu")
    assert (int8.mode, int8.calib_method, int8.quantize_mha, int8.smoothquant) == ("int8", "percentile", False, 0.8)
    assert fp8.exclude == int8.exclude == presets.SDXL_EXCLUDE
    assert fp8.calib_max_batch == int8.calib_max_batch == 1  # CFG pairs split: same statistics, half the memory
    assert presets.sdxl_fp8(memory_budget_mb=123).memory_budget_mb == 123
    with pytest.raises(OnnxoptError, match="sdxl preset has fp8, int8, nvfp4, mxfp8 recipes, not .int4."):
        presets.config("sdxl", "int4")
    with pytest.raises(OnnxoptError, match="unknown preset"):
        presets.config("sd15")


# ---------------------------------------------------------------- calibration data (fast)
def test_schedule_matches_diffusers_euler():
    from diffusers import EulerDiscreteScheduler
    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 timestep_spacing="leading", steps_offset=1)
    for steps in (20, 30):
        ref.set_timesteps(steps)
        ours = diffusion.EulerSchedule(steps)
        np.testing.assert_allclose(ours.timesteps(), ref.timesteps.numpy(), atol=1e-6)
        np.testing.assert_allclose(ours.sigmas(), ref.sigmas.numpy()[:-1], rtol=1e-5)


def test_synthetic_sdxl_inputs():
    a = diffusion.synthesize_sdxl(8, steps=30)
    assert {k: v.shape for k, v in a.items()} == {
        "sample": (8, 2, 4, 128, 128), "timestep": (8, 1), "encoder_hidden_states": (8, 2, 77, 2048),
        "text_embeds": (8, 2, 1280), "time_ids": (8, 2, 6)}
    assert all(v.dtype == np.float32 for v in a.values())
    ts = a["timestep"].ravel()
    assert ts[0] == 958 and ts[-1] == 1 and np.all(np.diff(ts) < 0)  # spans the whole schedule
    np.testing.assert_array_equal(a["sample"][:, 0], a["sample"][:, 1])  # CFG duplicates the latent
    assert 0.7 < a["sample"].std() < 1.3  # scale_model_input keeps unit scale at every noise level
    np.testing.assert_array_equal(a["time_ids"][0, 0], [1024, 1024, 0, 0, 1024, 1024])
    assert not a["encoder_hidden_states"][0, 0].any() and a["encoder_hidden_states"][1, 0].any()  # empty / real negative
    tok = a["encoder_hidden_states"][0, 1]
    assert np.abs(tok).max() > 10 and 0.5 < tok[1:].std() < 2  # outliers, unit bulk
    again = diffusion.synthesize_sdxl(8, steps=30)
    other = diffusion.synthesize_sdxl(8, steps=30, seed=1)
    np.testing.assert_array_equal(a["sample"], again["sample"])
    assert not np.allclose(a["sample"], other["sample"])
    with pytest.raises(OnnxoptError, match="multiple of 8"):
        diffusion.synthesize_sdxl(2, shapes=diffusion.SDXLShapes(height=1001))


def test_diffusion_module_imports_neither_torch_nor_diffusers():
    code = "import sys, onnxopt.diffusion; assert 'diffusers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_calib_data(tmp_path):
    out = tmp_path / "c.npz"
    code, text = run("calib-data", "sdxl", "-o", out, "--samples", 3, "--steps", 20, "--height", TINY_PX, "--width", TINY_PX)
    assert code == 0, text
    with np.load(out) as z:
        assert z["sample"].shape == (3, 2, 4, 32, 32)
        np.testing.assert_array_equal(z["timestep"].ravel(), diffusion.EulerSchedule(20).timesteps()[[0, 10, 19]])
    code, text = run("calib-data", "sdxl", "-o", tmp_path / "c.npy")
    assert code == 2 and "name the output *.npz" in text
    code, text = run("calib-data", "sdxl", "-o", out, "--pipeline", tmp_path)
    assert code == 2 and "--prompts" in text


# ---------------------------------------------------------------- the tiny UNet (slow: export, quantize)
@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    from models import sdxl_unet
    d = tmp_path_factory.mktemp("sdxl")
    path = sdxl_unet.export(d / "unet.onnx", scale="tiny", seed=0)
    diffusion.save_npz(diffusion.synthesize_sdxl(6, steps=30, shapes=diffusion.SDXLShapes(TINY_PX, TINY_PX)), d / "calib.npz")
    diffusion.save_npz(diffusion.synthesize_sdxl(3, steps=25, shapes=diffusion.SDXLShapes(TINY_PX, TINY_PX), seed=7), d / "heldout.npz")
    return path


@pytest.mark.slow
def test_export_matches_torch_with_dynamic_batch(tiny_unet):
    import torch

    from models import sdxl_unet
    assert sorted(p.name for p in tiny_unet.parent.glob("unet.onnx*")) == ["unet.onnx", "unet.onnx.data"]
    model = modelfile.load(tiny_unet)
    assert opset_upgrade.opset_of(model) >= 17
    specs = {s.name: s for s in input_specs(model)}
    assert list(specs) == list(sdxl_unet.INPUT_NAMES)
    assert specs["sample"].shape[0] == specs["encoder_hidden_states"].shape[0] == "batch"
    assert [o.name for o in model.graph.output] == ["latent"]
    sess = ortx.session(model)
    unet = sdxl_unet.build_unet("tiny", seed=0)
    for batch, size in ((1, 32), (2, 32), (3, 24)):
        args = sdxl_unet.example_inputs(dict(unet.config), batch=batch, latent_size=size, seed=batch)
        with torch.inference_mode():
            ref = unet(*args[:3], added_cond_kwargs={"text_embeds": args[3], "time_ids": args[4]}).sample.numpy()
        got = sess.run(None, dict(zip(sdxl_unet.INPUT_NAMES, (a.numpy() for a in args))))[0]
        assert got.shape == (batch, 4, size, size)
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_export_attention_is_the_fused_mha_pattern(tiny_unet):
    """Every attention: Mul -> MatMul (BMM1) -> Softmax -> MatMul (BMM2) on 4-D heads with a static head size."""
    import onnx_graphsurgeon as gs
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    from models import sdxl_unet
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel
        blocks = sum(isinstance(m, BasicTransformerBlock)
                     for m in UNet2DConditionModel.from_config(sdxl_unet.unet_config("tiny")).modules())
    graph = gs.import_onnx(opset_upgrade.infer_shapes(modelfile.load(tiny_unet)))
    softmax = [n for n in graph.nodes if n.op == "Softmax"]
    assert len(softmax) == 2 * blocks  # self- and cross-attention per transformer block
    for sm in softmax:
        bmm1 = sm.inputs[0].inputs[0]
        (bmm2,) = sm.outputs[0].outputs
        assert bmm1.op == bmm2.op == "MatMul" and sm.attrs["axis"] == -1
        assert re.search(r"/attn[12]/MatMul$", bmm1.name) and bmm2.inputs[0] is sm.outputs[0]
        q, k = bmm1.inputs
        assert q.inputs[0].op == k.inputs[0].op == "Mul"  # sqrt(scale) on each operand, as SDPA exports
        assert q.shape[-1] == k.shape[-2] == 32 and len(q.shape) == 4  # static head size: [B, H, S, D] @ [B, H, D, S]
        assert bmm2.inputs[1].inputs[0].op == "Transpose" and bmm2.inputs[1].shape[-1] == 32


@pytest.mark.slow
def test_preset_exclusions_match_exported_names(tiny_unet):
    names = [n.name for n in modelfile.load(tiny_unet).graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    expected = {r"(^|/)time_embedding/": {"/time_embedding/linear_1/Gemm", "/time_embedding/linear_2/Gemm"},
                r"(^|/)add_embedding/": {"/add_embedding/linear_1/Gemm", "/add_embedding/linear_2/Gemm"},
                r"(^|/)conv_in/": {"/conv_in/Conv"}, r"(^|/)conv_out/": {"/conv_out/Conv"}}
    assert set(expected) == set(presets.SDXL_EXCLUDE)
    for rx, want in expected.items():
        assert {n for n in names if re.search(rx, n)} == want


COND = re.compile(r"/time_emb_proj/")  # the resnets' conditioning projections: per-sample GEMMs kept FP16


@pytest.mark.slow
def test_fp8_preset_end_to_end(tiny_unet, tmp_path):
    d = tiny_unet.parent
    out = tmp_path / "unet.fp8.onnx"
    code, text = run("quantize", tiny_unet, "--preset", "sdxl", "--fp8", "--calib", d / "calib.npz", "-o", out)
    assert code == 0, text
    res = compare(tiny_unet, out, d / "heldout.npz")["latent"]
    assert res["cosine"] >= 0.99, res
    ins = inspect_path(out)
    assert not ins.lint
    excl = [re.compile(p) for p in presets.SDXL_EXCLUDE]
    for layer in ins.layers:  # each resnet's time_emb_proj is per-sample conditioning (rule_conditioning_gemv)
        assert layer.quantized != any(r.search(layer.name) for r in excl + [COND]), layer.name
    mha = [l for l in ins.layers if re.search(r"/attn[12]/MatMul(_1)?$", l.name)]
    assert len(mha) == 2 * sum(n.op_type == "Softmax" for n in modelfile.load(out).graph.node) and all(l.quantized for l in mha)


@pytest.mark.slow
def test_int8_preset_end_to_end(tiny_unet, tmp_path):
    from onnxopt.api import quantize
    d = tiny_unet.parent
    res = quantize(tiny_unet, tmp_path / "unet.int8.onnx", config=presets.sdxl_int8(progress=False), data=d / "calib.npz")
    assert res.report.get("smoothquant")
    m = compare(tiny_unet, res.path, d / "heldout.npz")["latent"]
    assert m["cosine"] >= 0.99, m
    ins = inspect_path(res.path)
    assert not ins.lint
    mha = [l for l in ins.layers if re.search(r"/attn[12]/MatMul(_1)?$", l.name)]
    assert mha and not any(any(l.inputs_quantized) for l in mha)  # no MHA quantization in INT8
    excl = [re.compile(p) for p in presets.SDXL_EXCLUDE]
    skipped = res.report["qdq"]["skipped"]
    small = [n for n, why in skipped.items() if why.startswith("INT8 conv with")]  # rule_int8_small_conv
    assert small and all(int(skipped[n].split()[3]) < 131072 for n in small)
    cond = {n for n, why in skipped.items() if why.startswith("per-sample conditioning GEMM")}
    assert cond and all(COND.search(n) for n in cond)
    for layer in ins.layers:
        if layer not in mha:
            excluded = any(r.search(layer.name) for r in excl + [COND])
            assert layer.quantized != (excluded or layer.name in small), layer.name


@pytest.mark.slow
def test_record_unet_inputs_from_a_pipeline(tiny_unet):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from models import sdxl_unet
    unet = sdxl_unet.build_unet("tiny")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    prompt = {"prompt_embeds": torch.randn(1, 77, 2048, generator=g), "pooled_prompt_embeds": torch.randn(1, 1280, generator=g),
              "negative_prompt_embeds": torch.zeros(1, 77, 2048), "negative_pooled_prompt_embeds": torch.zeros(1, 1280)}
    a = diffusion.record_unet_inputs(pipe, [prompt], steps=3, per_prompt=2, height=TINY_PX, width=TINY_PX)
    assert not unet._forward_pre_hooks  # the hook is gone
    assert a["sample"].shape == (2, 2, 4, 32, 32) and a["encoder_hidden_states"].shape == (2, 2, 77, 2048)
    np.testing.assert_array_equal(a["timestep"].ravel(), diffusion.EulerSchedule(3).timesteps()[[0, 2]])
    np.testing.assert_array_equal(a["time_ids"][0, 1], [TINY_PX, TINY_PX, 0, 0, TINY_PX, TINY_PX])
    assert not a["encoder_hidden_states"][:, 0].any()  # CFG: negative first
    np.testing.assert_allclose(a["encoder_hidden_states"][0, 1], prompt["prompt_embeds"][0].numpy())
    # what it records feeds the exported graph as calibration data
    path = diffusion.save_npz(a, tiny_unet.parent / "recorded.npz")
    feeds = list(CalibData.from_path(path, input_specs(modelfile.load(tiny_unet))))
    assert len(feeds) == 2
    out = ortx.session(modelfile.load(tiny_unet)).run(None, feeds[0])[0]
    assert out.shape == (2, 4, 32, 32) and np.isfinite(out).all()
