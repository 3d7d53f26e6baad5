"""Quantization building blocks: `rules` (where TensorRT fuses Q/DQ), `writer` (the one writer: a QuantPlan
into Q/DQ), `qdq` (per-tensor activation and per-channel weight insertion), `int4` (weight-only layer selection
and AWQ), `bias_correction`; the formats' numbers are in `onnxopt.formats`. The passes that use them are in `onnxopt.passes`. The
flat `QuantConfig` / `quantize()` API is `onnxopt.api`."""
