"""onnxopt.metrics against direct numpy definitions, and its properties."""
import numpy as np
import pytest

from onnxopt import metrics as M
from onnxopt.compare import metrics as compare_metrics
from onnxopt.errors import OnnxoptError


def _ssim_bruteforce(a, b, rng_):
    # Every 11x11 window, weighted by the outer product of the Gaussian taps: the textbook definition.
    g = M.gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * rng_) ** 2, (0.03 * rng_) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
            cxy = (w * x * y).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_windowed_definition():
    rng = np.random.default_rng(0)
    a = rng.random((20, 24))
    b = a + 0.1 * rng.standard_normal(a.shape)
    assert M.ssim_per_sample(a, b)[0] == pytest.approx(_ssim_bruteforce(a, b, np.ptp(a)), rel=1e-10)
    assert M.ssim_per_sample(a, b, data_range=2.0)[0] == pytest.approx(_ssim_bruteforce(a, b, 2.0), rel=1e-10)


def test_psnr_definition_and_range():
    rng = np.random.default_rng(1)
    ref = rng.uniform(-1, 1, (3, 1, 8, 8))
    cand = ref + 0.01 * rng.standard_normal(ref.shape)
    got = M.psnr_per_sample(ref, cand)
    want = [10 * np.log10(np.ptp(r) ** 2 / np.mean((r - c) ** 2)) for r, c in zip(ref, cand)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(M.psnr_per_sample(ref, cand, data_range=2.0),
                               [10 * np.log10(4 / np.mean((r - c) ** 2)) for r, c in zip(ref, cand)], rtol=1e-12)
    assert np.all(np.isinf(M.psnr_per_sample(ref, ref)))
    with pytest.raises(OnnxoptError, match="data range"):
        M.psnr_per_sample(ref, cand, data_range=0)


def test_properties():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((4, 3, 16, 16))
    small, big = (ref + s * rng.standard_normal(ref.shape) for s in (0.01, 0.3))
    fs, fb = M.fidelity(ref, small), M.fidelity(ref, big)
    assert fs.psnr_mean > fb.psnr_mean and fs.ssim_mean > fb.ssim_mean and fs.cosine_mean > fb.cosine_mean
    assert fs.cosine_worst <= fs.cosine_mean and fs.psnr_worst <= fs.psnr_mean
    assert M.ssim_per_sample(ref, small) == pytest.approx(M.ssim_per_sample(small, ref, data_range=np.ptp(ref)), rel=0.05)
    same = M.fidelity(ref, ref)
    assert same.ssim_mean == pytest.approx(1.0) and same.psnr_mean == np.inf and same.snr_db == np.inf
    bad = small.copy()
    bad[1, 0, 0, 0] = np.nan
    f = M.fidelity(ref, bad)
    assert np.isnan(f.cosine) and np.isnan(f.psnr_worst) and np.isnan(f.ssim_worst) and np.isnan(f.snr_db)
    # cosine per sample is invariant to each sample's scale, global cosine is not
    scaled = small * np.array([1, 10, 100, 1000])[:, None, None, None]
    np.testing.assert_allclose(M.cosine_per_sample(ref, scaled), M.cosine_per_sample(ref, small), rtol=1e-12)
    with pytest.raises(OnnxoptError, match="shapes differ"):
        M.fidelity(ref, ref[:2])


def test_stream_matches_whole_and_compare_fields():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((6, 5))
    cand = ref + 0.05 * rng.standard_normal(ref.shape)
    s = M.Stream()
    for i in range(0, 6, 2):
        s.update(ref[i:i + 2], cand[i:i + 2])
    res = s.result()
    whole = compare_metrics(ref, cand)
    assert set(whole) == {"cosine", "snr_db", "max_abs"}
    for k in whole:
        assert res[k] == pytest.approx(whole[k], rel=1e-12)
    per = M.cosine_per_sample(ref, cand)
    assert res["cosine_mean"] == pytest.approx(per.mean()) and res["cosine_worst"] == pytest.approx(per.min())
    r = ref.ravel()
    c = cand.ravel()
    assert whole["cosine"] == pytest.approx(r @ c / np.linalg.norm(r) / np.linalg.norm(c), rel=1e-12)
    assert whole["snr_db"] == pytest.approx(10 * np.log10((r @ r) / np.sum((c - r) ** 2)), rel=1e-12)


def test_search_cosine_is_the_per_sample_cosine():
    """--auto's figures come from this module: mean per-sample cosine, its standard error, held-out rows, top-1;
    a candidate with any non-finite value scores -1 on every sample (never passes a target)."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(6, 10))
    cand = ref + 0.3 * rng.normal(size=ref.shape)
    per = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(ref, cand)])
    np.testing.assert_allclose(M.cosine_scores(ref, cand), per, rtol=1e-12)
    assert M.mean_cosine_score(ref, cand) == pytest.approx(per.mean(), abs=1e-12)
    s = M.cosine_summary(ref, cand)
    assert s["cosine"] == pytest.approx(per.mean()) and s["n"] == 6
    assert s["cosine_se"] == pytest.approx(per.std(ddof=1) / np.sqrt(6))
    assert s["top1"] == pytest.approx(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    h = M.cosine_summary(ref, cand, held=2)
    assert h["cosine"] == pytest.approx(per[-2:].mean()) and h["n"] == 2 and h["cosine_all"] == pytest.approx(per.mean())
    bad = cand.copy()
    bad[0, 0] = np.nan
    assert np.all(M.cosine_scores(ref, bad) == -1.0) and M.cosine_summary(ref, bad)["cosine"] == -1.0
    assert np.isnan(M.cosine_per_sample(ref, bad)[0])   # the report's metric stays NaN for that sample
