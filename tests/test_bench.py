"""`onnxopt bench` on the onnxrt backend, end to end: report fields, table, and fidelity numbers checked
against onnxopt.compare and against closed forms."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import tiny
from onnxopt import QuantConfig, modelfile, quantize
from onnxopt.api import convert
from onnxopt.bench import BenchConfig, bench, format_table
from onnxopt.cli import main
from onnxopt.compare import compare
from onnxopt.errors import OnnxoptError

FAST = dict(backend="onnxrt", warmup=1, iters=5, samples=3)


def _have_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """FP32 tiny CNN (baseline) and three candidates: FP16, INT8, FP8; 3 evaluation samples."""
    d = tmp_path_factory.mktemp("bench")
    base = d / "cnn.onnx"
    modelfile.save(tiny.cnn(), base)
    fp16 = convert(base, d / "cnn_fp16.onnx")
    shapes = {"x": (1, 3, 16, 16)}
    cands = [fp16]
    for mode in ("int8", "fp8"):
        quantize(base, d / f"cnn_{mode}.onnx", config=QuantConfig(mode=mode, progress=False), calib_random=4, shapes=shapes)
        cands.append(d / f"cnn_{mode}.onnx")
    data = d / "eval.npz"
    np.savez(data, x=np.random.default_rng(7).standard_normal((3, 1, 3, 16, 16)).astype(np.float32))
    return d, base, cands, data


@pytest.fixture(scope="module")
def result(models):
    d, base, cands, data = models
    return bench(base, cands, config=BenchConfig(**FAST), data=data, report=d / "report.json")


def test_report_fields(models, result):
    d, base, cands, data = models
    assert result["backend"] == "onnxrt"
    assert result["machine"]["cores"] >= 1 and result["machine"]["onnxruntime"]
    assert result["machine"]["timing_level"] == "all" and result["machine"]["fidelity_level"] == "disable"
    assert (result["warmup"], result["iters"], result["samples"]) == (1, 5, 3)
    assert result["input_shapes"] == {"x": [1, 3, 16, 16]}
    rows = [result["baseline"]] + result["candidates"]
    assert [r["label"] for r in rows] == ["cnn", "cnn_fp16", "cnn_int8", "cnn_fp8"]
    for r, path in zip(rows, [base] + cands):
        assert r["model"] == str(path)
        assert r["size_bytes"] == path.stat().st_size  # no external data here
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1e3 / lat["mean"])
        assert r["speedup"] == pytest.approx(rows[0]["latency_ms"]["median"] / lat["median"])
    assert result["baseline"]["speedup"] == 1.0 and result["baseline"]["fidelity"] is None
    # FP16/INT8 weights are smaller than FP32 ones
    assert result["candidates"][0]["size_ratio"] < 0.7 and result["candidates"][1]["size_ratio"] < 0.7
    saved = json.loads((d / "report.json").read_text())
    assert saved["candidates"][2]["fidelity"]["cosine"] == pytest.approx(result["candidates"][2]["fidelity"]["cosine"])
    assert saved["baseline"]["label"] == "cnn"


def test_fidelity_matches_compare(models, result):
    d, base, cands, data = models
    for row, cand in zip(result["candidates"], cands):
        expected = compare(base, cand, data)  # ORT_DISABLE_ALL, every sample of eval.npz
        assert set(row["fidelity"]["outputs"]) == set(expected) == {"y"}
        for key in ("cosine", "snr_db", "max_abs"):
            assert row["fidelity"]["outputs"]["y"][key] == pytest.approx(expected["y"][key], rel=1e-9, abs=1e-12)
            assert row["fidelity"][key] == row["fidelity"]["outputs"]["y"][key]
    fid = [r["fidelity"] for r in result["candidates"]]
    assert fid[0]["cosine"] > 0.9999 and fid[0]["snr_db"] > 40          # FP16
    assert 0.99 < fid[1]["cosine"] < 1 and 20 < fid[1]["snr_db"] < fid[0]["snr_db"]  # INT8
    assert 0.99 < fid[2]["cosine"] < 1 and 15 < fid[2]["snr_db"] < fid[0]["snr_db"]  # FP8


def test_table(result):
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("backend onnxrt: ONNX Runtime")
    rows = [l for l in lines if l.startswith("| cnn")]
    assert len(rows) == 4 and rows[0].startswith("| cnn (baseline) |") and "1.00x" in rows[0]
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    fid = result["candidates"][1]["fidelity"]
    assert cells[0] == "cnn_int8"
    assert float(cells[6]) == pytest.approx(fid["cosine"], abs=1e-6)
    assert float(cells[7]) == pytest.approx(fid["snr_db"], abs=0.05)
    assert float(cells[8]) == pytest.approx(fid["max_abs"], rel=1e-3)
    assert float(cells[2]) == pytest.approx(result["candidates"][1]["latency_ms"]["median"], abs=1e-3)


def _scaled(path, scale: float):
    """y = (x @ W) * scale: candidates with known fidelity against scale 1."""
    w = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "s"], ["y"])], "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(scale, np.float32), "s")])
    modelfile.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return w


def test_fidelity_closed_form(tmp_path):
    w = _scaled(tmp_path / "ref.onnx", 1.0)
    _scaled(tmp_path / "up.onnx", 1.1)
    _scaled(tmp_path / "neg.onnx", -1.0)
    x = np.random.default_rng(5).standard_normal((4, 2, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    res = bench(tmp_path / "ref.onnx", [tmp_path / "up.onnx", tmp_path / "neg.onnx"],
                config=BenchConfig(backend="onnxrt", warmup=0, iters=2, samples=4), data=tmp_path / "d.npz")
    y = np.einsum("sbi,io->sbo", x.astype(np.float64), w.astype(np.float64))
    up, neg = (r["fidelity"] for r in res["candidates"])
    # cand = 1.1 ref: same direction, noise = 0.1 ref -> SNR = 20 dB
    assert up["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert up["snr_db"] == pytest.approx(20.0, abs=1e-4)
    assert up["max_abs"] == pytest.approx(0.1 * np.abs(y).max(), rel=1e-4)
    # cand = -ref: opposite direction, noise = 2 ref -> SNR = -20 log10(2)
    assert neg["cosine"] == pytest.approx(-1.0, abs=1e-9)
    assert neg["snr_db"] == pytest.approx(-20 * math.log10(2), abs=1e-4)
    assert neg["max_abs"] == pytest.approx(2 * np.abs(y).max(), rel=1e-5)
    assert res["samples"] == 4 and res["input_shapes"] == {"x": [2, 8]}


def test_random_inputs_for_dynamic_dims(models, tmp_path):
    d, base, cands, data = models
    res = bench(base, cands[:1], config=BenchConfig(**FAST))  # dynamic dims default to 1 (README's bench line)
    assert res["input_shapes"] == {"x": [1, 3, 16, 16]}
    res = bench(base, cands[:1], config=BenchConfig(**{**FAST, "profiles": {"x": ((2, 3, 16, 16),) * 3}}))
    assert res["input_shapes"] == {"x": [2, 3, 16, 16]} and res["baseline"]["batch"] == 2
    assert res["data"].startswith("random")


def test_cli_bench(models, tmp_path):
    d, base, cands, data = models
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", str(base), *map(str, cands), "--backend", "onnxrt", "--warmup", "1",
                                  "--iters", "3", "--data", str(data), "--samples", "2", "--report", str(out),
                                  "--label", "fp32", "--label", "fp16", "--label", "int8", "--label", "fp8"])
    assert r.exit_code == 0, r.output
    assert "| model | size (MB) | median (ms) |" in r.output
    for label in ("fp32 (baseline)", "| fp16 |", "| int8 |", "| fp8 |"):
        assert label in r.output
    rep = json.loads(out.read_text())
    assert [c["label"] for c in rep["candidates"]] == ["fp16", "int8", "fp8"] and rep["samples"] == 2
    best = max(rep["candidates"], key=lambda c: c["speedup"])
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"benchmarked 4 models on onnxrt (cpu): best speedup {best['speedup']:.2f}x ({best['label']}) over fp32")
    assert last.endswith(f"; wrote {out}")


def test_cli_bench_fp8_fallback_said_once(tmp_path):
    """ORT's level 'all' cannot load this FP8 graph; the bench says so once (the table's note), not also as a log line."""
    base = tiny.save(tiny.transformer(), tmp_path / "t.onnx")
    quantize(base, tmp_path / "t8.onnx", config=QuantConfig(mode="fp8", progress=False), calib_random=2, shapes={"ids": (1, 16)})
    r = CliRunner().invoke(main, ["bench", base, str(tmp_path / "t8.onnx"), "--backend", "onnxrt", "--warmup", "0",
                                  "--iters", "1", "--samples", "1", "--shapes", "ids:1x16"])
    assert r.exit_code == 0, r.output
    assert r.output.count("timed at ORT level 'basic'") == 1 and "WARNING" not in r.output


def test_cli_bench_cuda_fallback(models, monkeypatch):
    from onnxopt import ort
    d, base, cands, data = models
    monkeypatch.setattr(ort, "_unavailable", lambda name: "no CUDA libraries" if name == "cuda" else None)
    monkeypatch.setattr(ort, "_fallen_back", set())
    args = ["bench", str(base), str(cands[1]), "--backend", "onnxrt", "--warmup", "0", "--iters", "1", "--data", str(data),
            "--provider", "cuda"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.startswith("error: ONNX Runtime cannot use CUDA here (no CUDA libraries); install onnxruntime-gpu")
    r = CliRunner().invoke(main, args + ["--allow-cpu-fallback"])
    assert r.exit_code == 0, r.output
    assert "ONNX Runtime 1." in r.output and " cpu, " in r.output and "on onnxrt (cpu)" in r.output


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxrt", "--label", "a"], "1 labels for 2 models"),
    (["--backend", "onnxrt", "--shapes", "x:1x3/2"], "bad --shapes entry"),
    (["--backend", "onnxrt", "--shapes", "x:2x3x16x16/1x3x16x16/2x3x16x16"], "min <= opt <= max"),
])
def test_cli_bench_errors(models, args, message):
    d, base, cands, data = models
    r = CliRunner().invoke(main, ["bench", str(base), str(cands[0]), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_cli_missing_model(models):
    d, base, cands, data = models
    r = CliRunner().invoke(main, ["bench", str(base), str(d / "nope.onnx"), "--backend", "onnxrt"])
    assert r.exit_code == 2 and "nope.onnx: no such model file" in r.output


@pytest.mark.skipif(_have_trt(), reason="tensorrt imports here")
def test_cli_trt_backend_without_tensorrt(models):
    d, base, cands, data = models
    r = CliRunner().invoke(main, ["bench", str(base), str(cands[0]), "--backend", "trt"])
    assert r.exit_code == 2
    from onnxopt.trt import install_hint
    assert f"TensorRT is not importable; install the trt extra: {install_hint('trt')}" in r.output
