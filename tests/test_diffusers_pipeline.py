"""compare --pipeline and calib-data trajectory --pipeline on a tiny Stable-Diffusion pipeline folder built offline
(tools/make_tiny_pipeline.py: seeded random UNet, CLIP text encoder, VAE; its UNet exported to ONNX): the ONNX-swapped
pipeline against torch's own, self-comparison, an FP8 UNet's image PSNR against numpy over the saved grid, the
recorded calibration calls, and bad input (one error line, exit 2, before any work)."""
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import diffusers_pipeline as P
from onnxopt.errors import OnnxoptError
from test_cli import run

ROOT = Path(__file__).resolve().parents[1]
UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 32, "sample_size": 16}


def _read_png(path) -> np.ndarray:
    """The RGB/grey pixels of a PNG written by onnxopt.imagegrid (one IDAT, filter 0 on every row)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        chunks.setdefault(data[pos + 4:pos + 8], b"")
        chunks[data[pos + 4:pos + 8]] += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    ch = 3 if colour == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * ch)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, ch)


def _json_folder(d: Path, unet=UNET_CONFIG, parts=("unet", "vae")) -> Path:
    """A pipeline folder's JSON files only: enough for every check made before a pipeline loads."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                     "unet": ["diffusers", "UNet2DConditionModel"],
                                                     "vae": ["diffusers", "AutoencoderKL"]}))
    for part, cfg in (("unet", unet), ("vae", {"block_out_channels": [8, 16]})):
        if part in parts:
            (d / part).mkdir(exist_ok=True)
            (d / part / "config.json").write_text(json.dumps(cfg))
    return d


def _unet_io(path, inputs, out="out_sample") -> Path:
    """A model with these inputs (name, shape) whose output is the sample: enough for the input checks."""
    vis = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    g = helper.make_graph([helper.make_node("Identity", ["sample"], [out])], "u", vis,
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


GOOD = [("sample", ["N", 4, 16, 16]), ("timestep", [1]), ("encoder_hidden_states", ["N", 77, 32])]


@pytest.fixture
def checks(tmp_path):
    folder = _json_folder(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    return folder, _unet_io(tmp_path / "u.onnx", GOOD), tmp_path / "prompts.txt"


# ---------------------------------------------------------------- bad input: one error line, exit 2, before work
@pytest.mark.parametrize("case, want", [
    ("no_unet", "has no unet/"),
    ("no_vae", "has no vae/"),
    ("no_index", "model_index.json missing"),
    ("not_a_dir", "no such folder"),
    ("empty_prompts", "has no prompts"),
    ("no_prompts", "needs --prompts"),
    ("wrong_inputs", "does not fit the pipeline's UNet call"),
    ("wrong_channels", "input sample has 3 at axis 1"),
    ("wrong_text_width", "input encoder_hidden_states has 64 at axis 2"),
    ("sdxl_inputs", "SDXL conditioning"),
    ("timestep_cond", "takes timestep_cond but"),
    ("consistency", "--sampler consistency does not apply with --pipeline"),
    ("data", "--data does not apply with --pipeline"),
    ("prompts_alone", "--prompts applies with --pipeline"),
])
def test_bad_input_is_one_error_line(checks, tmp_path, case, want):
    folder, unet, prompts = checks
    args = ["compare", unet, unet, "--pipeline", folder, "--prompts", prompts]
    if case in ("no_unet", "no_vae"):
        args[4] = _json_folder(tmp_path / case, parts=("vae",) if case == "no_unet" else ("unet",))
    elif case == "no_index":
        (folder / "model_index.json").unlink()
    elif case == "not_a_dir":
        args[4] = tmp_path / "nowhere"
    elif case == "empty_prompts":
        prompts.write_text("\n  \n")
    elif case == "no_prompts":
        args = args[:5]
    elif case == "wrong_inputs":
        args[1] = _unet_io(tmp_path / "w.onnx", [("sample", ["N", 4, 16, 16]), ("timestep", [1]), ("cond", ["N", 3, 5])])
    elif case == "wrong_channels":
        args[2] = _unet_io(tmp_path / "w.onnx", [("sample", ["N", 3, 16, 16])] + GOOD[1:])
    elif case == "wrong_text_width":
        args[2] = _unet_io(tmp_path / "w.onnx", GOOD[:2] + [("encoder_hidden_states", ["N", 77, 64])])
    elif case == "sdxl_inputs":
        args[1] = _unet_io(tmp_path / "w.onnx", GOOD + [("text_embeds", ["N", 32]), ("time_ids", ["N", 6])])
    elif case == "timestep_cond":
        args[2] = _unet_io(tmp_path / "w.onnx", GOOD + [("timestep_cond", ["N", 256])])
    elif case == "consistency":
        args += ["--sampler", "consistency"]
    elif case == "data":
        args += ["--data", prompts]
    elif case == "prompts_alone":
        args = ["compare", unet, unet, "--prompts", prompts]
    code, out = run(*args)
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], out
    assert "Traceback" not in out


def test_trajectory_bad_input(checks, tmp_path):
    folder, unet, prompts = checks
    prompts.write_text("")
    code, out = run("calib-data", "trajectory", unet, "--pipeline", folder, "--prompts", prompts, "-o", tmp_path / "c.npz")
    assert code == 2 and out.startswith("error: ") and "has no prompts" in out
    code, out = run("calib-data", "trajectory", unet, "-o", tmp_path / "c.npz")
    assert code == 2 and "--sampler is required" in out
    assert not (tmp_path / "c.npz").exists()


def test_fixed_size_must_fit_the_image(checks, tmp_path):
    folder, unet, _ = checks
    with pytest.raises(OnnxoptError, match=r"has 16 at axis 2, the pipeline's UNet call gives 32 \(image 64x64\)"):
        P.check_unet(onnx.load(unet), P.check_folder(folder), P.PipelineOptions(size=(64, 64)))
    io = P.check_unet(onnx.load(unet), P.check_folder(folder), P.PipelineOptions())
    assert [s.name for s in io.inputs] == ["sample", "timestep", "encoder_hidden_states"] and io.output == "out_sample"


def test_lpips_says_why_it_is_missing():
    score, note = P.lpips_metric()
    assert (score is None) == (note is not None)
    if score is None:
        assert "lpips" in note or "AlexNet" in note


def test_image_grid_keeps_pixels():
    from onnxopt.imagegrid import image_grid
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 2, 5, 7, 3), dtype=np.uint8)
    g = image_grid(a, b, pad=2)
    assert g.shape == (2 * 5 + 2, 2 * 7 + 2, 3)
    np.testing.assert_array_equal(g[7:12, :7], a[1])
    np.testing.assert_array_equal(g[:5, 9:], b[0])
    assert (g[5:7] == 255).all() and (g[:, 7:9] == 255).all()


