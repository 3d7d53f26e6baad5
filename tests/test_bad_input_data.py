"""Calibration data holding inf/NaN (issue 22 items 1-3): one `error:` line naming the input and the sample, checked
before any work, or left out with --skip-nonfinite and counted; every data-driven loop bounded; --auto on a static
batch dimension."""
import hashlib
import subprocess
import sys
import os

import numpy as np
import pytest

import tiny
from onnxopt.calib.reducers import Histogram, NonFiniteActivation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=120):
    """The real CLI in a subprocess (a hang fails the test at `timeout` instead of blocking the suite)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r.returncode, r.stdout + r.stderr


def one_error(rc, out, needle):
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert needle in lines[0] and "Traceback" not in out, out


@pytest.fixture
def cnn(tmp_path):
    model = tmp_path / "cnn.onnx"
    tiny.save(tiny.cnn(batch=2), model)
    x = np.random.default_rng(0).normal(size=(8, 2, 3, 16, 16)).astype(np.float32)
    return model, x


def _calib(tmp_path, x, name="c.npz"):
    p = tmp_path / name
    np.savez(p, x=x)
    return p


@pytest.mark.parametrize("value,kind", [(np.inf, "inf"), (-np.inf, "inf"), (np.nan, "NaN")])
@pytest.mark.parametrize("extra", [("--int8",), ("--int8", "--calib-method", "entropy"), ("--int8", "--calib-method", "mse"),
                                   ("--int8", "--smoothquant", "0.5"), ("--fp8",)])
def test_nonfinite_calibration_is_one_line(tmp_path, cnn, value, kind, extra):
    model, x = cnn
    x[3, 1, 0, 2, 2] = value
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    rc, out = cli("quantize", model, "--calib", _calib(tmp_path, x), "-o", tmp_path / "o.onnx", *extra)
    one_error(rc, out, f"input 'x' sample 3 holds {kind}")
    assert "--skip-nonfinite" in out
    assert not (tmp_path / "o.onnx").exists()
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest


def test_skip_nonfinite_counts_the_samples(tmp_path, cnn):
    import json
    model, x = cnn
    x[1, 0, 0, 0, 0], x[6, 1, 2, 3, 4] = np.inf, np.nan
    rc, out = cli("quantize", model, "--int8", "--calib-method", "entropy", "--calib", _calib(tmp_path, x), "--skip-nonfinite",
                  "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert rc == 0, out
    assert json.loads((tmp_path / "r.json").read_text())["skipped_nonfinite"] == 2
    assert "left out 2 calibration sample(s)" in out


def test_skip_nonfinite_with_nothing_left(tmp_path, cnn):
    model, x = cnn
    x[:, 0, 0, 0, 0] = np.nan
    rc, out = cli("quantize", model, "--int8", "--calib", _calib(tmp_path, x), "--skip-nonfinite", "-o", tmp_path / "o.onnx")
    one_error(rc, out, "every sample holds inf or NaN")


def test_nonfinite_in_a_directory_names_the_file(tmp_path, cnn):
    model, x = cnn
    d = tmp_path / "calib"
    d.mkdir()
    np.savez(d / "a.npz", x=x[:4])
    y = x[4:].copy()
    y[2, 0, 0, 0, 0] = np.nan
    np.savez(d / "b.npz", x=y)
    rc, out = cli("quantize", model, "--int8", "--calib", d, "-o", tmp_path / "o.onnx")
    one_error(rc, out, "b.npz: input 'x' sample 2 holds NaN")


def test_nonfinite_evaluation_data(tmp_path, cnn):
    model, x = cnn
    x[5, 0, 0, 0, 0] = np.inf
    rc, out = cli("compare", model, model, "--data", _calib(tmp_path, x))
    one_error(rc, out, "input 'x' sample 5 holds inf")


def test_histogram_range_growth_is_bounded():
    """inf in the data doubled the range forever; a huge finite jump now costs a bounded number of merges."""
    h = Histogram()
    with pytest.raises(NonFiniteActivation):
        h.update(np.array([1.0, np.inf], np.float32))
    with pytest.raises(NonFiniteActivation):
        h.update(np.array([np.nan, 1.0], np.float32))
    h = Histogram()
    h.update(np.array([1.0, 2.0], np.float32))
    h.update(np.array([3e38], np.float32))
    assert h.range > 3e38 and np.isfinite(h.range) and h.counts.sum() == 3 and h.counts[0] == 2
    h = Histogram()
    h.update(np.array([2.0], np.float32))
    h.update(np.array([4.0], np.float32))  # lands exactly on a doubled edge: still inside the range
    assert h.range > 4.0 and h.counts.sum() == 2 and h.counts[h.bins - 1] == 1


def test_activation_overflow_names_the_tensor(tmp_path):
    """Finite inputs whose FP32 activations overflow: one line naming the tensor, not an endless loop."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    w = nh.from_array(np.full((32, 32), 1e30, np.float32), "w")
    w2 = nh.from_array(np.eye(32, dtype=np.float32), "w2")
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["big"], name="mm"),
                      h.make_node("MatMul", ["big", "w2"], ["y"], name="mm2")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [4, 32])], [h.make_tensor_value_info("y", T.FLOAT, [4, 32])], [w, w2])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.full((3, 4, 32), 1e10, np.float32))
    rc, out = cli("quantize", tmp_path / "m.onnx", "--int8", "--calib-method", "entropy", "--calib", tmp_path / "c.npz",
                  "-o", tmp_path / "o.onnx")
    one_error(rc, out, "tensor 'big' holds inf or NaN")


@pytest.mark.parametrize("formats", ["fp8,int8", "fp8,int8,int4,int8-sq"])
def test_auto_static_batch(tmp_path, formats):
    """Static-batch graphs (the usual TensorRT export): --auto ran the candidates stacked along axis 0."""
    model = tmp_path / "cnn.onnx"
    tiny.save(tiny.cnn(batch=2), model)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(8, 2, 3, 16, 16)).astype(np.float32))
    rc, out = cli("quantize", model, "--auto", "--target-cosine", "0.99", "--formats", formats, "--calib", tmp_path / "c.npz",
                  "-o", tmp_path / "o.onnx")
    assert rc == 0, out
    assert "target met" in out


def test_compare_skip_nonfinite(tmp_path, cnn):
    model, x = cnn
    x[5, 0, 0, 0, 0] = np.inf
    rc, out = cli("compare", model, model, "--data", _calib(tmp_path, x), "--skip-nonfinite")
    assert rc == 0, out
    assert "over 7 batch(es)" in out and "left out 1 sample(s) holding inf or NaN" in out, out
