"""Optimal-brain-surgeon numerics shared by SparseGPT (2:4 pruning) and GPTQ (INT4 rounding with error feedback).

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