# ---------------------------------------------------------------- the tiny pipeline, end to end (slow: builds, runs)
def _build(tmp_path_factory, sdxl: bool) -> Path:
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_tiny_pipeline
    finally:
        sys.path.remove(str(ROOT / "tools"))
    name = "tiny-sdxl" if sdxl else "tiny-sd"
    return make_tiny_pipeline.build(tmp_path_factory.mktemp(name) / name, sdxl=sdxl)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return _build(tmp_path_factory, False)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return _build(tmp_path_factory, True)


STEPS = 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sdxl"])
def test_onnx_unet_in_the_pipeline_matches_torch(kind, request):
    """The pipeline with the exported UNet in ORT gives the images of the same pipeline with its torch UNet
    (SD: sample, timestep, encoder_hidden_states; SDXL adds text_embeds and time_ids)."""
    import torch
    from diffusers import DiffusionPipeline
    d = request.getfixturevalue(kind)
    folder = P.check_folder(d)
    assert folder.text_time == (kind == "tiny_sdxl")
    opts = P.PipelineOptions(steps=STEPS, guidance=4.0, seeds=(3,))
    res = P.compare_pipeline(d / "unet.onnx", d / "unet.onnx", folder, ["a red fox in the snow"], opts)
    assert res.images.psnr_mean == np.inf and res.latents.psnr_mean == np.inf and res.images.ssim_mean == pytest.approx(1.0)
    pipe = DiffusionPipeline.from_pretrained(d, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        want = pipe("a red fox in the snow", num_inference_steps=STEPS, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    want = (want * 255).round().astype(np.uint8)
    assert res.reference.shape == (1, 32, 32, 3) and want.std() > 5  # not a blank image
    assert np.abs(res.reference[0].astype(int) - want).max() <= 1   # 8-bit rounding of float noise at most


@pytest.mark.slow
def test_trajectory_fp8_compare_grid_end_to_end(tiny_sd, tmp_path):
    """Record calibration from the pipeline, quantize to FP8, compare: finite image PSNR equal to numpy's over the
    grid's pixels; the identical pair is infinite; --sampler ddim swaps the scheduler."""
    d = tiny_sd
    calib, fp8 = tmp_path / "traj.npz", tmp_path / "unet.fp8.onnx"
    code, out = run("calib-data", "trajectory", d / "unet.onnx", "--pipeline", d, "--prompts", d / "prompts.txt",
                    "--steps", STEPS, "--seeds", "10", "-o", calib, quiet=False)
    assert code == 0, out
    assert "recorded from the pipeline" in out and "StableDiffusionPipeline" in out
    with np.load(calib) as z:
        arrays = {k: z[k] for k in z.files}
    calls = 3 * STEPS  # 3 prompts x 1 seed x steps, CFG batch 2
    assert arrays["sample"].shape == (calls, 2, 4, 16, 16) and arrays["encoder_hidden_states"].shape == (calls, 2, 77, 32)
    assert arrays["timestep"][:STEPS, 0].tolist() == [667.0, 334.0, 1.0]  # Euler, 3 steps, "leading" spacing
    code, out = run("quantize", d / "unet.onnx", "--fp8", "--calib", calib, "-o", fp8)
    assert code == 0, out

    grid, report = tmp_path / "grid.png", tmp_path / "r.json"
    (tmp_path / "p.txt").write_text("a lighthouse at dusk\na bowl of lemons\n")
    import shutil  # the pipeline's torch UNet weights are never read: a copy without them compares the same
    d = Path(shutil.copytree(d, tmp_path / "no-unet-weights", ignore=lambda where, names: [
        n for n in names if Path(where).name == "unet" and n.endswith(".safetensors")]))
    assert not list((d / "unet").glob("*.safetensors"))
    code, out = run("compare", d / "unet.onnx", fp8, "--pipeline", d, "--prompts", tmp_path / "p.txt", "--steps", STEPS,
                    "--seeds", "0-1", "--save-grid", grid, "--report", report, quiet=False)
    assert code == 0, out
    assert "LPIPS: " in out and "decoded images (4 = 2 prompt(s) x 2 seed(s), 32x32" in out
    r = json.loads(report.read_text())
    psnr = r["images"]["psnr_mean"]
    assert 15 < psnr < 60 and r["latents"]["psnr_mean"] < 80 and len(r["drift"]) == STEPS
    assert r["scheduler"] == "EulerDiscreteScheduler" and r["images"]["data_range"] == 255
    px = _read_png(grid)
    assert px.shape == (4 * 32 + 3 * 2, 2 * 32 + 2, 3)
    ref = np.stack([px[i * 34:i * 34 + 32, :32] for i in range(4)]).astype(np.float64)
    cand = np.stack([px[i * 34:i * 34 + 32, 34:] for i in range(4)]).astype(np.float64)
    mse = ((ref - cand) ** 2).reshape(4, -1).mean(axis=1)
    assert psnr == pytest.approx(float(np.mean(10 * np.log10(255.0 ** 2 / mse))), abs=1e-9)

    code, out = run("compare", d / "unet.onnx", d / "unet.onnx", "--pipeline", d, "--prompts", tmp_path / "p.txt",
                    "--steps", 2, "--seeds", "0", "--sampler", "ddim", "--report", report)
    assert code == 0, out
    r = json.loads(report.read_text())
    assert r["scheduler"] == "DDIMScheduler" and r["images"]["psnr_mean"] == float("inf") and r["steps"] == 2


@pytest.mark.slow
def test_a_non_finite_candidate_scores_nan(tiny_sd, tmp_path):
    """A UNet that returns NaN decodes to NaN images: every image metric NaN (never a good score), grid still written."""
    from onnx import numpy_helper
    from onnxopt.imagegrid import save_image_grid
    m = onnx.load(tiny_sd / "unet.onnx")
    out = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [o if o != out else "pre_nan" for o in n.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    m.graph.node.append(helper.make_node("Mul", ["pre_nan", "nan"], [out]))
    onnx.save(m, tmp_path / "nan.onnx")
    res = P.compare_pipeline(tiny_sd / "unet.onnx", tmp_path / "nan.onnx", P.check_folder(tiny_sd), ["a cat"],
                             P.PipelineOptions(steps=1, seeds=(0,)))
    assert np.isnan(res.images.psnr_mean) and np.isnan(res.images.ssim_mean) and np.isnan(res.latents.psnr_mean)
    assert "PSNR nan dB" in P.format_table(res)
    assert _read_png(save_image_grid(tmp_path / "g.png", res.reference, res.candidate)).shape == (32, 66, 3)
