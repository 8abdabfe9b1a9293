"""The closed-form MEMIT update (Eqn. 14, 19, 20) as pure tensor functions."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def spread_residual(z: Tensor, h: Tensor, layers_left: int) -> Tensor:
    """R_l = (z_i − h_i^L) / (number of layers still to edit, this one included) (Eqn. 20).

    Args:
        z, h: [n_edits, d_model].
    Returns:
        [n_edits, d_model].
    """
    return (z - h) / layers_left


def solve_update(keys: Tensor, resid: Tensor, cov: Tensor, lam: float, prev_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Low-rank factors of Δ = R Kᵀ (λC + K_p K_pᵀ + K Kᵀ)⁻¹ (Eqn. 14), solved in float64, never inverted.

    Args:
        keys: K as [n_edits, d_key] (rows are keys).
        resid: R as [n_edits, d_model].
        cov: C = E[k kᵀ], [d_key, d_key].
        lam: λ, the covariance weight.
        prev_keys: keys of earlier edit rounds to preserve, [n_prev, d_key].

    Returns:
        (A [d_model, n_edits], B [d_key, n_edits]) in float32 with Δ = A Bᵀ: A = Rᵀ, B = (λC + KKᵀ)⁻¹ K.
    """
    k = keys.to(torch.float64)
    a = lam * cov.to(device=k.device, dtype=torch.float64) + k.T @ k
    if prev_keys is not None and len(prev_keys):
        p = prev_keys.to(device=k.device, dtype=torch.float64)
        a = a + p.T @ p
    b = _spd_solve(a, k.T)  # [d_key, n_edits]
    return resid.to(torch.float64).T.float(), b.float()


def _spd_solve(a: Tensor, rhs: Tensor) -> Tensor:
    """Solve a X = rhs for symmetric positive (semi)definite ``a``: Cholesky, else the minimum-norm
    least-squares solution (pseudo-inverse), e.g. for λ = 0 with fewer keys than dimensions."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    log.warning(
        "Cholesky failed: λC + KKᵀ is not positive definite (λ = 0 with fewer keys than dimensions, or "
        "too few covariance samples); using the minimum-norm least-squares solution instead"
    )
    return torch.linalg.pinv(a, hermitian=True) @ rhs
