"""Bad values for the analysis commands (inspect, compare, bench, calib-data): each is one `error:` line,
exit 2, no traceback, and the input files are unchanged."""
import hashlib
import logging
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from onnxopt import ort
from onnxopt.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    tiny.save(tiny.transformer(), d / "t.onnx")
    tiny.save(tiny.transformer(), d / "t2.onnx")
    tiny.save(tiny.cnn(), d / "cnn.onnx")
    np.savez(d / "ids.npz", ids=np.random.default_rng(0).integers(0, 50, (3, 1, 16)))
    big = np.full((3, 1, 16), 7, np.int64)
    big[1, 0, 3] = 77  # one token id past the 50-row embedding
    np.savez(d / "oob.npz", ids=big)
    np.savez(d / "keys.npz", tokens=np.zeros((2, 1, 16), np.int64))
    (d / "corrupt.onnx").write_bytes(b"\x08\x07 not a model" * 5)
    (d / "empty.txt").write_text("")
    (d / "prompts.txt").write_text("a photo of a cat\n")
    (d / "m.plan").write_bytes(b"engine")
    (d / "pipe").mkdir()
    (d / "pipe_ok").mkdir()
    (d / "pipe_ok" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return d


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _cuda_missing(monkeypatch):
    monkeypatch.setattr(ort, "_unavailable", lambda name: "libcublasLt.so.13: cannot open shared object file" if name == "cuda" else None)


CASES = [
    # inspect
    ("inspect {d}/nope.onnx", "no such model file"),
    ("inspect {d}", "is a directory"),
    ("inspect {d}/corrupt.onnx", "not a readable ONNX model"),
    ("inspect {d}/empty.txt", "no nodes"),
    ("inspect {d}/t.onnx --report {d}/t.onnx", "is an input model"),
    ("inspect {d}/t.onnx --json {d}/t.onnx", "is an input model"),
    ("inspect {d}/t.onnx --report {d}", "is a directory"),
    ("inspect {d}/t.onnx --report {d}/a.json --json {d}/b.json", "old name of --report"),
    ("inspect {d}/t.onnx --bogus", "No such option"),
    # compare
    ("compare {d}/t.onnx", "Missing argument"),
    ("compare {d}/t.onnx {d}/t2.onnx --random 0", "--random"),
    ("compare {d}/t.onnx {d}/t2.onnx --random -3", "--random"),
    ("compare {d}/t.onnx {d}/t2.onnx --random many", "--random"),
    ("compare {d}/t.onnx {d}/t2.onnx --max-batch 0", "--max-batch"),
    ("compare {d}/t.onnx {d}/t2.onnx --shapes ids:axb", "--shapes"),
    ("compare {d}/t.onnx {d}/t2.onnx --shapes ids:1x17", "expects"),
    ("compare {d}/t.onnx {d}/t2.onnx", "--shapes ids:"),
    ("compare {d}/t.onnx {d}/t2.onnx --data {d}/nope.npz", "not found"),
    ("compare {d}/t.onnx {d}/t2.onnx --data {d}/keys.npz", "no array for model input"),
    ("compare {d}/t.onnx {d}/t2.onnx --data {d}/oob.npz", "input 'ids'", "the model accepts [0, 50)", "[7, 77]"),
    ("compare {d}/t.onnx {d}/cnn.onnx --shapes ids:1x16", "compare models of the same network"),
    ("compare {d}/t.onnx {d}/t2.onnx --data {d}/ids.npz --provider tpu", "--provider"),
    ("compare {d}/t.onnx {d}/t2.onnx --data {d}/ids.npz --provider cuda", "onnxruntime-gpu", "CUDA 13", "--allow-cpu-fallback"),
    ("compare {d}/t.onnx {d}/t2.onnx --data {d}/ids.npz --report {d}/t2.onnx", "is an input model"),
    ("compare {d}/t.onnx {d}/corrupt.onnx --data {d}/ids.npz", "not a readable ONNX model"),
    # bench
    ("bench {d}/t.onnx", "Missing argument"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --iters 0", "--iters"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --warmup -1", "--warmup"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --samples 0", "--samples"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --threads -2", "--threads"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend gpu", "--backend"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --ort-level max", "--ort-level"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --opt-level 2", "--opt-level applies to the trt backend"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --no-fp16-baseline", "--no-fp16-baseline applies to the trt backend"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend trt --provider cuda", "--provider applies to the onnxrt backend"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend trt --threads 2", "--threads applies to the onnxrt backend"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --data {d}/ids.npz --provider cuda", "onnxruntime-gpu", "--allow-cpu-fallback"),
    ("bench {d}/t.onnx {d}/m.plan --backend onnxrt --data {d}/ids.npz", "needs .onnx models"),
    ("bench {d}/t.onnx {d}/nope.onnx --backend onnxrt", "no such model file"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --label a", "one label per model"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --data {d}/keys.npz", "no array for model input"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --iters 1 --warmup 0 --data {d}/oob.npz", "input 'ids'", "the model accepts [0, 50)", "[7, 77]"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --work-dir {d}/empty.txt", "--work-dir"),
    ("bench {d}/t.onnx {d}/t2.onnx --backend onnxrt --report {d}/t.onnx", "is an input model"),
    # calib-data sdxl
    ("calib-data sdxl -o {d}/c.npz --samples 0", "--samples"),
    ("calib-data sdxl -o {d}/c.npz --steps 0", "--steps"),
    ("calib-data sdxl -o {d}/c.npz --steps 5000", "--steps"),
    ("calib-data sdxl -o {d}/c.npz --height 100", "multiples of 8"),
    ("calib-data sdxl -o {d}/c.npz --width 0", "--width"),
    ("calib-data sdxl -o {d}/c.txt", "*.npz"),
    ("calib-data sdxl -o {d}", "is a directory"),
    ("calib-data sdxl -o {d}/c.npz --prompts {d}/prompts.txt", "only with --pipeline"),
    ("calib-data sdxl -o {d}/c.npz --device cuda", "only with --pipeline"),
    ("calib-data sdxl -o {d}/c.npz --pipeline {d}/nodir --prompts {d}/prompts.txt", "--pipeline"),
    ("calib-data sdxl -o {d}/c.npz --pipeline {d}/pipe", "needs --prompts"),
    ("calib-data sdxl -o {d}/c.npz --pipeline {d}/pipe --prompts {d}/empty.txt", "no prompts"),
    ("calib-data sdxl -o {d}/c.npz --pipeline {d}/pipe --prompts {d}/prompts.txt", "model_index.json"),
    ("calib-data sdxl -o {d}/c.npz --pipeline {d}/pipe_ok --prompts {d}/prompts.txt --device gpu", "not a torch device"),
    ("calib-data sdxl -o {d}/c.npz --seed x", "--seed"),
    ("calib-data sdlx -o {d}/c.npz", "No such command 'sdlx'"),
    ("calib-data sdxl -o {d}/c.npz --report {d}/c.npz", "is the -o output too"),
    ("calib-data sdxl -o {d}/t.onnx/c.npz", "is a file, not a folder"),
    ("inspect {d}/t.onnx --report {d}/t.onnx/r.json", "is a file, not a folder"),
    ("compare {d}/t.onnx {d}/t2.onnx --report {d}/empty.txt/r.json", "is a file, not a folder"),
    ("calib-data --bogus sdxl", "No such option"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0].replace("{d}/", "").replace("{d}", "DIR") for c in CASES])
def test_bad_value_is_one_error_line(files, monkeypatch, case):
    cmd, *needles = case
    _cuda_missing(monkeypatch)
    before = _digests(files)
    r = CliRunner().invoke(main, cmd.format(d=files).split())
    out = r.output
    lines = [l for l in out.splitlines() if l.strip()]
    assert r.exit_code == 2, out
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert _digests(files) == before
    assert not (files / "c.npz").exists()


def test_cuda_fallback_is_one_warning_and_runs_on_cpu(files, monkeypatch, caplog):
    _cuda_missing(monkeypatch)
    monkeypatch.setattr(ort, "_fallen_back", set())
    args = ["compare", f"{files}/t.onnx", f"{files}/t2.onnx", "--data", f"{files}/ids.npz", "--provider", "cuda", "--allow-cpu-fallback"]
    with caplog.at_level(logging.WARNING):  # an earlier in-process -q leaves the root logger at ERROR
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "on cpu: worst cosine 1.000000" in r.output  # the same model twice
    warnings = [rec for rec in caplog.records if "cannot use CUDA" in rec.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_real_process_prints_one_line(files):
    for args in (["compare", f"{files}/t.onnx", f"{files}/t2.onnx", "--data", f"{files}/oob.npz"],
                 ["calib-data", "sdxl", "-o", f"{files}/c.npz", "--samples", "-1", "-q"]):
        p = subprocess.run([sys.executable, "-m", "onnxopt", *args], capture_output=True, text=True)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
