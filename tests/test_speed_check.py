"""Issue 25 (speed2): the load-only finite check without reading weights, and its strictness."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tiny
from onnxopt import finite, modelfile
from onnxopt.cast import autocast
from onnxopt.errors import OnnxoptError


def _fp16_cnn(tmp_path):
    g = modelfile.import_graph(tiny.cnn())
    autocast.to_low_precision(g, "fp16")
    path = tmp_path / "cnn16.onnx"
    modelfile.save(modelfile.export_graph(g), path, external_data=True)
    return path


def test_weightless_keeps_the_graph_and_types_without_weight_bytes(tmp_path):
    m = modelfile.load(_fp16_cnn(tmp_path))
    light = finite.weightless(m)
    assert [n.name for n in light.graph.node] == [n.name for n in m.graph.node]
    big = {t.name: t for t in m.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
    assert big and not any(t.name in big for t in light.graph.initializer)
    inputs = {i.name: i for i in light.graph.input}
    for name, t in big.items():
        tt = inputs[name].type.tensor_type
        assert tt.elem_type == t.data_type and [d.dim_value for d in tt.shape.dim] == list(t.dims)
    assert light.ByteSize() < 20_000  # the weights stayed on disk
    assert len(m.graph.initializer) == len(big) + len(light.graph.initializer)  # the source is untouched


def test_check_loads_loads_the_written_fp16_graph(tmp_path):
    assert finite.check_loads(modelfile.load(_fp16_cnn(tmp_path))) == "written"


def test_check_loads_refuses_what_ort_cannot_load():
    # Float and float16 into one Add (caught by the checker), and a Conv whose weight has the wrong rank
    # (caught only by ORT's session): both internal errors, as before.
    g = h.make_graph([h.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16), h.make_node("Add", ["x", "x16"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    with pytest.raises(OnnxoptError, match="internal error"):
        finite.check_loads(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    w = nh.from_array(np.ones((4, 3, 3), np.float32), "w")  # 3-D weight for a 2-D Conv
    g = h.make_graph([h.make_node("Conv", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(OnnxoptError, match="internal error"):
        finite.check_loads(m)


def test_check_data_refuses_truncated_or_missized_weights(tmp_path):
    path = _fp16_cnn(tmp_path)
    m = modelfile.load(path)
    finite.check_data(m)
    t = next(t for t in m.graph.initializer if onnx.external_data_helper.uses_external_data(t))
    for e in t.external_data:
        if e.key == "length":
            e.value = str(int(e.value) - 2)
    with pytest.raises(OnnxoptError, match=f"weight '{t.name}'"):
        finite.check_loads(m)
    m = modelfile.load(path)
    with open(str(path) + ".data", "r+b") as f:  # the data file lost its tail
        f.truncate(100)
    with pytest.raises(OnnxoptError, match="internal error: weight"):
        finite.check_loads(m)
    e = nh.from_array(np.ones((64, 32), np.float16), "e")
    e.raw_data = e.raw_data[:-2]
    g = h.make_graph([h.make_node("MatMul", ["x", "e"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT16, [1, 64])],
                     [h.make_tensor_value_info("y", T.FLOAT16, None)], [e])
    with pytest.raises(OnnxoptError, match="weight 'e' holds 4094 bytes where 4096"):
        finite.check_data(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))


def test_convert_without_data_checks_loading_only_and_writes_the_same(tmp_path):
    from onnxopt import api
    src = tiny.save(tiny.transformer(), tmp_path / "dyn.onnx")  # dynamic shapes: no generated samples
    report = {}
    out = api.convert(src, tmp_path / "dyn16.onnx", report=report)
    assert report["finite"] == {"checked": "load only (no data to run)", "loaded": "written"}
    again = finite.check_loads(modelfile.load(out))
    assert again == "written"


def test_bf16_on_the_cpu_loads_through_the_emulation(tmp_path):
    # ORT's CPU provider has no BF16 Conv: the written graph does not load there, its exact emulation does.
    g = modelfile.import_graph(tiny.cnn())
    autocast.to_low_precision(g, "bf16")
    m = modelfile.export_graph(g, opset=22)
    assert finite.check_loads(m) == "emulated"


def test_auto_ships_the_verified_copy_byte_for_byte(tmp_path):
    # --auto writes the verified plan on a copy of the graph (import(export(graph))) and ships that copy instead
    # of writing the graph a second time: the copy's export must be byte-identical to writing the graph itself.
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_auto_written import _resnet
    from onnxopt import autoquant, pipeline
    from onnxopt.passes import AutoQuant
    from onnxopt.quant import writer
    path = tmp_path / "res.onnx"
    feeds = _resnet(path)
    graph = modelfile.import_graph(pipeline.load(str(path), 21))
    p = AutoQuant(("fp8", "int8"), bits=8)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    amax, means = autoquant.calibrate(graph, feeds, cands, provider="cpu", memory_budget_mb=512, progress=False)
    plan = writer.QuantPlan.from_mix({"conv0": "fp8", "conv1": "int8", "conv2": "fp8"}, configs=p.configs(),
                                     amax=amax, means=means)
    copy = modelfile.import_graph(modelfile.export_graph(graph))
    info_copy = writer.write(copy, plan, high_precision="fp16")
    info = writer.write(graph, plan, high_precision="fp16")
    assert info_copy == info
    a = modelfile.export_graph(copy, opset=21)
    b = modelfile.export_graph(graph, opset=21)
    assert a.SerializeToString() == b.SerializeToString()


def _cnn_pair(tmp_path):
    from onnxopt.api import QuantConfig, quantize
    src, calib = tiny.model_and_calib(tmp_path, tiny.cnn(), (6, 3, 16, 16))
    out = quantize(src, tmp_path / "q.onnx", config=QuantConfig(mode="fp8", progress=False), data=str(calib)).path
    return src, out, calib


def test_compare_equals_a_numpy_reference_with_sessions_built_together(tmp_path):
    # Both sessions alive at once (small models on the CPU fit the budget): the numbers are numpy's over ORT's
    # outputs, batch by batch, as when the models ran one after the other.
    from onnxopt import ort
    from onnxopt.compare import compare
    src, out, calib = _cnn_pair(tmp_path)
    assert ort.fit_together([modelfile.load(src), modelfile.load(out)], "cpu", 4096)
    res = compare(src, out, str(calib), max_batch=2)
    x = np.load(calib)["x"]
    ref = ort.session(modelfile.load(src)).run(None, {"x": x})[0].astype(np.float64)
    cand = ort.session(modelfile.load(out)).run(None, {"x": x})[0].astype(np.float64)
    (name, m), = res.items()
    assert res.samples == 6  # batches: one sample each
    assert m["cosine"] == pytest.approx(float(np.dot(ref.ravel(), cand.ravel()) / np.linalg.norm(ref) / np.linalg.norm(cand)), abs=1e-9)
    assert m["snr_db"] == pytest.approx(float(10 * np.log10(np.sum(ref ** 2) / np.sum((cand - ref) ** 2))), abs=1e-4)
    assert m["max_abs"] == pytest.approx(float(np.abs(cand - ref).max()), abs=1e-6)


def test_fit_together_follows_the_budget(tmp_path):
    from onnxopt import ort
    src, out, _ = _cnn_pair(tmp_path)
    models = [modelfile.load(src), modelfile.load(out)]
    need = sum(modelfile.model_bytes(m) for m in models)
    assert ort.fit_together(models, "cpu", need // 2**20 + 1)
    assert not ort.fit_together(models, "cpu", max(need // 2**20 - 1, 0))


def test_sampler_comparison_with_the_candidate_built_alongside(tmp_path):
    # The candidate's session built while the reference samples gives what one model at a time gives.
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import test_sampler as ts
    from onnxopt import ort
    from onnxopt import sampler as S
    ref, cand = tmp_path / "r.onnx", tmp_path / "c.onnx"
    onnx.save(ts._eps_model(), ref)
    onnx.save(ts._eps_model(ts.W_EPS * 1.01), cand)
    assert ort.fit_together([modelfile.load(ref), modelfile.load(cand)], "cpu", 4096)
    opts = S.SamplerOptions("euler", steps=3, guidance=2.0, seeds=(0, 1))
    got = S.compare_sampled(str(ref), str(cand), opts)
    r_m, c_m = modelfile.load(ref), modelfile.load(cand)
    r = S.roles(r_m, opts)
    one = S.compare_trajectories(S.run_all(r_m, r, opts, None, "cpu", "r"), S.run_all(c_m, r, opts, None, "cpu", "c"), opts)
    np.testing.assert_array_equal(got.candidate, one.candidate)
    np.testing.assert_array_equal(got.reference, one.reference)
    assert got.final.psnr_mean == one.final.psnr_mean


def test_run_fetched_through_io_binding_equals_run():
    # The CUDA path (I/O binding), exercised on the CPU: same numbers, a 0-d input stays 0-d, errors are one line.
    from onnxopt import ort
    g = h.make_graph([h.make_node("Mul", ["x", "s"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2, 3]), h.make_tensor_value_info("s", T.FLOAT, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    sess = ort.session(m)
    feed = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1], "s": np.asarray(2.5, np.float32)}
    got = ort.run_fetched(sess, ["y"], feed, bind=True)
    np.testing.assert_array_equal(got[0], sess.run(["y"], feed)[0])
    with pytest.raises(OnnxoptError, match="ONNX Runtime failed running"):
        ort.run_fetched(sess, ["y"], {"x": np.zeros((2, 4), np.float32), "s": feed["s"]}, bind=True)
