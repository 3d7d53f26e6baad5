"""Quantization building blocks: `rules` (where TensorRT fuses Q/DQ), `writer` (the one writer: a QuantPlan
into Q/DQ), `qdq` (per-tensor activation and per-channel weight insertion), `int4` (weight-only layer selection
and AWQ), `bias_correction`; the formats' numbers are in `onnxopt.formats`. The passes that use them are in `onnxopt.passes`; the
flat `QuantConfig` / `quantize()` API lives in `onnxopt.api` and is re-exported here."""
from __future__ import annotations

_COMPAT = ("QuantConfig", "QuantResult", "quantize", "prepare", "MODES", "DEFAULT_METHOD", "MIN_OPSET")


def __getattr__(name):
    # Lazy: onnxopt.api builds on the passes, which build on this package's modules.
    if name in _COMPAT:
        from .. import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
