"""Mixed precision to a target: a per-layer format search on the ONNX graph, without gradients.

1. Candidates: every Conv/ConvTranspose/MatMul/Gemm gets the formats the TensorRT placement rules allow
   (`quant.rules.plan` run once per 8-bit format; INT4 weight-only only for MatMul/Gemm weights), plus "none".
   "int8-sq" (smooth.py) is SmoothQuant then INT8 W8A8, for the INT8-planned layers with a constant weight.
2. Calibration once: max |x| (FP8) and the MSE clip (INT8) of every candidate activation, and the input
   means for bias correction, in one pass; reused for every candidate and for the final graph. The same
   pass keeps per-channel maxima and row samples of int8-sq inputs: alpha, then the INT8 clip of x ⊘ s, are
   chosen per activation by the simulated output error (as onnxopt.rewrite.smoothquant does).
3. Sensitivity: ONE fake-quant graph where each candidate (layer, format) sits behind a gate that is a
   graph input, y = x + g·(QDQ(x) − x) on activations and W + g·(Wq − W) on weights (plus g·bias
   correction), so one ORT session (ORT_DISABLE_ALL) measures "only this layer in this format" exactly by
   feeding a one-hot gate vector. Error = 1 − mean cosine of the output against the FP32 reference.
4. Choice (Lagrangian relaxation of the knapsack): each layer picks the format minimising
   cost + λ·error; λ is bisected so that the summed error fits a budget (or, for `bits`, the weight-bit
   budget). The error budget itself is searched against the metric measured on the held-out batches
   (a cosine with k = 1.64 standard errors of its per-sample mean to spare) with the gated graph, which is
   the chosen mix exactly; that search is the repair
   step: a mix that misses the target promotes its most sensitive layers (the smaller budget does). The
   bisection stops when the passing and failing budgets are within 1.15x (MiniLM: the additive prediction
   of 1 − cosine is within a few % of the measured one, so the finer grid is worth its trials); a mix
   reached by two budgets is measured once.
"""
from .candidates import (ABITS, FORMATS, GATES, PLANNED, WBITS, Candidates, Layer,
                         calibrate, candidates)
from .block_helpers import block_awq
from .smooth import SQ
from .choose import Totals, bits_of, collapse, improve, mix_for_bits, mix_for_error, totals
from .search import search_target
from .evaluate import Evaluator, Memo, load_sensitivities, measure, save_sensitivities
from ..quant.writer import fake_weight
from .gated import Codes, build_gated, macs_of, shape_outputs
from . import staged
from .staged import StagedEvaluator
from .sampled import SampledEvaluator

__all__ = ["ABITS", "FORMATS", "GATES", "PLANNED", "SQ", "WBITS", "Candidates", "Evaluator", "Layer", "Memo",
           "Codes", "SampledEvaluator", "StagedEvaluator", "Totals", "bits_of", "block_awq", "build_gated", "calibrate", "candidates", "collapse", "fake_weight",
           "improve",
           "load_sensitivities", "macs_of", "measure", "mix_for_bits", "mix_for_error", "save_sensitivities",
           "search_target", "shape_outputs", "staged", "totals"]
