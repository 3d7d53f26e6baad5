import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tiny
import onnxopt
from onnxopt import api
from onnxopt import modelfile, ort
from onnxopt.cast import autocast


def _run(path, feed):
    return ort.session(modelfile.load(path)).run(None, feed)


def test_fp16_baseline_matches_fp32_and_keeps_io_types(tmp_path):
    src = tiny.save(tiny.transformer(), tmp_path / "m.onnx")
    out = onnxopt.convert(src, tmp_path / "m16.onnx")
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == T.INT64
    assert m.graph.output[0].type.tensor_type.elem_type == T.FLOAT
    assert {t.data_type for t in m.graph.initializer} <= {T.FLOAT16, T.INT64}
    feed = {"ids": np.random.default_rng(0).integers(0, 50, (2, 16))}
    (a,), (b,) = _run(src, feed), _run(out, feed)
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)


def test_io_dtype_converts_graph_io(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    out = api.convert(src, tmp_path / "m16.onnx", io_dtype="fp16")
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == T.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == T.FLOAT16
    assert not [n for n in m.graph.node if n.op_type == "Cast"]


def test_mask_constants_saturate_instead_of_overflowing(tmp_path):
    # (1 - mask) * finfo(float32).min, as transformers builds attention masks: inf would turn 0 * inf into NaN.
    nodes = [h.make_node("Sub", ["one", "mask"], ["inv"]), h.make_node("Mul", ["inv", "neg"], ["bias"]),
             h.make_node("Add", ["x", "bias"], ["s"]), h.make_node("Softmax", ["s"], ["y"])]
    inits = [nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(np.finfo(np.float32).min, np.float32), "neg")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 4]), h.make_tensor_value_info("mask", T.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    src = tiny.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "m.onnx")
    out = onnxopt.convert(src, tmp_path / "m16.onnx")
    feed = {"x": np.zeros((2, 4), np.float32), "mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)}
    (y,) = _run(out, feed)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[0], [0.5, 0.5, 0, 0], atol=1e-3)


def test_keep_fp32_ops_get_casts_around_them(tmp_path):
    src = tiny.save(tiny.transformer(), tmp_path / "m.onnx")
    out = api.convert(src, tmp_path / "m16.onnx", keep_fp32_ops=("LayerNormalization",))
    m = onnx.load(str(out))
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    inits = {t.name: t for t in m.graph.initializer}
    assert inits[ln.input[1]].data_type == T.FLOAT
    producer = {o: n for n in m.graph.node for o in n.output}
    assert producer[ln.input[0]].op_type == "Cast"
    feed = {"ids": np.random.default_rng(0).integers(0, 50, (2, 16))}
    np.testing.assert_allclose(_run(src, feed)[0], _run(out, feed)[0], atol=2e-2, rtol=2e-2)


def test_fp32_view_restores_a_runnable_fp32_graph(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    out = onnxopt.convert(src, tmp_path / "m16.onnx", dtype="bf16")
    view = autocast.fp32_view(modelfile.load(out))
    assert T.BFLOAT16 not in {t.data_type for t in view.graph.initializer}
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (a,) = _run(src, {"x": x})
    (b,) = ort.session(view).run(None, {"x": x})
    np.testing.assert_allclose(a, b, atol=2e-2)


def test_dq_shared_by_fp32_and_fp16_layers_is_split(tmp_path):
    """One activation Q/DQ read by a MatMul kept FP32 and one converted: the converted one gets its own DQ with an
    FP16 scale (TensorRT-RTX rejects a MatMul whose activation scale is FP32 behind a Cast and whose weight
    scale is FP16), the kept one dequantizes to FP32; outputs still match ORT's FP32 run."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq")]
    inits = [nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(0, np.int8), "xz")]
    for name in ("keep", "low"):
        inits += [nh.from_array(rng.integers(-127, 128, (16, 8)).astype(np.int8), f"{name}_wq"),
                  nh.from_array(np.array(0.01, np.float32), f"{name}_ws")]
        nodes += [h.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_ws"], [f"{name}_w"]),
                  h.make_node("MatMul", ["xd", f"{name}_w"], [f"y_{name}"], name=name)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 16])],
                     [h.make_tensor_value_info(f"y_{n}", T.FLOAT, [4, 8]) for n in ("keep", "low")], inits)
    src = h.make_model(g, opset_imports=[h.make_opsetid("", 19)])
    graph = modelfile.import_graph(onnx.ModelProto.FromString(src.SerializeToString()))  # import may take the weights
    autocast.to_low_precision(graph, "fp16", keep_fp32_nodes=("keep",))
    nodes = {n.name: n for n in graph.nodes}
    scale = lambda mm: mm.inputs[0].inputs[0]   # noqa: E731  (the DQ feeding the MatMul's activation)
    assert scale(nodes["keep"]).op == scale(nodes["low"]).op == "DequantizeLinear" and scale(nodes["keep"]) is not scale(nodes["low"])
    assert scale(nodes["keep"]).inputs[1].dtype == np.float32 and scale(nodes["low"]).inputs[1].dtype == np.float16
    assert scale(nodes["low"]).inputs[0] is scale(nodes["keep"]).inputs[0]       # one Q, two DQs
    m16 = modelfile.export_graph(graph)
    modelfile.stamp_ir_version(m16)
    out = tiny.save(m16, tmp_path / "m16.onnx")
    feed = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    ref = ort.session(src).run(None, feed)
    for a, b in zip(ref, _run(out, feed)):
        np.testing.assert_allclose(a, b.astype(np.float32), rtol=1e-2, atol=1e-2 * np.abs(a).max())  # FP16 sums
