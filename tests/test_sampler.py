"""compare --sampler: the ONNX denoising loop against numpy loops on tiny models, self-comparison, bad input."""
import json
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import sampler as S
from onnxopt.errors import OnnxoptError
from test_cli import run

RNG = np.random.default_rng(0)
W_EDM = RNG.standard_normal((1, 1, 3, 3)).astype(np.float32) * 0.3
W_EPS = RNG.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.5


def _edm_model(w=W_EDM) -> onnx.ModelProto:
    """denoised = tanh(conv(noisy / sqrt(1 + sigma²)) + difficulty)."""
    nodes = [
        helper.make_node("Mul", ["sigma", "sigma"], ["s2"]),
        helper.make_node("Add", ["s2", "one"], ["s2p1"]),
        helper.make_node("Sqrt", ["s2p1"], ["den"]),
        helper.make_node("Reshape", ["den", "shape4"], ["den4"]),
        helper.make_node("Div", ["noisy", "den4"], ["xin"]),
        helper.make_node("Conv", ["xin", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["difficulty", "shape4"], ["d4"]),
        helper.make_node("Add", ["c", "d4"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["denoised"]),
    ]
    g = helper.make_graph(nodes, "edm", [
        helper.make_tensor_value_info("noisy", TensorProto.FLOAT, ["N", 1, 8, 8]),
        helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1, np.float32), "one"),
         numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _edm_numpy(x, sigma, d, w=W_EDM):
    xin = x / np.sqrt(1 + sigma[:, None, None, None] ** 2)
    p = np.pad(xin, ((0, 0), (0, 0), (1, 1), (1, 1)))
    c = sum(w[0, 0, i, j] * p[:, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3))
    return np.tanh(c + d[:, None, None, None])


def _eps_model(w=W_EPS) -> onnx.ModelProto:
    """eps = conv1x1(sample) · (1 + timestep/1000) + mean(cond)."""
    nodes = [
        helper.make_node("Conv", ["sample", "w"], ["c"]),
        helper.make_node("Div", ["timestep", "thousand"], ["tt"]),
        helper.make_node("Add", ["tt", "one"], ["scale"]),
        helper.make_node("Mul", ["c", "scale"], ["cs"]),
        helper.make_node("ReduceMean", ["cond"], ["m"], axes=[1, 2], keepdims=1),
        helper.make_node("Unsqueeze", ["m", "ax"], ["m4"]),
        helper.make_node("Add", ["cs", "m4"], ["out"]),
    ]
    g = helper.make_graph(nodes, "eps", [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["N", 4, 8, 8]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["N", 3, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1, np.float32), "one"),
         numpy_helper.from_array(np.array(1000, np.float32), "thousand"), numpy_helper.from_array(np.array([3], np.int64), "ax")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _eps_numpy(x, t, cond, w=W_EPS):
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) * (1 + t / 1000) + cond.mean(axis=(1, 2))[:, None, None, None]


def test_consistency_loop_matches_numpy():
    opts = S.SamplerOptions("consistency", steps=3, seeds=(0, 1, 2), batch=2)
    m = _edm_model()
    r = S.roles(m, opts)
    cond = {"difficulty": np.array([0.1, 0.5, 0.9], np.float32)}
    got = S.run_all(m, r, opts, cond, "cpu", "tiny")
    sigmas = [80.0]  # Karras rho 7 over 4 points from 80 to 0.002, the last dropped
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    sigmas = [(a + i / 3 * (b - a)) ** 7 for i in range(3)]
    assert got.levels == pytest.approx(sigmas)
    for k, seed in enumerate((0, 1, 2)):
        d = cond["difficulty"][k:k + 1].astype(np.float64)
        x0 = None
        for i, s in enumerate(sigmas):
            z = np.random.default_rng([seed, i]).standard_normal((1, 1, 8, 8)).astype(np.float32)
            x = z * s if x0 is None else x0 + np.sqrt(s ** 2 - 0.002 ** 2) * z
            x0 = _edm_numpy(x.astype(np.float64), np.array([s]), d)
            np.testing.assert_allclose(got.steps[i][k:k + 1], x0, atol=2e-5)


def _euler_numpy(seed, cond_rows, steps, guidance):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    train_sigmas = np.sqrt((1 - ac) / ac)
    ts = (np.arange(steps) * (1000 // steps))[::-1] + 1
    sig = np.append(np.interp(ts, np.arange(1000), train_sigmas), 0.0)
    x = np.random.default_rng([seed, 0]).standard_normal((1, 4, 8, 8)).astype(np.float32).astype(np.float64)
    x = x * np.sqrt(sig[0] ** 2 + 1)
    for i, t in enumerate(ts):
        xin = x / np.sqrt(sig[i] ** 2 + 1)
        u, c = (_eps_numpy(xin, t, cond_rows[j:j + 1]) for j in (0, 1))
        eps = u + guidance * (c - u)
        x = x + (sig[i + 1] - sig[i]) * eps
    return x


def test_euler_cfg_loop_matches_numpy():
    pytest.importorskip("diffusers")
    opts = S.SamplerOptions("euler", steps=5, guidance=3.0, seeds=(4, 5), batch=2)
    m = _eps_model()
    cond = {"cond": RNG.standard_normal((2, 2, 3, 5)).astype(np.float32)}  # 2 prompts x [uncond, cond]
    got = S.run_all(m, S.roles(m, opts), opts, S.load_conditioning(cond, S.roles(m, opts), opts), "cpu", "tiny")
    for k, seed in enumerate((4, 5)):
        want = _euler_numpy(seed, cond["cond"][k].astype(np.float64), 5, 3.0)
        np.testing.assert_allclose(got.final[k:k + 1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "euler"])
def test_self_and_perturbed(tmp_path, sampler):
    pytest.importorskip("diffusers")
    ref, cand = tmp_path / "r.onnx", tmp_path / "c.onnx"
    onnx.save(_eps_model(), ref)
    onnx.save(_eps_model(W_EPS * 1.01), cand)
    opts = S.SamplerOptions(sampler, steps=4, guidance=2.0, seeds=(0, 1, 2))
    same = S.compare_sampled(str(ref), str(ref), opts)
    assert same.final.psnr_mean == np.inf and same.final.ssim_mean == pytest.approx(1.0)
    near = S.compare_sampled(str(ref), str(cand), opts)
    assert 10 < near.final.psnr_mean < 200 and near.final.cosine_worst < 1.0
    assert len(near.drift) == 4 and all(np.isfinite(d.psnr_db) for d in near.drift)


def test_cli_table_report_grid(tmp_path):
    ref, cand = tmp_path / "r.onnx", tmp_path / "c.onnx"
    onnx.save(_edm_model(), ref)
    onnx.save(_edm_model(W_EDM * 1.05), cand)
    code, out = run("compare", ref, cand, "--sampler", "consistency", "--steps", 2, "--seeds", "0-2",
                    "--report", tmp_path / "r.json", "--save-grid", tmp_path / "g.png", quiet=False)
    assert code == 0 and "final samples (3 seeds, consistency 2 step(s)" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["sampler"] == "consistency" and rep["seeds"] == [0, 1, 2] and len(rep["drift"]) == 2
    assert 0 < rep["final"]["psnr_mean"] < 200
    png = (tmp_path / "g.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (w, h) == (3 * 8 + 2 * 2, 3 * 8 + 2 * 2)
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == h * (w + 1)


@pytest.mark.parametrize("args, msg", [
    (["--sampler", "heun"], "Invalid value for '--sampler'"),
    (["--sampler", "euler"], "needs a timestep"),
    (["--sampler", "consistency", "--seeds", "5-2"], "not a seed range"),
    (["--sampler", "consistency", "--seeds", "a"], "not a seed range"),
    (["--sampler", "consistency", "--guidance", "4"], "without CFG"),
    (["--steps", "3"], "apply with --sampler"),
    (["--sampler", "consistency", "--save-grid", "x.jpg"], "PNG"),
    (["--sampler", "consistency", "--size", "16x16"], "fixed at 8x8"),
])
def test_bad_input(tmp_path, args, msg):
    ref = tmp_path / "r.onnx"
    onnx.save(_edm_model(), ref)
    code, out = run("compare", ref, ref, *args, quiet=False)
    assert code == 2 and msg in out and "Traceback" not in out
    assert len([ln for ln in out.splitlines() if ln.startswith("error:")]) == 1


def test_guidance_needs_conditioning_and_data_shape():
    m = _eps_model()
    with pytest.raises(OnnxoptError, match="guidance needs two"):
        opts = S.SamplerOptions("euler", steps=2, guidance=2.0, seeds=(0,))
        S.run_all(m, S.roles(m, opts), opts, {"cond": np.zeros((1, 1, 3, 5), np.float32)}, "cpu", "tiny")
    with pytest.raises(OnnxoptError, match="holds none"):
        S.load_conditioning({"other": np.zeros(3)}, S.roles(m, S.SamplerOptions("euler")), S.SamplerOptions("euler"))


@pytest.mark.slow
def test_terrain_unet_self_compare():
    from terrain import terrain_unet
    path = terrain_unet()
    opts = S.SamplerOptions("consistency", steps=1, seeds=(0,))
    res = S.compare_sampled(path, path, opts)
    assert res.final.psnr_mean == np.inf
    assert res.reference.shape == (1, 1, 128, 128) and -1.01 <= res.reference.min() < res.reference.max() <= 1.01


def test_calib_data_trajectory(tmp_path):
    ref = tmp_path / "r.onnx"
    onnx.save(_edm_model(), ref)
    out = tmp_path / "c.npz"
    code, text = run("calib-data", "trajectory", ref, "--sampler", "consistency", "--steps", 3, "--seeds", "10-13", "-o", out)
    assert code == 0, text
    with np.load(out) as z:
        assert z["noisy"].shape == (12, 1, 1, 8, 8) and z["sigma"].shape == (12, 1) and z["difficulty"].shape == (12, 1)
        levels = S.karras_sigmas(3, 0.002, 80.0)
        np.testing.assert_allclose(np.sort(np.unique(z["sigma"])), np.sort(levels).astype(np.float32), rtol=1e-6)
        assert np.all((z["difficulty"] >= 0) & (z["difficulty"] <= 1))
    from onnxopt.calib import CalibData, input_specs
    feeds = list(CalibData.from_path(str(out), input_specs(_edm_model())))  # what quantize --calib reads
    assert len(feeds) == 12 and feeds[0]["noisy"].shape == (1, 1, 8, 8) and feeds[0]["sigma"].shape == (1,)
    code, text = run("calib-data", "trajectory", ref, "--sampler", "euler", "-o", out, quiet=False)
    assert code == 2 and "needs a timestep" in text


def test_calib_data_trajectory_default_covers_1_to_4_steps(tmp_path):
    """Without --steps, consistency calibration holds every call of the 1, 2, 3 and 4 step loops of each seed (the
    shared first call once): exactly the feeds those loops give the model."""
    ref = tmp_path / "r.onnx"
    onnx.save(_edm_model(), ref)
    out = tmp_path / "c.npz"
    code, text = run("calib-data", "trajectory", ref, "--sampler", "consistency", "--seeds", "10-11", "-o", out, quiet=False)
    assert code == 0, text
    assert "14 samples: consistency 1/2/3/4 step(s)" in " ".join(text.split())
    calls = []
    m = _edm_model()
    for n in S.CALIB_CONSISTENCY_STEPS:
        opts = S.SamplerOptions("consistency", n, None, (10, 11), batch=1)
        S.run_all(m, S.roles(m, opts), opts, None, "cpu", "x", record=lambda f: calls.append({k: np.array(v) for k, v in f.items()}))
    want = {(round(float(c["sigma"][0]), 4), zlib.crc32(c["noisy"].tobytes())) for c in calls}
    with np.load(out) as z:
        got = [(round(float(sg[0]), 4), zlib.crc32(x.tobytes())) for sg, x in zip(z["sigma"], z["noisy"])]
    assert len(got) == len(set(got)) == 2 * (1 + 1 + 2 + 3) and set(got) == want
    assert {s for s, _ in got} == {round(float(v), 4) for n in (1, 2, 3, 4) for v in S.karras_sigmas(n, 0.002, 80.0)}


def _edm_deep(seed=3) -> onnx.ModelProto:
    """A denoiser with quantizable convs: x0 = conv(relu(conv(relu(conv(x·c_in)) + emb))) with 16 channels."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((16, 1, 3, 3)) * 0.5).astype(np.float32)
    w2 = (r.standard_normal((16, 16, 3, 3)) * 0.15).astype(np.float32)
    w3 = (r.standard_normal((16, 16, 3, 3)) * 0.15).astype(np.float32)
    w4 = (r.standard_normal((1, 16, 1, 1)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["sigma", "sigma"], ["s2"]), helper.make_node("Add", ["s2", "one"], ["s2p1"]),
        helper.make_node("Sqrt", ["s2p1"], ["den"]), helper.make_node("Reshape", ["den", "shape4"], ["den4"]),
        helper.make_node("Div", ["noisy", "den4"], ["xin"]),
        helper.make_node("Conv", ["xin", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Reshape", ["difficulty", "shape4"], ["d4"]), helper.make_node("Add", ["r1", "d4"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"), helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"), helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["c4"], name="conv4"), helper.make_node("Tanh", ["c4"], ["denoised"]),
    ]
    g = helper.make_graph(nodes, "edm_deep", [
        helper.make_tensor_value_info("noisy", TensorProto.FLOAT, ["N", 1, 16, 16]),
        helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (w4, "w4"))]
        + [numpy_helper.from_array(np.array(1, np.float32), "one"), numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_target_psnr_verified_on_samples(tmp_path):
    ref = tmp_path / "r.onnx"
    onnx.save(_edm_deep(), ref)
    cal = tmp_path / "c.npz"
    assert run("calib-data", "trajectory", ref, "--sampler", "consistency", "--steps", 2, "--seeds", "0-7", "-o", cal)[0] == 0
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    code, text = run("quantize", ref, "--auto", "--formats", "int8", "--target-psnr", 35, "--sampler", "consistency",
                     "--steps", 2, "--verify-seeds", "100-103", "--high-precision", "fp32", "--calib", cal, "-o", out,
                     "--report", rep, quiet=False)
    assert code == 0, text
    auto = json.loads(rep.read_text())["autoquant"]
    assert auto["metric"] == "psnr" and auto["sampler"]["held_out_seeds"] == [100, 101, 102, 103]
    assert auto["met"] and auto["verified"]["psnr"] >= 35
    assert set(auto["kept_wide"]) <= set(auto["layers"])
    # the written graph, sampled on the same held-out seeds, gives what the search verified
    res = S.compare_sampled(str(ref), str(out), S.SamplerOptions("consistency", steps=2, seeds=(100, 101, 102, 103)))
    assert res.final.psnr_mean == pytest.approx(min(auto["verified"]["psnr"], 200), abs=1.0)
    # ...and the report's verification is that written graph's own (what ships is what was verified)
    assert auto["met_on"] == "written graph" and auto["verified_written"]["psnr"] >= 35
    assert res.final.psnr_mean == pytest.approx(min(auto["verified_written"]["psnr"], 200), abs=0.05)
    assert set(auto["kept_wide_why"]) == set(auto["kept_wide"])


def test_auto_target_psnr_of_the_worst_seed(tmp_path):
    """--psnr-of worst: the target is the worst held-out seed's PSNR, that of the written graph when sampled again."""
    ref = tmp_path / "r.onnx"
    onnx.save(_edm_deep(), ref)
    cal = tmp_path / "c.npz"
    assert run("calib-data", "trajectory", ref, "--sampler", "consistency", "--steps", 2, "--seeds", "0-7", "-o", cal)[0] == 0
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    code, text = run("quantize", ref, "--auto", "--formats", "int8", "--target-psnr", 35, "--psnr-of", "worst",
                     "--sampler", "consistency", "--steps", 2, "--verify-seeds", "100-103", "--high-precision", "fp32",
                     "--calib", cal, "-o", out, "--report", rep, quiet=False)
    assert code == 0, text
    auto = json.loads(rep.read_text())["autoquant"]
    v = auto["verified_written"]
    assert auto["sampler"]["psnr_of"] == "worst" and v["psnr"] == v["psnr_worst"] <= v["psnr_mean"]
    assert auto["met"] == (v["psnr"] >= 35)
    res = S.compare_sampled(str(ref), str(out), S.SamplerOptions("consistency", steps=2, seeds=(100, 101, 102, 103)))
    assert res.final.psnr_worst == pytest.approx(min(v["psnr"], 200), abs=0.05)


@pytest.mark.parametrize("args, msg", [
    (["--auto", "--target-psnr", "30"], "give it with --sampler"),
    (["--auto", "--target-psnr", "30", "--sampler", "euler"], "needs a timestep"),
    (["--auto", "--target-cosine", "0.99", "--sampler", "consistency"], "only with --target-psnr"),
    (["--auto", "--target-psnr", "30", "--steps", "2"], "with --sampler"),
    (["--int8", "--sampler", "consistency"], "to --auto only"),
    (["--auto", "--target-psnr", "30", "--sampler", "consistency", "--verify-seeds", "x"], "not a seed range"),
])
def test_auto_target_psnr_bad_input(tmp_path, args, msg):
    ref = tmp_path / "r.onnx"
    onnx.save(_edm_deep(), ref)
    code, text = run("quantize", ref, *args, "--calib-random", 4, "--shapes", "noisy:1x1x16x16", "--shapes", "sigma:1",
                     "--shapes", "difficulty:1", "-o", tmp_path / "q.onnx", quiet=False)
    assert code == 2 and msg in text and "Traceback" not in text, text
