"""Model-family presets: what the field does for a given network, as the QuantConfigs `quantize --preset` starts
from (`config`) and as pipeline recipes for `onnxopt.run` (`recipe`, through `onnxopt.api.recipe`).

SDXL UNet (as models/sdxl_unet.py exports it, or any legacy-exporter export of diffusers'
UNet2DConditionModel, whose node names follow the module tree: /time_embedding/linear_1/Gemm,
/add_embedding/linear_2/Gemm, /conv_in/Conv, /conv_out/Conv):
- FP8 (E4M3, W8A8): every Conv/MatMul/Gemm but the conditioning embeddings and the first/last convs;
  plus Q/DQ on the attention batched matmuls (Q·Kᵀ, softmax·V) and the softmax output, as TensorRT's
  fused FP8 MHA expects; max calibration (FP8's range is wide enough that clipping outliers hurts more
  than it helps).
- INT8: SmoothQuant (α = 0.8) to move activation outliers into the weights, percentile calibration,
  no MHA quantization (INT8 attention hurts image quality).
"""
from __future__ import annotations

from dataclasses import replace

from . import api
from .errors import OnnxoptError
from .passes.blockfp import BlockFP
from .pipeline import Recipe
from .api import QuantConfig

# The field's usual exclusions for diffusion UNets (time/text conditioning MLPs, first and last conv):
# small layers, sensitive to error, no speed to gain.
SDXL_EXCLUDE = (
    r"(^|/)time_embedding/",
    r"(^|/)add_embedding/",
    r"(^|/)conv_in/",
    r"(^|/)conv_out/",
)
SDXL_SMOOTHQUANT_ALPHA = 0.8
# CFG pairs are calibrated one image at a time: the statistics are the same (max, percentile and
# per-channel max see the same elements) and the activation peak of a 1024x1024 forward halves.
SDXL_CALIB_MAX_BATCH = 1
SDXL_INT8_PERCENTILE = 99.99


def sdxl_fp8(**overrides) -> QuantConfig:
    """FP8 recipe for the SDXL UNet; keyword arguments override QuantConfig fields (e.g. provider)."""
    cfg = QuantConfig(mode="fp8", calib_method="max", exclude=SDXL_EXCLUDE, quantize_mha=True,
                      calib_max_batch=SDXL_CALIB_MAX_BATCH)
    return replace(cfg, **overrides) if overrides else cfg


def sdxl_int8(**overrides) -> QuantConfig:
    """INT8 recipe for the SDXL UNet: SmoothQuant α=0.8, percentile calibration, no MHA quantization."""
    cfg = QuantConfig(mode="int8", calib_method="percentile", percentile=SDXL_INT8_PERCENTILE,
                      exclude=SDXL_EXCLUDE, quantize_mha=False, smoothquant=SDXL_SMOOTHQUANT_ALPHA,
                      calib_max_batch=SDXL_CALIB_MAX_BATCH)
    return replace(cfg, **overrides) if overrides else cfg


def sdxl(mode: str = "fp8", **overrides) -> QuantConfig:
    """The SDXL recipe for `mode` ("fp8", "int8", or "nvfp4"/"mxfp8": FP8's with the block format on its GEMMs)."""
    by_mode = {"fp8": sdxl_fp8, "int8": sdxl_int8}
    # Block formats (NVFP4, MXFP8) take FP8's exclusions and calibration; the block format goes on the GEMMs it allows.
    # Round-to-nearest weights (--awq none): on the tiny UNet AWQ full gave 0.99001 vs 0.99020 without, at 12x the
    # time, and at full size (2.2 B GEMM weights, K up to 10240) its search does not fit minutes; --awq overrides.
    by_mode.update({n: lambda m=n, **o: sdxl_fp8(**{"mode": m, "awq": "none", **o}) for n in BlockFP.FORMATS})
    if mode not in by_mode:
        raise OnnxoptError(f"the sdxl preset has {', '.join(by_mode)} recipes, not '{mode}'; use --fp8 or --int8")
    return by_mode[mode](**overrides)


# name -> function(mode, **overrides) -> QuantConfig; `onnxopt quantize --preset NAME` looks here.
PRESETS = {"sdxl": sdxl}


def config(name: str, mode: str = "fp8", **overrides) -> QuantConfig:
    """QuantConfig of preset `name` for `mode`, with QuantConfig field overrides."""
    if name not in PRESETS:
        raise OnnxoptError(f"unknown preset '{name}'; use one of {', '.join(PRESETS)}")
    return PRESETS[name](mode, **overrides)


def recipe(name: str, mode: str = "fp8", **overrides) -> Recipe:
    """Passes of preset `name` for `mode` (plus its calibration batch split), for `onnxopt.run`."""
    return api.recipe(config(name, mode, **overrides))
