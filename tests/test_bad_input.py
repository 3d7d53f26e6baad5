"""Every option error is one `error:` line, exit 2, no traceback, found before any model is read: the model
given here is not even valid protobuf, so an error about the options proves the model was never opened."""
import hashlib

import numpy as np
import pytest
from click.testing import CliRunner

from onnxopt.cli import main


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x00 not a model; reading it would fail with another message" * 4)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((2, 1, 3, 8, 8), np.float32))
    return model, calib


def _check(files, *args, needle):
    model, calib = files
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    argv = [a.format(model=model, calib=calib, dir=model.parent) for a in args]
    r = CliRunner().invoke(main, argv)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output and needle in lines[0], lines[0]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
    assert not any(p.name.endswith(".onnx") and p != model for p in model.parent.iterdir())  # nothing written


Q = ("quantize", "{model}", "--calib", "{calib}")
QR = ("quantize", "{model}", "--calib-random", "2")

CASES = {
    "bad exclude regex": (Q + ("--exclude", "["), "bad --exclude regex"),
    "bad exclude regex int4": (QR + ("--int4", "--awq", "none", "--exclude", "(a"), "bad --exclude regex"),
    "block-size with fp8": (Q + ("--fp8", "--block-size", "64"), "--block-size applies to --int4 only"),
    "awq with int8": (Q + ("--int8", "--awq", "full"), "--awq applies to --int4 only"),
    "awq with fp8 default mode": (Q + ("--awq", "lite"), "--awq applies to --int4 only"),
    "int8-layers with fp8": (Q + ("--fp8", "--int8-layers", "fc"), "--int8-layers applies to --int4 only"),
    "calib-method with int4": (Q + ("--int4", "--calib-method", "max"), "--calib-method applies to --fp8/--int8/--nvfp4/--mxfp8 only; --int4 is weight-only"),
    "smoothquant auto with fp8": (Q + ("--fp8", "--smoothquant"), "--smoothquant auto searches alpha for --int8 only; with --fp8 give an alpha"),
    "smoothquant auto with preset fp8": (Q + ("--preset", "sdxl", "--smoothquant"), "--smoothquant auto searches alpha for --int8 only"),
    "smoothquant with nvfp4": (Q + ("--nvfp4", "--smoothquant", "0.5"), "--smoothquant applies to --fp8/--int8 only"),
    "calib and calib-random": (Q + ("--calib-random", "4"), "--calib and --calib-random both given"),
    "budget zero": (Q + ("--memory-budget", "0"), "--memory-budget must be > 0"),
    "budget negative": (Q + ("--memory-budget", "-5"), "--memory-budget must be > 0"),
    "calib-random negative": (QR[:3] + ("-1",), "--calib-random must be > 0"),
    "calib-batches negative": (Q + ("--calib-batches", "-1"), "--calib-batches must be > 0"),
    "max-batch zero": (Q + ("--max-batch", "0"), "--max-batch must be > 0"),
    "old calib-max-batch zero": (Q + ("--calib-max-batch", "0"), "--max-batch must be > 0"),
    "seed negative": (QR + ("--seed", "-3"), "--seed must be >= 0"),
    "percentile out of range": (Q + ("--int8", "--calib-method", "percentile", "--percentile", "150"), "percentile 150.0 is out of range"),
    "percentile without method": (Q + ("--int8", "--percentile", "99.9"), "--percentile applies to --calib-method percentile"),
    "int4 bad block size": (QR + ("--int4", "--block-size", "100"), "--block-size 100"),
    "int4 bad int8-layers regex": (QR + ("--int4", "--int8-layers", "("), "--int8-layers"),
    "bad sparsity pattern": (Q + ("--sparsity", "3:2"), "bad sparsity pattern"),
    "sparsity-method without sparsity": (Q + ("--sparsity-method", "sparsegpt"), "--sparsity-method needs --sparsity"),
    "io-dtype with fp32": (Q + ("--io-dtype", "fp16", "--high-precision", "fp32"), "--io-dtype"),
    "unknown op type": (Q + ("--op-types", "Conv,Foo"), "--op-types"),
    "bad shapes": (QR + ("--shapes", "x=1x3"), "bad --shapes entry"),
    "calib-batches with generated data": (QR + ("--calib-batches", "2"), "--calib-batches limits --calib data"),
    "shapes without generated data": (Q + ("--shapes", "x:1x3x8x8"), "--shapes sets the shapes of generated data"),
    "missing calib file": (("quantize", "{model}", "--calib", "{dir}/nope.npz"), "does not exist"),
    "no calibration data": (("quantize", "{model}"), "no calibration data"),
    "output is the input": (Q + ("-o", "{model}"), "is the input"),
    "smoothquant alpha out of range": (Q + ("--int8", "--smoothquant", "2"), "outside [0, 1]"),
    "not an integer": (Q + ("--calib-batches", "many"), "not a valid integer"),
    "unknown choice": (Q + ("--provider", "tpu"), "--provider"),
    "sparsify bad pattern": (("sparsify", "{model}", "--sparsity", "3"), "bad sparsity pattern"),
    "sparsify old pattern alias": (("sparsify", "{model}", "--pattern", "4:2"), "bad sparsity pattern"),
    "sparsify sparsegpt without data": (("sparsify", "{model}", "--sparsity-method", "sparsegpt"), "needs calibration data"),
    "sparsify bad regex": (("sparsify", "{model}", "--exclude", "["), "bad --exclude regex"),
    "sparsify min-params negative": (("sparsify", "{model}", "--min-params", "-1"), "--min-params must be >= 0"),
    "sparsify damp negative": (("sparsify", "{model}", "--damp", "-0.1"), "--damp must be >= 0"),
    "sparsify block not multiple": (("sparsify", "{model}", "--block", "6"), "--block must be a positive multiple of 4"),
    "sparsify old calib-limit": (("sparsify", "{model}", "--calib", "{calib}", "--calib-limit", "-2"), "--calib-batches must be > 0"),
    "sparsify budget": (("sparsify", "{model}", "--memory-budget", "-1"), "--memory-budget must be > 0"),
    "sparsify calib and random": (("sparsify", "{model}", "--calib", "{calib}", "--calib-random", "2"), "both given"),
    "convert output is input": (("convert", "{model}", "-o", "{model}"), "is the input"),
    "convert missing model": (("convert", "{dir}/absent.onnx"), "no such model file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_option_error_is_one_line_before_reading(files, case):
    args, needle = CASES[case]
    _check(files, *args, needle=needle)
