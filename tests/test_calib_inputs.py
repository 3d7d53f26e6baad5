"""Calibration inputs that fit the model: integer ranges read from the graph, random data drawn from them, real
data checked against them, and an ONNX Runtime failure while calibrating as one error line."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tiny
from onnxopt import calib
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError


def _ids_model(rows=10, offset=2, extra=None):
    """ids -> Cast(int32) -> Add(offset) -> Reshape -> Gather(table of `rows`) -> MatMul; `mask` -> Cast(float) -> Mul."""
    nodes = [h.make_node("Cast", ["ids"], ["ids32"], to=T.INT32),
             h.make_node("Add", ["ids32", "off"], ["ids_off"]),
             h.make_node("Reshape", ["ids_off", "shape"], ["ids_r"]),
             h.make_node("Gather", ["table", "ids_r"], ["e"]),
             h.make_node("Cast", ["gate"], ["gate_f"], to=T.FLOAT),
             h.make_node("Unsqueeze", ["gate_f", "ax"], ["gate_u"]),
             h.make_node("Mul", ["e", "gate_u"], ["eg"]),
             h.make_node("MatMul", ["eg", "w"], ["y"])]
    inits = [nh.from_array(np.array(offset, np.int32), "off"), nh.from_array(np.array([1, 8], np.int64), "shape"),
             nh.from_array(np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32), "table"),
             nh.from_array(np.array([-1], np.int64), "ax"),
             nh.from_array(np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32), "w")]
    inputs = [h.make_tensor_value_info("ids", T.INT64, [1, 8]), h.make_tensor_value_info("gate", T.INT64, [1, 8])]
    if extra is not None:  # an integer input used as a shape: no range can be found
        nodes.append(h.make_node("Reshape", ["y", extra], ["y2"]))
        inputs.append(h.make_tensor_value_info(extra, T.INT64, [2]))
    outs = [h.make_tensor_value_info("y2" if extra else "y", T.FLOAT, None)]
    return h.make_model(h.make_graph(nodes, "g", inputs, outs, inits), opset_imports=[h.make_opsetid("", 17)])


def test_ranges_follow_casts_offsets_and_reshapes():
    specs = {s.name: s for s in calib.input_specs(_ids_model(rows=10, offset=2))}
    assert (specs["ids"].values.kind, specs["ids"].values.low, specs["ids"].values.high) == ("index", -2, 8)
    assert "'table' (10 rows)" in specs["ids"].values.why
    assert specs["gate"].values.kind == "mask"


def test_random_ids_cover_the_table_and_masks_are_mostly_one():
    model = tiny.transformer()
    spec = calib.input_specs(model)[0]
    assert (spec.values.kind, spec.values.low, spec.values.high) == ("index", 0, 50)
    data = calib.CalibData.random([spec], 64, shapes={"ids": (1, 16)})
    ids = np.concatenate([f["ids"] for f in data])
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 40  # not just 0 and 1
    gate = next(s for s in calib.input_specs(_ids_model()) if s.name == "gate")
    m = np.concatenate([f["gate"] for f in calib.CalibData.random([gate], 32)])
    assert set(np.unique(m)) <= {0, 1} and m.mean() > 0.5 and (m[:, 0] == 1).all()  # a padded tail of zeros


def test_random_data_refused_for_an_integer_input_without_a_range():
    specs = calib.input_specs(_ids_model(extra="out_shape"))
    assert next(s for s in specs if s.name == "out_shape").values.kind == "unknown"
    with pytest.raises(OnnxoptError, match="'out_shape'.*--calib"):
        calib.CalibData.random(specs, 2)


def test_real_data_out_of_range_is_one_error_before_any_run(tmp_path):
    model = _ids_model(rows=10, offset=2)
    p = tmp_path / "c.npz"
    np.savez(p, ids=np.full((3, 1, 8), 9, np.int64), gate=np.ones((3, 1, 8), np.int64))
    with pytest.raises(OnnxoptError) as e:
        calib.CalibData.from_path(p, calib.input_specs(model))
    assert "input 'ids' holds values in [9, 9], the model accepts [-2, 8)" in str(e.value)


def test_onnx_runtime_failure_while_calibrating_is_one_error_line():
    model = _ids_model(rows=10, offset=2)
    specs = [calib.InputSpec(s.name, s.shape, s.dtype) for s in calib.input_specs(model)]  # no ranges known
    data = calib.CalibData(specs, [lambda: {"ids": np.full((1, 8), 40, np.int64), "gate": np.ones((1, 8), np.int64)}])
    with pytest.raises(OnnxoptError, match="ONNX Runtime failed on calibration batch 0") as e:
        calib.collect(model, data, {"e": [calib.AbsMax()]}, progress=False)
    assert "\n" not in str(e.value)


def test_cli_quantize_with_ids_out_of_range(tmp_path):
    src = tiny.save(tiny.transformer(), tmp_path / "m.onnx")
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.full((2, 1, 16), 50, np.int64))
    before = onnx.load(src).SerializeToString()
    r = CliRunner().invoke(main, ["-q", "quantize", src, "-o", str(tmp_path / "o.onnx"), "--int8", "--calib", str(bad)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "accepts [0, 50)" in r.output, r.output
    assert onnx.load(src).SerializeToString() == before


def test_8_bit_inputs_take_their_whole_range():
    nodes = [h.make_node("Cast", ["img"], ["f"], to=T.FLOAT), h.make_node("Mul", ["f", "s"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("img", T.UINT8, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(np.array(1 / 255, np.float32), "s")])
    spec = calib.input_specs(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))[0]
    assert (spec.values.kind, spec.values.low, spec.values.high) == ("range", 0, 256)
    x = next(iter(calib.CalibData.random([spec], 1)))["img"]
    assert x.dtype == np.uint8 and x.max() > 200
