"""Bad files, as a new user meets them (issue 22): each exits 2 with one `error:` line and no traceback within 120 s,
leaves the input untouched and writes nothing; old opsets are upgraded; outputs get normal permissions."""
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tiny

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 120


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True,
                       timeout=BOUND_S, env=env, cwd=cwd)
    return r.returncode, r.stdout + r.stderr


def _digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


@pytest.fixture
def corpus(tmp_path):
    """A good model and data, and the bad variants next to them."""
    d = tmp_path
    good = d / "good.onnx"
    tiny.save(tiny.cnn(batch=2), good)
    x = np.random.default_rng(0).normal(size=(4, 2, 3, 16, 16)).astype(np.float32)
    np.savez(d / "calib.npz", x=x)
    raw = good.read_bytes()
    (d / "text.onnx").write_text("this is not an onnx model\n")
    (d / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    (d / "empty.onnx").write_bytes(b"")
    ext = tiny.cnn(batch=2)
    onnx.save(ext, d / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    (d / "ext.onnx.data").unlink()
    trunc_ext = tiny.cnn(batch=2)
    onnx.save(trunc_ext, d / "extcut.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="extcut.onnx.data", size_threshold=0)
    data = (d / "extcut.onnx.data").read_bytes()
    (d / "extcut.onnx.data").write_bytes(data[: len(data) // 3])
    np.savez(d / "wrongkey.npz", y=x)
    np.savez(d / "wrongshape.npz", x=x[:, :, :, :8])
    np.savez(d / "wrongdtype.npz", x=x.astype(np.int32))
    np.savez(d / "nosamples.npz", x=x[:0])
    (d / "notnpz.npz").write_text("not a zip archive")
    np.save(d / "extra.npy", x)
    (d / "cut.npz").write_bytes((d / "calib.npz").read_bytes()[:300])
    np.savez(d / "rank.npz", x=x[..., 0])
    return d


CASES = {
    "not onnx": (("quantize", "text.onnx", "--calib", "calib.npz"), "not a readable ONNX model"),
    "truncated onnx": (("quantize", "truncated.onnx", "--calib", "calib.npz"), "truncated.onnx"),
    "empty file": (("quantize", "empty.onnx", "--calib", "calib.npz"), "empty.onnx"),
    "empty file inspect": (("inspect", "empty.onnx"), "empty.onnx"),
    "empty file convert": (("convert", "empty.onnx"), "empty.onnx"),
    "missing model": (("quantize", "nope.onnx", "--calib", "calib.npz"), "nope.onnx: no such model file"),
    "missing external data": (("quantize", "ext.onnx", "--calib", "calib.npz"), "external data file 'ext.onnx.data'"),
    "truncated external data": (("quantize", "extcut.onnx", "--calib", "calib.npz"), "is truncated"),
    "missing external data inspect": (("inspect", "ext.onnx"), "ext.onnx.data"),
    "wrong calib key": (("quantize", "good.onnx", "--calib", "wrongkey.npz"), "no array for model input(s) ['x']"),
    "wrong calib shape": (("quantize", "good.onnx", "--calib", "wrongshape.npz"), "dimension"),
    "wrong calib rank": (("quantize", "good.onnx", "--calib", "rank.npz"), "the model expects"),
    "wrong calib dtype": (("quantize", "good.onnx", "--calib", "wrongdtype.npz"), "dtype int32"),
    "no samples": (("quantize", "good.onnx", "--int8", "--calib", "nosamples.npz"), "no calibration samples"),
    "calib not npz": (("quantize", "good.onnx", "--calib", "notnpz.npz"), "cannot read calibration data"),
    "calib truncated": (("quantize", "good.onnx", "--calib", "cut.npz"), "cannot read calibration data"),
    "calib missing": (("quantize", "good.onnx", "--calib", "nope.npz"), "nope.npz"),
    "negative calib-random": (("quantize", "good.onnx", "--calib-random", "-4"), "--calib-random must be > 0"),
    "zero calib-random": (("quantize", "good.onnx", "--calib-random", "0"), "--calib-random must be > 0"),
    "negative calib-batches": (("quantize", "good.onnx", "--calib", "calib.npz", "--calib-batches", "-2"), "--calib-batches must be > 0"),
    "negative samples compare": (("compare", "good.onnx", "good.onnx", "--random", "-1"), "-1"),
    "negative samples bench": (("bench", "good.onnx", "good.onnx", "--samples", "-3"), "-3"),
    "output is input": (("quantize", "good.onnx", "--calib", "calib.npz", "-o", "good.onnx"), "is the input"),
    "output is input convert": (("convert", "good.onnx", "--calib", "calib.npz", "-o", "./good.onnx"), "is the input"),
    "unwritable output dir": (("quantize", "good.onnx", "--calib", "calib.npz", "-o", "/proc/onnxopt-none/o.onnx"), "/proc"),
    "output under a file": (("quantize", "good.onnx", "--calib", "calib.npz", "-o", "calib.npz/o.onnx"), "is a file"),
    "report is input": (("quantize", "good.onnx", "--calib", "calib.npz", "--report", "good.onnx", "-o", "o.onnx"), "--report"),
    "report is output": (("quantize", "good.onnx", "--calib", "calib.npz", "--report", "o.onnx", "-o", "o.onnx"), "also the output"),
    "report is input convert": (("convert", "good.onnx", "--calib", "calib.npz", "--report", "good.onnx"), "--report"),
    "report is input sparsify": (("sparsify", "good.onnx", "--report", "good.onnx"), "--report"),
    "sensitivity is input": (("quantize", "good.onnx", "--auto", "--bits", "8", "--calib", "calib.npz", "--sensitivity", "good.onnx"),
                             "--sensitivity good.onnx is an input model"),
    "compare bad data": (("compare", "good.onnx", "good.onnx", "--data", "wrongkey.npz"), "no array for model input(s)"),
    "sparsify not onnx": (("sparsify", "text.onnx"), "not a readable ONNX model"),
    "auto one sample": (("quantize", "good.onnx", "--auto", "--bits", "8", "--calib", "calib.npz", "--calib-batches", "1"),
                        "at least 2 calibration samples"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file(corpus, case):
    args, needle = CASES[case]
    before = _digests(corpus)
    code, out = cli(*args, cwd=corpus)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out and needle in lines[0], lines[0]
    assert _digests(corpus) == before  # inputs unchanged, nothing written (no output, no stray temporaries)


def _opset6_model(path: Path, *, broken: bool = False) -> None:
    """Conv -> Relu -> GAP -> Flatten -> Gemm(broadcast=1) at opset 6 (IR 3: weights are graph inputs too)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.normal(size=(16, 3, 3, 3)) * 0.2).astype(np.float32), "cw"),
             nh.from_array((rng.normal(size=(32, 16)) * 0.2).astype(np.float32), "w2"),
             nh.from_array(np.zeros(7 if broken else 32, np.float32), "b")]
    nodes = [h.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             h.make_node("Flatten", ["g"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "w2", "b"], ["y"], transB=1, broadcast=1, name="fc")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 8, 8])] + \
        [h.make_tensor_value_info(t.name, T.FLOAT, list(t.dims)) for t in inits]
    g = h.make_graph(nodes, "old", inputs, [h.make_tensor_value_info("y", T.FLOAT, [2, 32])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 6)])
    m.ir_version = 3
    onnx.save(m, path)


@pytest.mark.parametrize("mode", [("quantize", "--int8"), ("quantize", "--fp8"), ("convert", "--fp16")])
def test_old_opset_is_upgraded(tmp_path, mode):
    src = tmp_path / "old.onnx"
    _opset6_model(src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(4, 2, 3, 8, 8)).astype(np.float32))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    code, out = cli(mode[0], src, mode[1], "--calib", tmp_path / "c.npz", "-o", tmp_path / "o.onnx")
    assert code == 0, out
    assert "opset 6 is older than onnxopt reads: upgraded to opset" in out
    m = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0] >= 13
    import onnxruntime as ort
    y = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 3, 8, 8), np.float32)})[0]
    assert np.isfinite(y.astype(np.float32)).all()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def test_old_opset_that_cannot_convert(tmp_path):
    src = tmp_path / "old.onnx"
    _opset6_model(src, broken=True)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 2, 3, 8, 8), np.float32))
    code, out = cli("quantize", src, "--int8", "--calib", tmp_path / "c.npz", "-o", tmp_path / "o.onnx")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "version converter cannot raise it" in lines[0], out
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_have_normal_permissions(tmp_path, umask):
    """Atomic saves write a mkstemp file (0600) and rename it: the result must get 0666 less the umask."""
    src = tmp_path / "m.onnx"
    tiny.save(tiny.cnn(batch=2), src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(2, 2, 3, 16, 16)).astype(np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (f"import os; os.umask({umask}); import sys; sys.argv = ['onnxopt', 'quantize', {str(src)!r}, '--calib', "
            f"{str(tmp_path / 'c.npz')!r}, '-o', {str(tmp_path / 'o.onnx')!r}, '--report', {str(tmp_path / 'r.json')!r}]\n"
            "from onnxopt.cli import main\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=BOUND_S)
    assert r.returncode == 0, r.stderr
    for name in ("o.onnx", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
