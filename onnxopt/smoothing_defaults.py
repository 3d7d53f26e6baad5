"""SmoothQuant as `quantize`'s default where it was measured to help: INT8 MatMuls (`Format.smoothquant_default`).

Symmetric per-tensor INT8 activations lose most on transformer GEMM inputs: LayerNorm outputs with outlier channels
and GELU outputs spanning [-0.17, 17]. SmoothQuant with alpha searched per activation, after centring each channel
(rewrite/shift.py), took `--int8` on the ALBERT stand-in (MiniLM's layer 2 shared by 12 depths) from output cosine
0.935 to 0.991 and on MiniLM from 0.988 to 0.997 (BENCHMARKS.md "Uniform INT8 on ALBERT-style sharing"). It is not
a default for convolutions (EfficientNet-Lite0 `--int8 --smoothquant auto`: top-1 agreement 0.969 vs 0.992 without),
Gemm (measured nowhere to help: the same model's classifier head smoothed kept its top-1 agreement) nor diffusion
denoisers (not measured for INT8; SmoothQuant cost the FP8 denoiser recipe 4 dB, onnxopt.denoiser).
The user's `--smoothquant` (an alpha, auto or none) and presets win; `--auto` and the Python API's QuantConfig are
untouched (QuantConfig(smoothquant="auto", smoothquant_op_types=("MatMul",)) asks for the same).
"""
from __future__ import annotations

from dataclasses import replace

import onnx

from . import denoiser
from . import formats as registry

OFF = "--smoothquant none"


def apply(config, model: onnx.ModelProto | None, *, given: bool, preset: str | None = None, has_data: bool = True):
    """(config, note): `config` (an api.QuantConfig) with SmoothQuant auto on the format's default op types when
    the user did not give --smoothquant (`given`), and the line the summary adds (None when nothing changed). Without
    calibration data (`has_data`) nothing changes: the quantizer's own error says what is missing."""
    fmt = registry.get(config.mode)
    ops = tuple(o for o in fmt.smoothquant_default if o in config.op_types)
    if (given or preset or config.auto or not has_data or not fmt.smoothquant or not ops or config.smoothquant is not None
            or model is None or not any(n.op_type in ops for n in model.graph.node) or denoiser.detect(model) is not None):
        return config, None
    note = f"SmoothQuant auto on {'/'.join(ops)} layers, the --{config.mode} default (off: {OFF})"
    return replace(config, smoothquant="auto", smoothquant_op_types=ops), note
