"""TensorRT-RTX engines of the tiny SDXL UNet (exported here, random weights) in FP16, FP8 (sdxl preset),
INT8 (sdxl preset) and INT4, built on the CPU, with asserts on the engine report. Slow: the export and
four builds of a 326-layer graph take minutes on two cores."""
from __future__ import annotations

import pytest

from onnxopt import QuantConfig, diffusion, modelfile, presets, quantize
from onnxopt.api import convert
from onnxopt.inspection import engine_findings
from onnxopt.trt import report as R
from onnxopt.trt import rtx_available
from onnxopt.trt.build import BuildConfig, parse_profiles

pytestmark = [pytest.mark.slow, pytest.mark.rtx,
              pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")]

TINY_PX = 256
SHAPES = ["sample:2x4x32x32", "encoder_hidden_states:2x77x2048", "text_embeds:2x1280", "time_ids:2x6"]
BLOCKS = 34  # attention blocks of the tiny UNet: 17 self + 17 cross


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    from models import sdxl_unet
    d = tmp_path_factory.mktemp("rtx_sdxl")
    path = sdxl_unet.export(d / "unet.onnx", scale="tiny", seed=0)
    diffusion.save_npz(diffusion.synthesize_sdxl(4, steps=30, shapes=diffusion.SDXLShapes(TINY_PX, TINY_PX)), d / "calib.npz")
    return d, path


def _report(path, strict=True):
    rep = R.engine_report_of(path, BuildConfig(profiles=parse_profiles(SHAPES)))
    assert rep["attention"]["blocks"] == BLOCKS
    if strict:
        assert not R.disagreements(engine_findings(modelfile.import_graph(modelfile.load(path))), rep)
        assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] and not rep["fallbacks"]
    return rep


def test_fp8_preset_fuses_all_attention(unet):
    d, path = unet
    quantize(path, d / "fp8.onnx", config=presets.sdxl_fp8(progress=False), data=d / "calib.npz")
    rep = _report(d / "fp8.onnx")
    assert rep["quantized_layers"] > 300
    assert rep["attention"]["fused_by_precision"] == {"fp8": BLOCKS} and not rep["attention"]["quantized_unfused"]
    assert rep["weights"]["vs_fp16"] < 0.55 and set(rep["dropped_targets"]) == {"8.0", "8.6"}


def test_int8_preset(unet):
    d, path = unet
    quantize(path, d / "int8.onnx", config=presets.sdxl_int8(progress=False), data=d / "calib.npz")
    rep = _report(d / "int8.onnx")
    assert rep["quantized_layers"] > 100 and rep["attention"]["quantized_blocks"] == 0  # the preset keeps MHA in FP16
    assert rep["attention"]["fused_by_precision"] == {"fp16": BLOCKS}


def test_fp16_and_int4(unet):
    d, path = unet
    rep = _report(convert(path, d / "fp16.onnx"))
    assert rep["quantized_layers"] == 0 and rep["attention"]["fused_by_precision"] == {"fp16": BLOCKS}
    quantize(path, d / "int4.onnx", config=QuantConfig(mode="int4", awq="none", progress=False), data=d / "calib.npz")
    rep4 = _report(d / "int4.onnx")
    # Every INT4 layer in the builder's fused weight-only GEMM, including the 161 with K <= 128 (one block of
    # 128 along K), which the writer splits into two half blocks with the same scale.
    assert rep4["quantized_layers"] > 200 and not rep4["int4_dq_kernels"]
    assert rep4["weights"]["engine_weights_memory"] < 0.8 * rep["weights"]["engine_weights_memory"]


def test_nvfp4_preset_builds_at_batch_1_and_2(unet):
    # TensorRT-RTX 1.7.1 failed this at batch 2 (Myelin "perm.size() == t.size()") while its cross-attention value
    # projections, all reading encoder_hidden_states, were NVFP4: now FP8 (quant.rules), every NVFP4 layer an FP4 kernel.
    d, path = unet
    quantize(path, d / "nvfp4.onnx", config=presets.config("sdxl", "nvfp4", progress=False), data=d / "calib.npz")
    rep = _report(d / "nvfp4.onnx")  # SHAPES: batch 2
    assert rep["kernel_precisions"].get("nvfp4", 0) >= 170
    assert all(r["engine"] == "nvfp4" for r in rep["layers"] if r["graph"].startswith("nvfp4"))
    one = [s.replace(":2x", ":1x") for s in SHAPES]
    rep1 = R.engine_report_of(d / "nvfp4.onnx", BuildConfig(profiles=parse_profiles(one)))
    assert rep1["quantized_in_quantized_kernels"] == rep1["quantized_layers"] == rep["quantized_layers"]
