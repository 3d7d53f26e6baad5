import hashlib
import os

import numpy as np
import onnx
import pytest

import tiny
from onnxopt import atomicfile, modelfile, ort
from onnxopt.errors import OnnxoptError


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_roundtrip_inline_stamps_ir_that_ort_reads(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    m = modelfile.load(src)
    m.ir_version = 14  # what onnx 1.23 would stamp
    out = modelfile.save(m, tmp_path / "o.onnx")
    saved = onnx.load(str(out))
    assert saved.ir_version <= modelfile.MAX_IR_VERSION
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert ort.session(modelfile.load(out)).run(None, {"x": x})[0].shape == (1, 10)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_external_data_roundtrip_is_lazy_and_page_aligned(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(tiny.cnn(), str(src), save_as_external_data=True, location="ext.bin", size_threshold=0)
    m = modelfile.load(src)
    # Loading reads no weights: external tensors keep only their (absolute) locations.
    assert all(not t.raw_data for t in m.graph.initializer)
    out = modelfile.save(m, tmp_path / "sub" / "copy.onnx", external_data=True)
    saved = onnx.load(str(out), load_external_data=False)
    infos = [onnx.external_data_helper.ExternalDataInfo(t) for t in saved.graph.initializer
             if onnx.external_data_helper.uses_external_data(t)]
    assert infos and all(i.location == "copy.onnx.data" and i.offset % 4096 == 0 for i in infos)
    ref = onnx.load(str(src))
    got = onnx.load(str(out))
    for a, b in zip(ref.graph.initializer, got.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_missing_and_truncated_external_data(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(tiny.cnn(), str(src), save_as_external_data=True, location="ext.bin", size_threshold=0)
    data = tmp_path / "ext.bin"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OnnxoptError, match="truncated"):
        modelfile.load(src)
    data.unlink()
    with pytest.raises(OnnxoptError, match="missing"):
        modelfile.load(src)


def test_corrupt_and_truncated_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(OnnxoptError, match="not a readable ONNX model|no nodes"):
        modelfile.load(bad)
    good = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(open(good, "rb").read()[:200])
    with pytest.raises(OnnxoptError):
        modelfile.load(cut)


def test_output_equal_to_input_is_refused_and_input_untouched(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    before = _digest(src)
    with pytest.raises(OnnxoptError, match="is the input"):
        modelfile.save(modelfile.load(src), src, input_path=src)
    assert _digest(src) == before


def test_exported_graphs_dequantize_each_weight_just_before_its_layer(tmp_path):
    """graphsurgeon's toposort groups all weight DequantizeLinear nodes; export_graph moves each to just
    before its reader, so ORT (graph order) never holds every dequantized weight at once."""
    import onnxopt
    src = tiny.save(tiny.transformer(), tmp_path / "t.onnx")
    res = onnxopt.quantize(src, tmp_path / "q.onnx", config=onnxopt.QuantConfig(mode="int8", progress=False),
                           calib_random=2, shapes={"ids": (2, 16)})
    m = modelfile.load(res.path)
    inits = {t.name for t in m.graph.initializer}
    nodes = list(m.graph.node)
    weight_dq = [k for k, n in enumerate(nodes) if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) >= 4
    for k in weight_dq:
        first_reader = min(j for j, n in enumerate(nodes) if nodes[k].output[0] in n.input)
        assert first_reader - k <= 3, f"{nodes[k].name} runs {first_reader - k} nodes before its reader"
    onnx.checker.check_model(m)


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(p):
    return os.stat(p).st_mode & 0o777


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_open_gives(tmp_path, umask, mask, want):
    from onnxopt import diffusion
    from onnxopt.bench import write_report
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    umask(mask)
    inline = modelfile.save(modelfile.load(src), tmp_path / "inline.onnx")
    ext = modelfile.save(modelfile.load(src), tmp_path / "ext.onnx", external_data=True)
    report = write_report({"a": 1}, tmp_path / "r.json")
    npz = diffusion.save_npz({"x": np.zeros(3, np.float32)}, tmp_path / "c.npz")
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "plain") == want
    for p in (inline, ext, tmp_path / "ext.onnx.data", report, npz):
        assert _mode(p) == want, p
    # what was written is what ORT reads back
    assert ort.session(modelfile.load(ext)).run(None, {"x": np.zeros((1, 3, 16, 16), np.float32)})[0].shape == (1, 10)


def test_overwrite_keeps_the_existing_mode(tmp_path, umask):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    modelfile.save(modelfile.load(src), out, external_data=True)
    os.chmod(out, 0o640)
    os.chmod(tmp_path / "o.onnx.data", 0o604)
    umask(0o077)
    modelfile.save(modelfile.load(src), out, external_data=True)
    assert _mode(out) == 0o640 and _mode(tmp_path / "o.onnx.data") == 0o604
    with atomicfile.atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
    assert _mode(out) == 0o640


def test_unwritable_location_is_a_user_error(tmp_path):
    src = tiny.save(tiny.cnn(), tmp_path / "m.onnx")
    with pytest.raises(OnnxoptError, match="a file is in the way"):
        modelfile.save(modelfile.load(src), tmp_path / "m.onnx" / "o.onnx")
    with pytest.raises(OnnxoptError, match="m.onnx is a file, not a folder"):
        atomicfile.check_writable(tmp_path / "m.onnx" / "sub" / "r.json", "--report")
    atomicfile.check_writable(tmp_path / "new" / "sub" / "r.json", "--report")  # folders that do not exist yet are fine
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_all_tensors_lists_what_onnx_lists_in_onnx_order():
    """modelfile.all_tensors walks the graph once; it must give onnx's list, order included (callers take the
    main graph's initializers as its first entries): initializers of the graph and nested subgraphs, then
    Constant/attribute tensors everywhere, functions' last."""
    from onnx import external_data_helper, helper, numpy_helper
    from onnxopt import modelfile

    def init(name):
        return numpy_helper.from_array(np.full(2, len(name), np.float32), name)

    def const(name):
        return helper.make_node("Constant", [], [name], value=init(name + "_v"), name=name)

    inner = helper.make_graph([const("c_in"), helper.make_node("Add", ["c_in", "w_in"], ["y_in"])], "inner", [],
                              [helper.make_tensor_value_info("y_in", onnx.TensorProto.FLOAT, [2])],
                              initializer=[init("w_in")])
    deeper = helper.make_graph([const("c_deep"), helper.make_node("If", ["cond"], ["y_else"], then_branch=inner,
                                                                   else_branch=inner)], "deeper", [],
                               [helper.make_tensor_value_info("y_else", onnx.TensorProto.FLOAT, [2])],
                               initializer=[init("w_deep")])
    nodes = [const("c0"), helper.make_node("If", ["cond"], ["y"], then_branch=deeper, else_branch=inner),
             helper.make_node("Constant", [], ["cs"], sparse_value=helper.make_sparse_tensor(
                 init("sv"), numpy_helper.from_array(np.array([0], np.int64), "si"), [2])), const("c1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
                              initializer=[init("w0"), init("w1")])
    fn = onnx.FunctionProto(name="f", domain="local", node=[const("c_fn")], output=["c_fn"])
    model = helper.make_model(graph, functions=[fn])
    want = [t.name for t in external_data_helper._get_all_tensors(model)]
    assert [t.name for t in modelfile.all_tensors(model)] == want
    assert want[:2] == ["w0", "w1"] and want[-1] == "c_fn_v"
    assert {"w_in", "w_deep", "c_in_v", "c_deep_v", "c0_v", "c1_v"} <= set(want)
