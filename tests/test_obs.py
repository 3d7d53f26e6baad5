"""The one OBS solver (obs.py): damping retries, and singular Hessians never reach the user (SparseGPT falls
back to magnitude, GPTQ to the searched scales without error feedback)."""
from __future__ import annotations

import logging
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import calib, modelfile, obs
from onnxopt.rewrite import awq, sparsity
from onnxopt.formats import INT4
from onnxopt.quant import int4_weights

F = TensorProto.FLOAT


def test_hinv_upper_is_the_factor_of_the_damped_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16))
    h = x.T @ x
    u = obs.hinv_upper(h, 0.01)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(16)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-8, atol=1e-12)
    assert np.allclose(u, np.triu(u))


def test_rank_one_hessian_with_a_dead_channel_is_solved_by_damping():
    row = np.arange(1.0, 9.0)
    row[3] = 0.0  # an input channel that is always zero
    h = np.outer(row, row) * 32  # 32 identical calibration rows
    fixed, dead = obs.undead(h)
    assert dead.tolist() == [i == 3 for i in range(8)]
    u = obs.hinv_upper(fixed, 0.01)
    assert np.all(np.isfinite(u)) and np.all(np.diag(u) > 0)


@pytest.mark.parametrize("bad", ["nan", "indefinite"])
def test_singular_hessian_raises_its_own_error(bad):
    h = np.eye(4)
    if bad == "nan":
        h[1, 2] = np.nan
    else:
        h[0, 0] = -1e9  # not positive definite whatever the damping
    with pytest.raises(obs.SingularHessian):
        obs.hinv_upper(h, 0.01)


def _mm_model(k=32, n=16, sqrt=False):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Sqrt", ["x"], ["s"], name="sqrt")] if sqrt else []
    nodes.append(helper.make_node("MatMul", ["s" if sqrt else "x", "w"], ["y"], name="fc"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["n", 8, k])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _identical_rows(model, k=32, zero=3):
    """Every calibration row the same, one input channel always zero: H has rank 1."""
    row = np.linspace(0.5, 2.0, k).astype(np.float32)
    row[zero] = 0.0
    x = np.broadcast_to(row, (4, 8, k)).copy()
    return calib.CalibData(calib.input_specs(model), [lambda: {"x": x}])


def test_sparsegpt_on_identical_rows_and_a_zero_channel():
    model = _mm_model()
    graph = modelfile.import_graph(model)
    rep = sparsity.sparsify(graph, method="sparsegpt", data=_identical_rows(model), min_params=0, progress=False)
    row = rep["layers"][0]
    assert row["method"] == "sparsegpt" and np.isfinite(row["output_error"])
    w = graph.tensors()["w"].values
    assert np.all(np.isfinite(w)) and sparsity.is_2_4(w, 0)


def test_sparsegpt_falls_back_to_magnitude_on_a_nan_hessian(caplog):
    model = _mm_model(sqrt=True)  # sqrt of negative inputs: NaN activations, a NaN Hessian
    graph = modelfile.import_graph(model)
    data = calib.CalibData.random(calib.input_specs(model), 2, shapes={"x": (1, 8, 32)})
    with caplog.at_level(logging.WARNING):
        rep = sparsity.sparsify(graph, method="sparsegpt", data=data, min_params=0, progress=False)
    row = rep["layers"][0]
    assert row["status"] == "pruned" and row["method"] == "magnitude" and "magnitude fallback" in row["reason"]
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(graph.tensors()["w"].values, np.where(sparsity.keep_mask(np.abs(w0), 0), w0, 0))
    assert "pruning this layer by magnitude" in caplog.text


def _int4_config(**kw):
    base = dict(awq="full", block_size=16, int8_layers=None, exclude=(), op_types=("MatMul", "Gemm"),
                high_precision="fp32", provider="cpu", memory_budget_mb=256, progress=False)
    base.update(kw)
    return base


def test_gptq_on_identical_rows_and_a_zero_channel_completes():
    model = onnx.shape_inference.infer_shapes(_mm_model())
    graph = modelfile.import_graph(model)
    data = _identical_rows(model)
    data = calib.CalibData(data.specs, [lambda: {"x": np.broadcast_to(np.linspace(0.5, 2.0, 32, dtype=np.float32)
                                                                    * (np.arange(32) != 3), (16, 8, 32)).copy()}])
    rep = int4_weights.quantize_int4(graph, data, **_int4_config())
    assert "gptq_error" in rep["awq_search"]["layers"]["fc"]
    assert np.isfinite(rep["awq_search"]["layers"]["fc"]["gptq_error"])


def test_gptq_keeps_the_searched_scales_when_the_hessian_is_singular(caplog):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    h = np.eye(32, dtype=np.float32)
    h[0, 0] = np.nan
    clips = {"fc": np.full((2, 8), 0.9, np.float32)}
    entry = {}
    with caplog.at_level(logging.WARNING):
        awq._error_feedback(types.SimpleNamespace(name="fc"), INT4, w, h, clips, 16, "fp32", entry)
    assert isinstance(clips["fc"], np.ndarray)  # clip ratios kept: round-to-nearest with the searched scales
    assert entry["gptq"].startswith("skipped") and "without error feedback" in caplog.text
    with pytest.raises(obs.SingularHessian):
        awq.gptq_round(w, h, INT4.block_scales(w, 16), 16)


def test_both_routes_to_the_inverse_agree():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 24))
    h = x.T @ x
    np.testing.assert_allclose(obs.hinv_upper(h, 0.01), obs.hinv_upper(h, 0.01, via_cholesky=False), rtol=1e-7, atol=1e-10)
