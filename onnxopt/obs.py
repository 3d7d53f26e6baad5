"""Optimal-brain-surgeon numerics shared by SparseGPT (2:4 pruning) and GPTQ (rounding with error feedback: AWQ's
INT4/NVFP4 blocks, shared and FP8 per-channel weights).

Both walk the input channels of a layer in order and push each channel's weight error onto the channels still
to come, through the upper Cholesky factor of the damped inverse Hessian H⁻¹ (H = XᵀX of the layer input).
A Hessian that stays singular after damping raises `SingularHessian`; callers fall back (magnitude pruning,
rounding without error feedback) and say so, so no linear-algebra failure reaches the user.
"""
from __future__ import annotations

import logging

import numpy as np

from .errors import OnnxoptError

log = logging.getLogger(__name__)

DAMP_STEPS = 6  # damping tried: damp, 10x, ... 10^5 x the mean diagonal


class SingularHessian(OnnxoptError):
    """The Hessian is not positive definite even with the largest damping (or holds NaN/inf)."""


def undead(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 copy of H with a unit diagonal where an input is always zero, mask of those inputs)."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def hinv_upper(H: np.ndarray, damp: float, *, via_cholesky: bool = True) -> np.ndarray:
    """Upper Cholesky factor of the damped H⁻¹, raising the damping tenfold until H is positive definite.
    `H` must already have its dead inputs fixed (`undead`). H⁻¹ comes from H's Cholesky factor (SparseGPT, the
    reference route), or with `via_cholesky=False` from a direct inverse (GPTQ's route here: it keeps INT4
    results bit-identical to earlier releases)."""
    if not np.all(np.isfinite(H)):
        raise SingularHessian("the Hessian holds NaN or inf (non-finite calibration activations)")
    mean = float(np.mean(np.diag(H)))
    if not mean > 0:
        raise SingularHessian("the Hessian has no positive diagonal")
    idx = np.diag_indices_from(H)
    for k in range(DAMP_STEPS):
        Hd = H.copy()
        Hd[idx] += max(damp, 1e-8) * (10 ** k) * mean
        try:
            if via_cholesky:
                Linv = np.linalg.inv(np.linalg.cholesky(Hd))
                U = np.linalg.cholesky(Linv.T @ Linv).T
            else:
                U = np.linalg.cholesky(np.linalg.inv(Hd)).T
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(U)):
            if k:
                log.debug("Hessian positive definite only with %.0ex more damping", 10.0 ** k)
            return U
    raise SingularHessian(f"the Hessian is not positive definite even with damping {max(damp, 1e-8) * 10 ** (DAMP_STEPS - 1):g}")


def feedback_round(f, w_kn: np.ndarray, s_kn: np.ndarray, h: np.ndarray, damp: float, lazy: int = 128) -> np.ndarray:
    """Codes of format `f` for W [K, N] at the fixed scales `s_kn` (anything broadcasting to [K, N]: per channel
    [N] or per block, expanded), rounded one input channel at a time with each channel's error fed back into
    those not yet rounded (GPTQ, Frantar et al. 2023), so the layer output error ||X (W - Q)|| is what the
    rounding minimizes. Raises SingularHessian when H stays singular after damping."""
    k, n = w_kn.shape
    perm = np.argsort(-np.diag(h), kind="stable")   # largest inputs first: their error is absorbed by the most others
    hh, dead = undead(h[np.ix_(perm, perm)])
    w = np.asarray(w_kn, dtype=np.float64)[perm]    # a copy (fancy indexing)
    w[dead] = 0.0
    u = hinv_upper(hh, damp, via_cholesky=False)    # one Cholesky of a direct inverse: INT4 codes as in earlier releases
    s = np.broadcast_to(np.asarray(s_kn, dtype=np.float64), (k, n))[perm]
    s = np.where(s == 0, 1.0, s)   # an all-zero channel or block: rounds its fed-back error at scale 1 (codes 0 anyway)
    q = np.zeros((k, n), f.np_dtype)
    for i1 in range(0, k, lazy):   # lazy batches: the rows after a batch take its errors in one product
        i2 = min(i1 + lazy, k)
        blk, err = w[i1:i2], np.zeros((i2 - i1, n))
        for i in range(i2 - i1):
            q[i1 + i] = f.cast(blk[i] / s[i1 + i])
            e = err[i] = (blk[i] - np.asarray(f.to_float(q[i1 + i]), np.float64) * s[i1 + i]) / u[i1 + i, i1 + i]
            blk[i + 1:] -= np.outer(u[i1 + i, i1 + i + 1:i2], e)
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q[np.argsort(perm)]
