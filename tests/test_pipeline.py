"""The pass pipeline: recipes stack through the public API, every option and combination is checked when
the recipe is built, the Runner owns loading, the report and the save."""
from dataclasses import dataclass

import numpy as np
import pytest

import onnxopt
import tiny
from onnxopt import AWQ, QDQ, Autocast, Int4, SmoothQuant, Sparsify, modelfile, ort, presets
from onnxopt.rewrite import sparsity
from onnxopt.calib import AbsMax
from onnxopt.errors import OnnxoptError
from onnxopt.pass_protocol import PassBase
from onnxopt.pipeline import Runner


@pytest.fixture
def tr(tmp_path):
    src = tiny.save(tiny.transformer(), tmp_path / "tr.onnx")
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, ids=rng.integers(0, 50, (6, 2, 16)).astype(np.int64))
    feed = {"ids": rng.integers(0, 50, (2, 16)).astype(np.int64)}
    return src, data, feed


def _out(path, feed):
    return ort.session(modelfile.load(path)).run(None, feed)[0]


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _all_2_4(path) -> bool:
    rows = [r for r in sparsity.report(modelfile.import_graph(modelfile.load(path))) if r.get("eligible", True)]
    return bool(rows) and all(r["is_2_4"] for r in rows)


def test_two_orders_through_public_api_match_staged_runs_and_ort(tmp_path, tr):
    src, data, feed = tr
    sp = Sparsify("2:4", min_params=0)
    a = onnxopt.run([sp, SmoothQuant(0.8), QDQ("int8"), Autocast("fp32")], src, tmp_path / "a.onnx", data=str(data),
                    progress=False)
    b = onnxopt.run([SmoothQuant(0.8), sp, QDQ("int8"), Autocast("fp32")], src, tmp_path / "b.onnx", data=str(data),
                    progress=False)
    # Order A staged through files (prune, save, then smooth + quantize) gives the same graph numbers as one run.
    onnxopt.run([sp], src, tmp_path / "s.onnx", progress=False)
    staged = onnxopt.run([SmoothQuant(0.8), QDQ("int8"), Autocast("fp32")], tmp_path / "s.onnx", tmp_path / "a2.onnx",
                         data=str(data), progress=False)
    ref, ya, yb = _out(src, feed), _out(a.path, feed), _out(b.path, feed)
    np.testing.assert_allclose(_out(staged.path, feed), ya, rtol=0, atol=1e-6)
    # Both orders prune every eligible weight to 2:4 and quantize; INT8 stays close to the pruned FP32 model
    # (2:4 of random weights costs more than quantization does).
    assert _all_2_4(a.path) and _all_2_4(b.path)
    assert a.report["coverage"]["quantized"] == b.report["coverage"]["quantized"] > 0
    assert _cos(ya, _out(tmp_path / "s.onnx", feed)) > 0.99
    assert _cos(ya, ref) > 0.9 and _cos(yb, ref) > 0.9
    # The order matters: pruning after smoothing keeps other weights than pruning first.
    assert not np.allclose(ya, yb)
    assert [p["pass"] for p in b.report["recipe"]] == ["smoothquant", "sparsity", "qdq", "autocast"]
    assert set(b.report["timings_s"]) >= {"smoothquant", "sparsity", "qdq", "autocast", "save", "total"}


def test_readme_recipe_with_fp16_runs_under_ort(tmp_path, tr):
    src, data, feed = tr
    res = onnxopt.run([Sparsify("2:4", min_params=0), SmoothQuant(0.8), QDQ("int8"), Autocast("fp16")], src,
                      tmp_path / "out.onnx", data=str(data), progress=False)
    y = _out(res.path, feed)
    assert y.dtype == np.float32 and np.isfinite(y).all()  # graph I/O kept, FP16 inside
    assert _cos(y, _out(src, feed)) > 0.9 and res.report["autocast"]["dtype"] == "fp16"


def test_legacy_quantize_is_the_same_recipe(tmp_path, tr):
    src, data, feed = tr
    cfg = onnxopt.QuantConfig(mode="int8", smoothquant=0.8, sparsity="2:4", progress=False, high_precision="fp32")
    legacy = onnxopt.quantize(src, tmp_path / "l.onnx", config=cfg, data=str(data))
    direct = onnxopt.run([Sparsify("2:4"), SmoothQuant(0.8), QDQ("int8"), Autocast("fp32")], src, tmp_path / "d.onnx",
                         data=str(data), progress=False)
    np.testing.assert_array_equal(_out(legacy.path, feed), _out(direct.path, feed))
    assert legacy.report["mode"] == "int8" and legacy.report["config"]["smoothquant"] == 0.8


def test_int4_with_awq_pass_reports_both(tmp_path, tr):
    src, data, feed = tr
    res = onnxopt.run([AWQ("lite"), Int4(block_size=32)], src, tmp_path / "q4.onnx", data=str(data), progress=False)
    assert res.report["int4"]["awq"] == "lite" and res.report["awq"]["method"] == "lite"
    assert res.report["coverage"]["quantized"] == len(res.report["int4"]["layers"]) > 0
    assert _cos(_out(res.path, feed), _out(src, feed)) > 0.95


