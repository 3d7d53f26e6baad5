"""Issue 22 item 0: activations beyond FP16 (1e8) before normalisations (tests/huge.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import huge
from onnxopt import api, calib, modelfile, opset_upgrade
from onnxopt.cast import precision, prescale
from onnxopt import ort as ortx
from onnxopt.quant import qdq


def test_export_leaves_the_source_model_names_alone():
    """Autocast renames a shared lazy constant (w -> w_fp32); graphsurgeon's export renamed the source
    TensorProto too, and the runner's FP32 reference then read a name that no longer existed."""
    m = huge.model()
    g = modelfile.import_graph(m)
    g.tensors()["gn_scale"].name = "gn_scale_fp32"
    out = modelfile.export_graph(g)
    assert "gn_scale" in {t.name for t in m.graph.initializer}
    assert "gn_scale_fp32" in {t.name for t in out.graph.initializer}
    ortx.session(m, level="disable")  # the source still loads


def test_fp8_scale_beyond_fp16_stays_finite():
    s = qdq.activation_scale(1e9, "fp8", "fp16")
    assert np.isfinite(s) and np.isclose(s, 1e9 / 448, rtol=1e-6)
    assert qdq.activation_scale(100.0, "fp8", "fp16") == np.float16(100.0 / 448)


def _ranges(model):
    g = modelfile.import_graph(model)
    red = precision.range_reducers(g)
    batch = 2 if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2 else 1
    calib.collect_graph(g, calib.CalibData(calib.input_specs(model), [lambda: huge.calib(8)], batch_size=batch), red)
    return g, precision.ranges_of(red)


@pytest.mark.parametrize("batch", ["N", 2])
def test_prescale_is_exact_in_fp32_and_brings_norm_inputs_into_fp16(batch):
    model = opset_upgrade.infer_shapes(huge.model(batch))
    g, ranges = _ranges(model)
    new, plan = prescale.rescale(g, ranges, "fp16")
    scaled = {n for _, names, _ in plan.classes for n in names}
    assert {"hsum", "c2", "sk", "m1b"} <= scaled  # part A and part C
    assert "y" not in scaled                          # graph outputs are never scaled
    # SiLU x·sigmoid(x) on a scaled x: the product takes the factor, the sigmoid reads x · k (kept FP32 by range)
    assert all(n.inputs[0].inputs[0].op == "Mul" for n in g.nodes if n.op == "Sigmoid" and n.inputs[0].name.startswith(("e", "se")))
    safe = precision.FMAX["fp16"] * precision.SAFE_FRACTION
    assert all(new[n] <= safe for n in scaled if n in new)
    feed = huge.calib(2, seed=3)
    ref = ortx.session(model, level="disable").run(None, feed)
    got = ortx.session(modelfile.export_graph(g), level="disable").run(None, feed)
    for a, b in zip(ref, got):  # powers of two: exact but for epsilon (eps / k^2, floored at 2^-24)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    eps = {n.name: n.attrs["epsilon"] for n in g.nodes if n.op in ("InstanceNormalization", "LayerNormalization")}
    assert eps["gnC_in"] == pytest.approx(1e-5) and eps["gnA_in"] == prescale.EPS_FLOOR


def test_fp8_on_huge_activations_fails_no_more(tmp_path):
    """The terrain UNet's failure: --fp8 gave 'Node input ... is not a graph input' (dangling after autocast)."""
    src = tmp_path / "m.onnx"
    onnx.save(huge.model(), src)
    np.savez(tmp_path / "c.npz", **huge.calib(8))
    res = api.quantize(str(src), tmp_path / "o.onnx", config=api.QuantConfig(progress=False),
                           data=str(tmp_path / "c.npz"))
    ac = res.report["autocast"]
    assert ac["prescaled_tensors"] >= 6
    out = onnx.load(tmp_path / "o.onnx")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in opset_upgrade.infer_shapes(out).graph.value_info}
    assert types["hsum"] == onnx.TensorProto.FLOAT16 and types["m1b"] == onnx.TensorProto.FLOAT16
    # SiLU of 1e8: scaled down into FP16; only sigmoid's input x · k truly leaves FP16 and stays FP32
    assert types["se"] == onnx.TensorProto.FLOAT16
    unscaled = [n for n in types if n.endswith("_unscaled")]
    assert unscaled and all(types[n] == onnx.TensorProto.FLOAT for n in unscaled)
