"""Per-channel weight codes computed while the QDQ pass calibrates (issue 25).

The codes and scales of an FP8/INT8 per-channel weight do not depend on calibration; only the bias-correction
output shift needs the activation means (error-feedback and shared-rounding codes need Hessians: those weights
are left to the writer). Calibration mostly waits on ONNX Runtime with the GIL released, so a background thread
quantizes the weights meanwhile, spilling each weight's codes at once (memory stays bounded), and `finish` adds
the shifts once the means are known. The writer then takes these results as its own (`writer.write(quantized=)`):
the same numbers, the same graph, the same files.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time

import numpy as np
import onnx_graphsurgeon as gs

from .. import formats, modelfile
from .. import threads as threads_
from . import writer

log = logging.getLogger(__name__)

# Calibration's own memory is live at the same time: half the writer's in-flight budget.
IN_FLIGHT_BYTES = threads_.IN_FLIGHT_BYTES // 2


class Prequantized:
    """Weight jobs quantized on a background thread; `finish` joins it and returns the writer's `quantized` dict."""

    def __init__(self, jobs: list, threads: int, in_flight_bytes: int):
        self.jobs = jobs
        self.results: dict = {}   # (const name, format) -> (job, codes (array or spilled lazy values), scale, fp32 scale)
        self.error: BaseException | None = None
        self.stop = False
        self.started = time.perf_counter()
        self.done_at: float | None = None
        # The run's spill file (modelfile.spilling) is a context variable, which a new thread does not inherit.
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._work, threads, in_flight_bytes),
                                       name="onnxopt-prequantize", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, graph: gs.Graph, mode: str, placement, *, high_precision: str, threads: int = 0,
              in_flight_bytes: int = IN_FLIGHT_BYTES, min_bytes: int = threads_.SMALL_BYTES) -> "Prequantized | None":
        """Start quantizing the per-channel weights of rules placement `placement` in format `mode`, or None (the
        writer does it all, as before) where it would not pay: less than `min_bytes` of FP32 weights, one thread,
        or no spill file to hold the codes. Weights read by several layers are left to the writer (shared rounding
        needs their Hessians). The graph is only read, never edited."""
        if not modelfile.spilling_now():
            return None
        plan = writer.QuantPlan.uniform(mode, placement, {}, {})
        jobs = [j for j in writer.weight_jobs(graph, plan, high_precision=high_precision) if len(j.const.outputs) == 1]
        total = writer.jobs_bytes(jobs)
        n = threads_.for_bytes(total, threads)
        if not jobs or total < min_bytes or n < 2:
            return None
        log.info("quantizing %d weights (%.0f MB FP32) in the background on %d threads", len(jobs), total / 2**20, n)
        return cls(jobs, n, in_flight_bytes)

    def _work(self, threads: int, in_flight_bytes: int) -> None:
        try:
            for job, (q, scale, fp32_scale, _) in threads_.ordered_map(writer.quantize_job, self.jobs, threads,
                                                                        cost=writer.job_bytes, budget=in_flight_bytes):
                # the name the writer gives the codes (qdq.write_weight_codes): spilled now, taken as is there
                self.results[(job.const.name, job.format)] = (job, modelfile.spilled(f"{job.const.name}_quantized", q),
                                                              scale, fp32_scale)
                del q
                if self.stop:
                    break
        except BaseException as e:  # raised again by finish, on the caller's thread
            self.error = e
        self.done_at = time.perf_counter()

    def cancel(self) -> None:
        """Stop after the weight in hand (the run failed elsewhere) and wait for the thread."""
        self.stop = True
        self.thread.join()

    def finish(self, graph: gs.Graph, plan: "writer.QuantPlan", *, high_precision: str, threads: int = 0,
               in_flight_bytes: int = threads_.IN_FLIGHT_BYTES) -> dict:
        """Wait for the background work; add the bias-correction shifts `plan` (its means) asks for, on `threads`
        worker threads. Returns {(weight constant name, format): (WeightJob, (codes, scales, smallest FP32 scale or
        None, shift or None))} for `writer.write(..., quantized=)`; weights not in it the writer quantizes itself."""
        t0 = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        final = {(j.const.name, j.format): j for j in writer.weight_jobs(graph, plan, high_precision=high_precision)}
        out, shifts = {}, []
        for key, (pre, q, scale, fp32_scale) in self.results.items():
            job = final.get(key)
            # the writer's own job must be this one (same weight, view and axis; no Hessian): else it redoes it
            if job is None or job.hessian is not None or job.const is not pre.const or job.axis != pre.axis:
                continue
            if job.mean is None:
                out[key] = (job, (q, scale, fp32_scale, None))
            else:
                shifts.append((job, q, scale, fp32_scale))
        t1 = time.perf_counter()
        n = threads_.for_bytes(writer.jobs_bytes([s[0] for s in shifts]), threads)
        for item, shift in zip(shifts, threads_.ordered_map(_shift, shifts, n, cost=lambda s: writer.job_bytes(s[0]),
                                                            budget=in_flight_bytes)):
            job, q, scale, fp32_scale = item
            out[(job.const.name, job.format)] = (job, (q, scale, fp32_scale, shift))
        busy, overlap = self.done_at - self.started, min(self.done_at, t0) - self.started
        log.info("background weight quantization: %d weights in %.1f s, %.1f s of it during calibration (waited %.1f s "
                 "after); bias-correction shifts of %d weights %.1f s", len(self.results), busy, overlap, waited,
                 len(shifts), time.perf_counter() - t1)
        return out


def _shift(item: tuple):
    """The bias-correction shift of a prequantized weight, as `writer.quantize_job` computes it: the weight read
    again, the codes read back from the spill file."""
    job, q, scale, fp32_scale = item
    codes = q.load() if isinstance(q, gs.ir.tensor.LazyValues) else np.asarray(q)
    return writer.job_result(job, writer.job_weight(job), formats.get(job.format), codes, scale, fp32_scale)[1][3]