@dataclass
class _Watch(PassBase):
    """A user pass: asks the Q/DQ pass's one calibration run for max |x| of a tensor."""
    tensor: str = "ln"
    name = "watch"

    def run(self, ctx):
        self.reducer = AbsMax()
        ctx.extra_reducers.setdefault(self.tensor, []).append(self.reducer)
        return {"tensor": self.tensor}


def test_extra_reducers_ride_on_the_qdq_calibration(tmp_path, tr):
    src, data, _ = tr
    watch = _Watch()
    onnxopt.run([watch, QDQ("fp8")], src, tmp_path / "q.onnx", data=str(data), progress=False)
    m = modelfile.load(src)
    m.graph.output.add().name = "ln"  # the same tensor fetched by ORT directly
    sess = ort.session(m)
    with np.load(data) as z:
        expect = max(float(np.abs(sess.run(["ln"], {"ids": x})[0]).max()) for x in z["ids"])
    assert watch.reducer.value == pytest.approx(expect, rel=1e-6)


def test_verify_hook_and_in_memory_model(tmp_path, tr):
    src, data, feed = tr
    seen = []
    res = Runner([Autocast("fp16")], verify=lambda path, rep: seen.append(path) or "ok", progress=False).run(src, tmp_path / "h.onnx")
    assert seen == [res.path] and res.report["verify"] == "ok" and res.report["output_bytes"] > 0
    mem = Runner([Autocast("fp16")], progress=False).run(modelfile.load(src))  # no output: the model comes back
    assert mem.path is None and ort.session(mem.model).run(None, feed)[0].shape == (2, 16, 64)


def test_presets_return_recipes():
    r = presets.recipe("sdxl", "int8")
    assert [type(p) for p in r.passes] == [SmoothQuant, QDQ, Autocast] and r.max_batch == 1
    assert r.passes[1].calib_method == "percentile" and not r.passes[1].quantize_mha
    assert [type(p) for p in presets.recipe("sdxl", "fp8").passes] == [QDQ, Autocast]


@pytest.mark.parametrize("build, needle", [
    (lambda: Sparsify("3"), "pattern"),
    (lambda: Sparsify(method="random"), "sparsity-method"),
    (lambda: Sparsify(exclude=["["]), "--exclude"),
    (lambda: Sparsify(min_params=-1), "--min-params"),
    (lambda: SmoothQuant(1.5), "[0, 1]"),
    (lambda: QDQ("int4"), "Q/DQ mode"),
    (lambda: QDQ("int8", percentile=150), "percentile"),
    (lambda: QDQ("fp8", exclude=("(",)), "--exclude"),
    (lambda: QDQ("fp8", op_types=("Add",)), "--op-types"),
    (lambda: Int4(block_size=100), "--block-size"),
    (lambda: Int4(int8_layers="("), "--int8-layers"),
    (lambda: AWQ("best"), "--awq"),
    (lambda: Autocast("fp64"), "precision"),
])
def test_pass_options_are_checked_when_built(build, needle):
    with pytest.raises(OnnxoptError, match=None) as e:
        build()
    assert needle in str(e.value)


@pytest.mark.parametrize("recipe, needle", [
    ([], "empty recipe"),
    ([SmoothQuant("auto"), QDQ("fp8")], "give an alpha"),
    ([SmoothQuant(0.5), Int4()], "--fp8/--int8 only"),
    ([AWQ("full"), QDQ("int8")], "--int4 only"),
    ([AWQ("full")], "--int4 only"),
    ([QDQ("int8"), Int4()], "quantizes once"),
    ([Autocast(), QDQ("int8")], "last pass"),
    (["qdq"], "not a pass"),
])
def test_recipes_are_checked_before_any_model_is_read(recipe, needle):
    with pytest.raises(OnnxoptError) as e:
        Runner(recipe, calib_random=2)
    assert needle in str(e.value)


@pytest.mark.parametrize("settings, needle", [
    (dict(data="calib.npz", calib_random=2), "both given"),
    (dict(calib_random=-1), "--calib-random"),
    (dict(calib_random=2, memory_budget_mb=0), "--memory-budget"),
    (dict(calib_random=2, max_batch=0), "--max-batch"),
    (dict(data="calib.npz", calib_batches=-3), "--calib-batches must be > 0"),
    (dict(calib_random=2, calib_batches=2), "--calib-batches limits --calib data"),
    (dict(calib_random=2, seed=-1), "--seed"),
    (dict(calib_random=2, provider="tpu"), "provider"),
    (dict(data="/nonexistent/calib.npz"), "does not exist"),
    (dict(), "no calibration data"),
])
def test_runner_settings_are_checked(tmp_path, settings, needle):
    if settings.get("data") == "calib.npz":
        settings["data"] = str(tmp_path)
    with pytest.raises(OnnxoptError) as e:
        Runner([QDQ("int8")], **settings)
    assert needle in str(e.value)
