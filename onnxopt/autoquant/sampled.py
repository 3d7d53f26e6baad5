"""`--target-psnr`: a mix judged where users judge a diffusion model, on the sampler's final samples. The gated
graph runs the whole denoising loop (onnxopt.sampler) on held-out seeds with the mix's gates; the FP32 loop
(all gates off) is the reference. Sensitivities stay per layer (one call); only verification and repair use this."""
from __future__ import annotations

import numpy as np

from .. import metrics as M
from ..sampler import Denoiser, Roles, SamplerOptions, Trajectory, run_with
from .candidates import GATES


class SampledEvaluator:
    """Metrics of a gate vector on the sampler's output: mean per-seed PSNR (with its standard error), SSIM and
    cosine of the final samples against the FP32 loop's; `gates` and everything else are the gated evaluator's."""

    def __init__(self, ev, roles: Roles, opts: SamplerOptions, progress: bool = False, worst: bool = False):
        self.ev, self.roles, self.opts, self.progress, self.worst = ev, roles, opts, progress, worst
        self.ref = self._sample(ev.zeros())

    def __getattr__(self, name):
        return getattr(self.ev, name)

    def _sample(self, gates: np.ndarray) -> Trajectory:
        den = Denoiser(None, self.roles, "cpu", "the gated graph in the sampler", session=self.ev.sess,
                       extra={GATES: np.asarray(gates, np.float32)})
        return run_with(den, self.opts, None, progress=False)

    def metrics(self, gates, split: str = "held-out") -> dict:
        """{psnr, psnr_se, psnr_worst, ssim, cosine, cosine_se, n, top1 (NaN)} of the final samples on the held-out seeds."""
        return self._metrics(self._sample(gates))

    def written_metrics(self, model, split: str = "held-out") -> dict:
        """`metrics` of `model` (the written graph, no gates) in the same loop, seeds and FP32 reference."""
        den = Denoiser(model, self.roles, self.ev.provider, "the written graph in the sampler")
        return self._metrics(run_with(den, self.opts, None, progress=False))

    def _metrics(self, got: Trajectory) -> dict:
        ref, cand = self.ref.final, got.final
        ps = M.psnr_per_sample(ref, cand, self.opts.data_range)
        cs = M.cosine_per_sample(ref, cand)
        f = M.fidelity(ref, cand, self.opts.data_range)
        finite = np.isfinite(ps) | np.isposinf(ps)
        ps_c = np.where(finite, np.minimum(ps, 200.0), 0.0)  # inf (exact) counts as 200 dB, NaN as 0 dB
        se = float(ps_c.std(ddof=1) / np.sqrt(len(ps_c))) if len(ps_c) > 1 else 0.0
        cse = float(np.nan_to_num(cs).std(ddof=1) / np.sqrt(len(cs))) if len(cs) > 1 else 0.0
        # worst: the target is the worst seed's PSNR ("psnr"; the mean stays in "psnr_mean"), judged without a margin
        psnr, se = (float(ps_c.min()), 0.0) if self.worst else (float(ps_c.mean()), se)
        return {"psnr": psnr, "psnr_mean": float(ps_c.mean()), "psnr_se": se, "psnr_worst": float(ps_c.min()), "ssim": f.ssim_mean,
                "cosine": float(np.nan_to_num(cs, nan=-1.0).mean()), "cosine_se": cse, "n": len(ps),
                "top1": float("nan"), "drift_psnr": [float(np.mean(np.minimum(M.psnr_per_sample(a, b, self.opts.data_range), 200.0)))
                                                     for a, b in zip(self.ref.steps, got.steps)]}
