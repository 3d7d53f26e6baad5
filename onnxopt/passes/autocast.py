"""Autocast pass: FP16/BF16 for everything not quantized (onnxopt.autocast), the FP32 region chosen from
measured ranges (onnxopt.precision). A quantizing pass before it measures the ranges in its own calibration
pass (`ctx.range_reducers`); otherwise this pass measures them on the calibration data, or on a few generated
samples where the input shapes are static. It also leaves `ctx.rebuild`, which the runner's finite-output check
calls to convert again with more nodes in FP32."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import autocast, calib, finite, formats, modelfile, precision
from ..errors import OnnxoptError
from .base import PassBase, check_choice

log = logging.getLogger(__name__)

IO_DTYPES = formats.low_precision()
GENERATED_SAMPLES = 2  # when no data is given: enough to find the overflows that the weights alone cause


@dataclass
class Autocast(PassBase):
    dtype: str = formats.FP16.name     # one of formats.high_precision() ("fp32": leave everything in FP32)
    io_dtype: str | None = None        # also convert graph inputs/outputs; None keeps them
    keep_fp32_ops: tuple = ()          # op types left in FP32
    keep_fp32_nodes: tuple = ()        # node names left in FP32
    measure_ranges: bool = True        # keep FP32 where measured ranges overflow or lose precision in `dtype`
    name = "autocast"

    def __post_init__(self):
        check_choice(self.dtype, tuple(autocast.DTYPES), "precision")
        if self.io_dtype is not None:
            check_choice(self.io_dtype, IO_DTYPES, "--io-dtype")
        self.keep_fp32_ops = (self.keep_fp32_ops,) if isinstance(self.keep_fp32_ops, str) else tuple(self.keep_fp32_ops)
        self.keep_fp32_nodes = (self.keep_fp32_nodes,) if isinstance(self.keep_fp32_nodes, str) else tuple(self.keep_fp32_nodes)

    @property
    def min_opset(self) -> int:
        """The opset the graph needs in `dtype` (BF16 Conv: 22; FP16: any)."""
        return formats.get(self.dtype).min_opset

    @property
    def high_precision(self) -> str:
        """Scales of the quantization passes are rounded to what the rest of the graph runs in."""
        return self.dtype

    @property
    def wants_ranges(self) -> bool:
        return self.measure_ranges and self.dtype in formats.low_precision()

    def check_recipe(self, recipe, index: int) -> None:
        if index != len(recipe) - 1:
            raise OnnxoptError("Autocast must be the last pass: the passes before it work on the FP32 graph")

    def run(self, ctx) -> dict:
        ranges = self._ranges(ctx) if self.wants_ranges else None
        keep_nodes = self.keep_fp32_nodes + tuple(ctx.fp32_nodes)
        if ctx.reference is not None and finite.runs_outputs(ctx.reference, ctx.memory_budget_mb):
            before = modelfile.export_graph(ctx.graph, opset=ctx.opset or None)  # lazy weights: no copy
            ctx.rebuild = autocast.reconverter(before, self.dtype, io_dtype=self.io_dtype, keep_fp32_ops=self.keep_fp32_ops,
                                               ranges=ranges, opset=ctx.opset or None, keep_fp32_nodes=keep_nodes)
        return autocast.to_low_precision(ctx.graph, self.dtype, io_dtype=self.io_dtype, keep_fp32_ops=self.keep_fp32_ops,
                                         keep_fp32_nodes=keep_nodes, ranges=ranges)

    def _ranges(self, ctx) -> dict | None:
        if ctx.range_reducers is not None:  # measured by the quantizing pass's calibration
            return precision.ranges_of(ctx.range_reducers)
        data = ctx.data
        if data is None and ctx.reference is not None:
            try:
                data = calib.CalibData.random(calib.input_specs(ctx.reference), GENERATED_SAMPLES)
                ctx.check_data = data
            except OnnxoptError as e:
                log.info("cannot generate samples (%s)", e)
        if data is None:
            log.warning("no calibration data (--calib, or --calib-random N with --shapes for dynamic inputs): "
                        "%s value ranges were not checked", self.dtype)
            return None
        reducers = precision.range_reducers(ctx.graph)
        try:
            calib.collect_graph(ctx.graph, data, reducers, provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb,
                                progress=ctx.progress, desc="measuring ranges")
        except OnnxoptError as e:
            if ctx.data is not None:
                raise
            log.warning("generated samples do not run (%s); pass --calib: %s value ranges were not checked", e, self.dtype)
            ctx.check_data = None
            return None
        return precision.ranges_of(reducers)
