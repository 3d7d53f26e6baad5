"""Options a new user gets wrong (issue 22 items 4, 5, 8): one `error:` line naming the accepted values, before any
work; and the messages that misled (bench of FP8 on a CPU, build's install hint, --version, a reused --sensitivity,
TensorRT-RTX's dropped targets)."""
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from onnxopt.cli import main


@pytest.fixture
def cnn(tmp_path):
    static, dyn = tmp_path / "static.onnx", tmp_path / "dyn.onnx"
    tiny.save(tiny.cnn(batch=2), static)
    tiny.save(tiny.cnn(), dyn)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(6, 2, 3, 16, 16)).astype(np.float32))
    return static, dyn, tmp_path / "c.npz"


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def one_error(code, out, needle):
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert needle in lines[0] and "Traceback" not in out, lines[0]


CASES = {
    # item 4: --shapes naming no input was silently ignored
    "shapes unknown input": (("{dyn}", "--calib-random", "2", "--shapes", "bogus:1x3x16x16", "--shapes", "x:1x3x16x16"),
                             "--shapes names input 'bogus', which the model does not have; its inputs: x"),
    "shapes wrong rank": (("{dyn}", "--calib-random", "2", "--shapes", "x:1x3x16"), "has 3 dimensions, input 'x' has 4"),
    "shapes against a static dim": (("{static}", "--calib-random", "2", "--shapes", "x:4x3x16x16"), "dimension 0 must be 2"),
    "shapes zero dim": (("{dyn}", "--calib-random", "2", "--shapes", "x:0x3x16x16"), "dimension 0 must be a positive size"),
    "dynamic without shapes": (("{dyn}", "--calib-random", "2"), "give its shape, e.g. --shapes x:1x3x16x16"),
    # item 5: conflicting modes took the last one
    "int8 and fp8": (("{static}", "--calib", "{calib}", "--int8", "--fp8"), "--fp8 and --int8 are different quantization modes"),
    "fp8 and int4": (("{static}", "--calib", "{calib}", "--fp8", "--int4"), "--fp8 and --int4 are different"),
    # item 8: option values checked against what they apply to, accepted values named
    "smoothquant negative": (("{static}", "--calib", "{calib}", "--int8", "--smoothquant", "-0.1"), "alpha -0.1 is outside [0, 1]"),
    "smoothquant negative int": (("{static}", "--calib", "{calib}", "--int8", "--smoothquant", "-1"), "alpha -1.0 is outside [0, 1]"),
    "block size 256": (("{static}", "--calib", "{calib}", "--int4", "--block-size", "256"), "use one of 128, 64, 32, 0"),
    "block size 16": (("{static}", "--calib", "{calib}", "--int4", "--block-size", "16"), "use one of 128, 64, 32, 0"),
    "block size without int4 format": (("{static}", "--calib", "{calib}", "--auto", "--bits", "8", "--block-size", "64"),
                                       "--formats fp8,int8 has no int4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option(cnn, case):
    static, dyn, calib = cnn
    args, needle = CASES[case]
    argv = [a.format(static=static, dyn=dyn, calib=calib) for a in args]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (static, dyn)}
    code, out = invoke("quantize", *argv, "-o", static.parent / "out.onnx")
    one_error(code, out, needle)
    assert not (static.parent / "out.onnx").exists()
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (static, dyn)}


def test_convert_fp16_and_bf16(cnn):
    static, _, calib = cnn
    one_error(*invoke("convert", static, "--fp16", "--bf16", "--calib", calib), "--fp16 and --bf16 are different precisions")


def test_convert_bf16_alone(cnn, tmp_path):
    static, _, calib = cnn
    code, out = invoke("convert", static, "--bf16", "--calib", calib, "-o", tmp_path / "b.onnx")
    assert code == 0 and "converted to bf16" in out, out


def test_version_names_the_command():
    code, out = invoke("--version")
    assert code == 0 and out.startswith("onnxopt, version "), out


def test_reused_sensitivity_file_is_said(cnn, tmp_path):
    static, _, calib = cnn
    args = ("quantize", static, "--auto", "--target-cosine", "0.99", "--calib", calib, "--sensitivity", tmp_path / "s.json")
    code, out = invoke(*args, "-o", tmp_path / "a.onnx")
    assert code == 0 and "sensitivities measured" in out and "saved to" in out, out
    code, out = invoke(*args, "-o", tmp_path / "b.onnx")
    assert code == 0 and "reused from" in out and ", 0 measured" in out, out


def test_install_hint_fits_a_source_checkout():
    from pathlib import Path

    import onnxopt
    from onnxopt.trt import MISSING, install_hint
    root = Path(onnxopt.__file__).resolve().parents[1]
    assert (root / "pyproject.toml").is_file()  # the tests run from a checkout
    assert install_hint("trt") == f"pip install -e '{root}[trt]'" and install_hint("trt") in MISSING


def test_bench_fp8_on_cpu_says_why_it_is_slow(tmp_path, caplog):
    """The FP8 model is valid; the CPU provider emulates FP8 Q/DQ. The note said only that ORT rejected it."""
    from onnxopt import QuantConfig, quantize
    src = tmp_path / "t.onnx"
    tiny.save(tiny.transformer(), src)
    np.savez(tmp_path / "c.npz", ids=np.random.default_rng(0).integers(0, 50, (4, 1, 16)).astype(np.int64))
    q = quantize(str(src), str(tmp_path / "t.fp8.onnx"), config=QuantConfig(mode="fp8", progress=False), data=str(tmp_path / "c.npz"))
    code, out = invoke("bench", src, q.path, "--backend", "onnxrt", "--iters", "3", "--warmup", "1", "--report", tmp_path / "b.json")
    assert code == 0, out
    # item 6: dynamic dims default to 1 (said once), instead of "give --shapes ids:1x..." printed literally
    assert "benchmarking 1x16" in caplog.text and "1x..." not in caplog.text + out
    note = json.loads((tmp_path / "b.json").read_text())["candidates"][0]["note"]
    assert "no FP8 kernels" in note and "says nothing about TensorRT" in note


@pytest.mark.rtx
@pytest.mark.skipif(not __import__("onnxopt.trt", fromlist=["x"]).rtx_available(), reason="tensorrt_rtx is not importable")
def test_rtx_dropped_targets_said_once(tmp_path):
    from onnxopt import QuantConfig, quantize
    src = tmp_path / "t.onnx"
    tiny.save(tiny.transformer(), src)
    np.savez(tmp_path / "c.npz", ids=np.random.default_rng(0).integers(0, 50, (4, 1, 16)).astype(np.int64))
    q = quantize(str(src), str(tmp_path / "t.fp8.onnx"), config=QuantConfig(mode="fp8", progress=False), data=str(tmp_path / "c.npz"))
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "onnxopt", "build", str(q.path), "--backend", "rtx", "--shapes", "ids:1x16",
                        "-o", str(tmp_path / "t.plan")], capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr  # the log line went to stderr, the report's line too: a real process sees both
    assert r.returncode == 0, out
    assert out.count("dropped GPU targets") == 1, out


@pytest.mark.parametrize("shapes,needle", [("bogus:1x3x16x16", "names input 'bogus', which the model does not have; its inputs: x"),
                                           ("x:1x3x16", "does not fit input 'x' (?x3x16x16)")])
def test_build_shapes_checked_before_the_builder(cnn, tmp_path, shapes, needle):
    """Full TensorRT is not installed here: the profile is checked before TensorRT is even imported."""
    _, dyn, _ = cnn
    one_error(*invoke("build", dyn, "--shapes", shapes, "-o", tmp_path / "m.plan"), needle)
