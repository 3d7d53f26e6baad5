"""Per-channel weights rounded with error feedback (GPTQ, Frantar et al. 2023) from the calibration data.
The rounding itself is `shared_rounding.round_with_feedback` (one error-feedback function for per-channel
weights); this module adds the per-layer Hessians (Conv im2col rows included) and the bounds.

Round-to-nearest makes each weight's own error small; what the model sees is the layer output error
||X (W - Q)||, which is weight error times activations. With H = XᵀX of the layer input (rows sampled from the
calibration pass the static formats already run), each input channel is rounded in turn and its error is fed
back into the channels not yet rounded, so the output error, not the weight error, is what the rounding
minimizes. Same codes, same per-channel scales and the same graph as round-to-nearest: TensorRT sees no
difference in placement or size. On the terrain UNet (BENCHMARKS.md "FP8 weights rounded with error feedback")
it lowers the FP8 output error of its level convs by 10-20 dB per layer.

Bounded: Hessians are float64 K x K from at most `rows_for(K)` sampled rows each, only for layers with
K <= MAX_K, and together within a quarter of the memory budget (smaller K first); the rest keep
round-to-nearest and the report says why. So do layers the calibration gives fewer than 4 K rows (a
rank-deficient Hessian lets the rounding overfit the calibration samples), layers whose weight reaches them
through a view (Transpose/Cast), grouped Conv, ConvTranspose and Gemm with transA. (Adding the activation's
own FP8 rounding noise to the Hessian, H + c diag H, was tried and lost 1.3 dB on the terrain UNet: not used.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import formats, obs
from .. import graph as G
from .. import threads as threads_
from ..calib import ConvView, Hessian, PatchSample, RowSample
from . import qdq, shared_rounding
from .writer import QuantPlan, WeightJob, job_result, quantize_job, weight_jobs

log = logging.getLogger(__name__)

MAX_K = 4096           # input size (C * kernel) above which a layer keeps round-to-nearest (Hessian 128 MB)
ROWS_MIN, ROWS_PER_K, ROWS_MAX = 32768, 64, 131072  # sampled input rows per Hessian: clamp(64 K, 32768, 131072)
DAMP = 0.01            # GPTQ's damping, relative to the mean diagonal
MIN_ROWS_PER_K = 4     # fewer calibration rows than 4 K: the Hessian is too thin to trust (EfficientNet's
                       # classifier Gemm sees one row per image: 64 rows for K = 1280 overfit, top-1 0.93 -> 0.83)


def rows_for(k: int) -> int:
    """Sampled rows per Hessian of a K-input layer (well above K, bounded)."""
    return int(min(ROWS_MAX, max(ROWS_MIN, ROWS_PER_K * k)))


def _layout(node: gs.Node, shape: tuple) -> tuple[int, bool] | None:
    """(K, transposed) of a weight as [K, N] in the layer's input order, or None if error feedback does not apply.
    `transposed`: the stored weight is [N, ...] (Conv, Gemm transB) and is read as its transpose."""
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and len(shape) >= 3:
        return int(np.prod(shape[1:])), True
    if node.op == "MatMul" and len(shape) == 2:
        return int(shape[0]), False
    if node.op == "Gemm" and len(shape) == 2 and not node.attrs.get("transA", 0):
        return (int(shape[1]), True) if node.attrs.get("transB", 0) else (int(shape[0]), False)
    return None


@dataclass
class Feedback:
    """Which layers round with error feedback, their Hessian reducers (for the calibration pass) and why the
    others do not."""
    reducers: dict = field(default_factory=dict)   # input tensor name -> [Hessian reducer, ...]
    keys: dict = field(default_factory=dict)       # layer name -> (tensor, K, conv view): its Hessian
    by_key: dict = field(default_factory=dict)     # (tensor, K, conv view) -> reducer
    skipped: dict = field(default_factory=dict)    # layer name -> why round-to-nearest

    @classmethod
    def plan(cls, placement, batches: int, memory_budget_mb: int) -> "Feedback":
        """Hessians for the weighted layers of a rules placement, smaller K first within a quarter of the budget."""
        fb = cls()
        cands = []
        for node, idx, const, _ in placement.weights:
            lay = _layout(node, tuple(const.shape or ())) if node.inputs[idx] is const else None
            if lay is None:
                fb.skipped[node.name] = "weight through a view, grouped Conv, ConvTranspose or transA"
            elif len(const.outputs) > 1:
                fb.skipped[node.name] = "weight shared by several layers"
            elif lay[0] > MAX_K:
                fb.skipped[node.name] = f"K = {lay[0]} > {MAX_K}"
            else:
                view = ConvView.of(node, tuple(const.shape[2:])) if node.op == "Conv" else None
                cands.append((lay[0], node, (node.inputs[0].name, lay[0], view)))
        left = memory_budget_mb * 2**20 // 4
        for k, node, key in sorted(cands, key=lambda c: c[0]):
            if key not in fb.by_key:
                if 8 * k * k > left:
                    fb.skipped[node.name] = "Hessians beyond a quarter of the memory budget"
                    continue
                left -= 8 * k * k
                rows = rows_for(k)
                # calib's one Hessian over sampled rows: a Conv input's im2col patches, else rows of its last axis
                r = Hessian(k, sample=PatchSample(node, key[2].kernel, rows, batches) if key[2] is not None
                            else RowSample(-1, rows, batches))
                fb.by_key[key] = r
                fb.reducers.setdefault(key[0], []).append(r)
            fb.keys[node.name] = key
        return fb

    def quantize(self, graph: gs.Graph, plan: QuantPlan, *, high_precision: str, threads: int = 0) -> tuple[dict, dict]:
        """Every per-channel weight of `plan`, as `writer.quantize_weights` returns them (give them to
        `writer.write(..., quantized=)`), those with a Hessian rounded with error feedback. Returns
        (quantized, report)."""
        jobs = weight_jobs(graph, plan, high_precision=high_precision)
        report = {"layers": {}, "skipped": dict(self.skipped)}

        def one(job: WeightJob):
            key = self.keys.get(job.node.name)
            if key is None or job.chain is not None:
                return quantize_job(job), None
            r = self.by_key[key]
            if r.n < MIN_ROWS_PER_K * key[1]:
                return quantize_job(job), {"skipped": f"{r.n} calibration rows < {MIN_ROWS_PER_K} x K = {key[1]}"}
            return _feedback_job(job, r.value)
        out = {}
        for job, (res, info) in zip(jobs, threads_.ordered_map(one, jobs, threads_.for_bytes(
                sum(4 * int(np.prod(j.const.shape)) for j in jobs if j.const.shape is not None), threads))):
            out[(job.const.name, job.format)] = res
            if info is not None:
                report["layers"][job.node.name] = info
        n = len(report["layers"])
        log.info("error feedback: %d layer(s) rounded with error feedback, %d round-to-nearest", n, len(jobs) - n)
        return out, report


def _feedback_job(job: WeightJob, h: np.ndarray):
    """`writer.quantize_job`'s result for one weight, its codes rounded with error feedback (same scales), and
    the layer output SNR (dB, on the calibration rows) of round-to-nearest and of error feedback."""
    w = np.asarray(G.read_values(job.const), dtype=np.float32)
    f = formats.get(job.format)
    q, scale, fp32_scale = qdq.weight_codes(f, w, job.axis, job.high_precision)
    k, transposed = _layout(job.node, w.shape)
    if job.axis != (0 if transposed else w.ndim - 1) or f.weights != "per-channel":
        return job_result(job, w, f, q, scale, fp32_scale), {"skipped": f"per-channel axis {job.axis}"}
    n = w.shape[0] if transposed else w.shape[1]
    w_kn = w.reshape(n, -1).T if transposed else w
    s = np.broadcast_to(scale, w.shape).reshape(n, -1)[:, 0] if transposed else np.broadcast_to(scale, w.shape)[0]
    as_kn = (lambda a: a.reshape(n, -1).T) if transposed else (lambda a: a)
    try:
        with threads_.one_blas_thread(k <= shared_rounding.SMALL_K):  # several run at once on the writer's threads
            q_kn = shared_rounding.round_with_feedback(f, w_kn, 1, np.asarray(s, np.float32)[None, :], h, damp=DAMP)
    except obs.SingularHessian as e:
        return job_result(job, w, f, q, scale, fp32_scale), {"skipped": str(e)}
    q_new = (q_kn.T.reshape(w.shape) if transposed else q_kn).astype(q.dtype)
    e_old, e_new = (shared_rounding.output_error(w_kn, as_kn(f.dequantize(c, scale)), 1, h) for c in (q, q_new))
    if not e_new < e_old:  # damping can lose on a tiny or degenerate sample: keep the nearest codes
        return job_result(job, w, f, q, scale, fp32_scale), {"kept_nearest": True, "rtn_db": _db(e_old)}
    return job_result(job, w, f, q_new, scale, fp32_scale), {"rtn_db": _db(e_old), "feedback_db": _db(e_new)}


def _db(rel: float) -> float:
    """Output SNR in dB of a relative output error."""
    return round(float(-10 * np.log10(max(rel, 1e-30))), 2)
