"""NVFP4 weights: the fast per-block scale search against its plain reference, AWQ's data-aware clip search and
error-feedback rounding with FP4 codes, and the block formats' footprint outside formats/ (issue 23)."""
import ast
from pathlib import Path

import numpy as np
import pytest

from onnxopt import formats
from onnxopt.rewrite import awq
from onnxopt.formats import mxfp8, nvfp4
from onnxopt.formats.fp8 import FP8_E4M3

F = formats.NVFP4


def _reference_parts(w):
    """The recipe spelled plainly: per block the CLIP_RATIOS candidate of least squared error (exact rounding)."""
    k, n = w.shape
    s = nvfp4.tensor_scale(np.abs(w).max())
    wb = w.reshape(k // 16, 16, n)
    amax = np.abs(wb).max(1)
    best_err = best = None
    for r in nvfp4.CLIP_RATIOS:
        bs = nvfp4.block_scale_codes((amax * np.float32(r)).astype(np.float32), s)
        eff = (FP8_E4M3.to_float(bs) * s).astype(np.float32)[:, None, :]
        err = np.square(nvfp4.round_e2m1(wb / np.where(eff > 0, eff, np.float32(1))) * eff - wb).sum(1)
        if best is None:
            best_err, best = err, bs
        else:
            m = err < best_err
            best_err, best = np.where(m, err, best_err), np.where(m, bs, best)
    eff = (FP8_E4M3.to_float(best) * s).astype(np.float32)
    codes = nvfp4.round_e2m1(w / nvfp4.expand(np.where(eff > 0, eff, np.float32(1)), k))
    return codes, best, s


@pytest.mark.parametrize("shape", [(64, 48), (1024, 1536)])  # the second runs the chunked, threaded path
def test_fast_search_gives_the_reference_codes_and_scales(shape):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * np.exp(rng.standard_normal((1, shape[1])))).astype(np.float32)
    w[:16, 0] = 0  # an all-zero block
    w[16:32, 1] = 1e-3  # a flat block: every ratio ties
    p = F.quantize_parts(w)
    codes, bs, s = _reference_parts(w)
    assert p.scale == s
    assert np.array_equal(p.block_scales.view(np.uint8), bs.view(np.uint8))
    assert np.array_equal(p.codes.astype(np.float32), codes)


def test_cast_codes_are_ml_dtypes_codes_at_ties_and_saturation():
    y = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6.25, 7, 1e30, -0.1, -5, 0.2500001, 4.9999995], np.float32)
    import ml_dtypes
    assert np.array_equal(F.cast(y).view(np.uint8), y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8))


def _layer(seed=0, k=128, n=64, rows=512):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32) * np.exp(rng.standard_normal(k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    return x.T.astype(np.float64) @ x, w


def _out_err(h, w, deq):
    d = (deq - w).astype(np.float64)
    return float(np.sum((h @ d) * d))


def test_clip_search_and_error_feedback_lower_the_output_error():
    h, w = _layer()
    rtn = _out_err(h, w, F.fake_quant(w, 1, clip=np.ones((w.shape[0] // 16, w.shape[1]), np.float32)))
    clip, info = awq.search_clip(h, w, 16, fmt=F)
    clipped = _out_err(h, w, F.fake_quant(w, 1, clip=clip))
    assert clipped < rtn and info["clip"] <= info["rtn"]
    scale = F.block_scales(w, 16, clip)
    q = awq.gptq_round(w, h, scale, 16, fmt=F)
    assert q.dtype == F.np_dtype
    fed = F.fake_quant(w, 1, clip=(q, scale))  # the writer's path: codes kept, FP8 block scales recovered
    assert np.array_equal(fed, F.dequantize(q, scale))
    assert _out_err(h, w, fed) < 0.95 * clipped  # 12% lower on this layer


def test_int4_clip_candidates_unchanged():
    """The INT4 candidates moved into the format: same values as the formula AWQ used."""
    _, w = _layer(k=256)
    got = formats.INT4.block_candidates(w, slice(0, 128), awq.CLIP_RATIOS, "fp32", 128)
    amax = np.abs(w[:128]).max(0)
    r = np.asarray(awq.CLIP_RATIOS, np.float32)[:, None]
    scale = formats.round_scale(np.where(amax > 0, amax * r / 7, 1.0), "fp32")[:, None, :]
    assert np.array_equal(got, np.clip(np.rint(w[:128][None] / scale), -8, 7) * scale)


def test_registry_names_the_block_formats_ops():
    assert mxfp8.DQ_OP in formats.dequantize_ops() and "DequantizeLinear" in formats.dequantize_ops()
    assert formats.from_dequantize_op(mxfp8.DQ_OP) is formats.MXFP8
    assert formats.from_dequantize_op("DequantizeLinear") is None
    assert formats.from_dynamic_op(nvfp4.DYNAMIC_OP) is formats.NVFP4
    assert formats.block_format_of("float4_e2m1fn") is formats.NVFP4
    assert formats.block_format_of("float8_e4m3fn") is None  # plain FP8
    assert formats.block_format_of("float8_e4m3fn", [mxfp8.DQ_OP]) is formats.MXFP8
    assert formats.with_weight_only_variant() == (formats.NVFP4.name,)


def test_block_formats_are_not_named_outside_formats():
    """Outside formats/ (and the pass that writes any dynamic block format), no module imports a block format's
    module or names its object: they ask the registry (issue 23's footprint of NVFP4/MXFP8)."""
    root = Path(formats.__file__).resolve().parents[1]
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("formats/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] in ("nvfp4", "mxfp8"):
                bad.append(f"{rel}:{node.lineno} imports {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("NVFP4", "MXFP8", "nvfp4", "mxfp8"):
                bad.append(f"{rel}:{node.lineno} names {node.attr}")
            if isinstance(node, ast.Constant) and node.value in ("nvfp4", "mxfp8"):
                bad.append(f"{rel}:{node.lineno} spells '{node.value}'")
    assert not bad, "; ".join(bad)


def test_nvfp4_defaults_to_awq_full_with_data(tmp_path):
    """With calibration data --nvfp4 (here weight-only) runs AWQ full: scales, clip ratios, error-feedback rounding;
    the written FP4 codes are the rounded ones, and the file still lowers to an emulation ORT runs."""
    import onnxopt
    import tiny
    from onnxopt import ort as ortx
    from onnxopt.emulate import emulated_view
    src = tiny.save(tiny.transformer(d=64, seq=16), tmp_path / "t.onnx")
    res = onnxopt.quantize(src, tmp_path / "o.onnx", config=onnxopt.QuantConfig(mode="nvfp4", weight_only=True, progress=False),
                           calib_random=8, shapes={"ids": (2, 16)})
    awq_report = res.report["blockfp"]["awq"]
    assert awq_report["method"] == "full"
    assert all({"clip", "gptq_error"} <= set(v) for v in awq_report["layers"].values())
    sess = ortx.session(emulated_view(onnxopt.modelfile.load(tmp_path / "o.onnx")), level="disable")
    ids = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int64)
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: ids})[0]).all()


def test_sdxl_preset_block_formats_round_to_nearest():
    from onnxopt import presets
    for mode in ("nvfp4", "mxfp8"):
        assert presets.config("sdxl", mode).awq == "none"
    assert presets.config("sdxl", "nvfp4", awq="full").awq == "full"
    assert presets.config("sdxl", "fp8").awq == presets.config("sdxl", "fp8", awq="full").awq  # FP8's recipe unchanged
