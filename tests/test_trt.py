"""TensorRT builds and the trt bench backend. Tests marked `trt` build real engines and run wherever
tensorrt imports (conftest skips them elsewhere); the others check the pure-ONNX helpers that decide
the build (profiles, precision flags, 2:4 detection) and the error without TensorRT."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from onnxopt import api
from onnxopt import QuantConfig, modelfile, quantize
from onnxopt.api import convert
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.trt import MISSING, available
from onnxopt.trt.build import BuildConfig, build, has_sparse_weights, parse_profiles, precision_of

SHAPES = {"x": (1, 3, 16, 16)}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    base = d / "cnn.onnx"
    modelfile.save(tiny.cnn(), base)
    return d, base


def test_parse_profiles():
    p = parse_profiles(["sample:1x4x64x64/2x4x128x128/4x4x128x128", "t:1"])
    assert p == {"sample": ((1, 4, 64, 64), (2, 4, 128, 128), (4, 4, 128, 128)), "t": ((1,), (1,), (1,))}
    assert parse_profiles([]) == {}
    for bad in ("x", "x:1x2/1x2", "x:1xa"):
        with pytest.raises(OnnxoptError, match="bad --shapes"):
            parse_profiles([bad])
    with pytest.raises(OnnxoptError, match="same rank"):
        parse_profiles(["x:1x2/1x2x3/1x2x3"])


def test_precision_of(cnn):
    d, base = cnn
    assert precision_of(modelfile.load(base)) == precision_of(tiny.cnn())
    p = precision_of(modelfile.load(base))
    assert not (p.fp16 or p.bf16 or p.int8 or p.fp8 or p.int4)
    p = precision_of(modelfile.load(convert(base, d / "fp16.onnx")))
    assert p.fp16 and not (p.int8 or p.fp8 or p.bf16)
    p = precision_of(modelfile.load(convert(base, d / "bf16.onnx", dtype="bf16")))
    assert p.bf16 and not p.fp16
    for mode in ("int8", "fp8"):
        q = quantize(base, config=QuantConfig(mode=mode, progress=False), calib_random=2, shapes=SHAPES).model
        p = precision_of(q)
        assert p.fp16 and p.int8 == (mode == "int8") and p.fp8 == (mode == "fp8") and not p.int4


def test_precision_of_int4_weights():
    pytest.importorskip("onnxopt.quant.int4_weights")
    q = quantize(tiny.transformer(), config=QuantConfig(mode="int4", awq="none", block_size=32, progress=False),
                 calib_random=2, shapes={"ids": (1, 16)}).model
    p = precision_of(q)
    assert p.int4 and not (p.int8 or p.fp8)


def test_sparse_weights_detected(cnn):
    d, base = cnn
    assert not has_sparse_weights(modelfile.load(base))
    api.sparsify_model(base, d / "sparse.onnx", min_params=16, progress=False)
    assert has_sparse_weights(modelfile.load(d / "sparse.onnx"))
    q = quantize(d / "sparse.onnx", config=QuantConfig(mode="int8", progress=False), calib_random=2, shapes=SHAPES).model
    assert has_sparse_weights(q)  # seen through the weights' DequantizeLinear


@pytest.mark.skipif(available(), reason="tensorrt imports here")
def test_build_without_tensorrt(cnn, tmp_path):
    d, base = cnn
    with pytest.raises(OnnxoptError) as e:
        build(base, tmp_path / "m.plan")
    assert str(e.value) == MISSING
    r = CliRunner().invoke(main, ["build", str(base), "-o", str(tmp_path / "m.plan"), "--shapes", "x:1x3x16x16"])
    from onnxopt.trt import install_hint
    assert r.exit_code == 2 and f"install the trt extra: {install_hint('trt')}" in r.output
    assert not (tmp_path / "m.plan").exists()


def test_build_rejects_bad_input(tmp_path):
    r = CliRunner().invoke(main, ["build", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "m.plan")])
    assert r.exit_code == 2 and "no such model file" in r.output
    r = CliRunner().invoke(main, ["build", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "m.plan"), "--opt-level", "9"])
    assert r.exit_code == 2


# ---------------------------------------------------------------- real TensorRT
@pytest.mark.trt
def test_build_fp16_engine(cnn, tmp_path):
    import tensorrt as trt
    d, base = cnn
    fp16 = convert(base, tmp_path / "fp16.onnx")
    cache = tmp_path / "timing.cache"
    cfg = BuildConfig(profiles={"x": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}, timing_cache=cache, opt_level=1,
                      workspace_mb=256)
    res = build(fp16, tmp_path / "fp16.plan", config=cfg)
    assert res.path.stat().st_size > 0 and cache.stat().st_size > 0
    assert res.tensorrt == trt.__version__
    assert res.strongly_typed and res.precision_flags == ()  # strongly typed by default on 10 and 11
    assert not res.sparse_weights


@pytest.mark.trt
def test_bench_trt(cnn, tmp_path):
    """FP32 baseline -> FP16 engine made by bench; candidates: FP16 (same graph), INT8, FP8."""
    from onnxopt.bench import BenchConfig, bench, format_table
    d, base = cnn
    cands = [convert(base, tmp_path / "cnn_fp16.onnx")]
    for mode in ("int8", "fp8"):
        quantize(base, tmp_path / f"cnn_{mode}.onnx", config=QuantConfig(mode=mode, progress=False), calib_random=4, shapes=SHAPES)
        cands.append(tmp_path / f"cnn_{mode}.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((2, 1, 3, 16, 16)).astype(np.float32))
    res = bench(base, cands, data=tmp_path / "d.npz", report=tmp_path / "r.json",
                config=BenchConfig(backend="trt", warmup=2, iters=10, samples=2, work_dir=tmp_path / "work",
                                   profiles={"x": ((1, 3, 16, 16),) * 3}))
    assert res["backend"] == "trt" and res["machine"]["gpu"]
    assert res["baseline"]["label"] == "cnn (fp16)" and (tmp_path / "work" / "cnn.fp16.onnx").is_file()
    for row in [res["baseline"]] + res["candidates"]:
        assert row["artifact"].endswith(".plan") and row["size_bytes"] > 0
        assert 0 < row["latency_ms"]["median"] <= row["latency_ms"]["p90"]
    fp16, int8, fp8 = (r["fidelity"] for r in res["candidates"])
    assert fp16["cosine"] > 0.999  # the same FP16 graph, maybe other tactics
    assert int8["cosine"] > 0.99 and fp8["cosine"] > 0.98
    assert json.loads((tmp_path / "r.json").read_text())["backend"] == "trt"
    assert "| cnn (fp16) (baseline) |" in format_table(res)


def test_tensorrt_rtx_is_not_read_as_tensorrt_1():
    from types import SimpleNamespace

    from onnxopt.trt import is_rtx, major_version
    rtx = SimpleNamespace(__name__="tensorrt_rtx_bindings", __version__="1.7.1.116")
    assert is_rtx(rtx) and not is_rtx(SimpleNamespace(__name__="tensorrt", __version__="10.13.0"))
    assert major_version(SimpleNamespace(__name__="tensorrt", __version__="11.0.1")) == 11
    with pytest.raises(OnnxoptError, match="TensorRT-RTX 1.7.1.116 is not full TensorRT; build with --backend rtx"):
        major_version(rtx)
