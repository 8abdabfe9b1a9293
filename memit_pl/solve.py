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


def output_rms(out: Tensor) -> Tensor:
    """rms over the last dimension, floored (a key's weight under a post-MLP norm is 1 / this)."""
    return out.float().pow(2).mean(-1).sqrt().clamp(min=1e-6)


def through_post_norm(norm: torch.nn.Module, m: Tensor, resid: Tensor) -> Tensor:
    """The change of the MLP output projection's output that moves ``norm(m)`` by ``resid``, for a
    model whose residual stream receives ``norm(W k)`` (an RMSNorm after the MLP, as in Gemma 2/3).

    An RMSNorm is g ⊙ x / rms(x): scale-invariant, so its outputs all have rms(y / g) = 1 and the
    reachable y nearest the target y* = norm(m) + resid (in the g-weighted sense) is norm(y* / g).
    The raw target keeps m's scale: m* = (y* / g) · rms(m) / rms(y* / g); returns m* − m. For a
    small ``resid`` this moves the output by ``resid`` less its radial part; the ascending-layer
    update re-measures h^L after every layer, so what one layer misses the next ones take up.

    Args:
        norm: the post-MLP norm module (called on vectors of width d_model).
        m: the raw MLP outputs W k, [n_edits, d_model].
        resid: the wanted change of norm(m), [n_edits, d_model].
    Returns:
        [n_edits, d_model], in ``m``'s dtype.
    """
    with torch.no_grad():
        probe = torch.ones(1, m.shape[-1], device=m.device, dtype=next(norm.parameters()).dtype)
        gain = norm(probe)[0].to(torch.float64)  # rms(1) = 1: the norm's effective per-channel gain
        gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)
        m64 = m.to(torch.float64)
        y = norm(m.to(probe.dtype)).to(torch.float64)
        want = (y + resid.to(torch.float64)) / gain

        def rms(x: Tensor) -> Tensor:
            return x.pow(2).mean(-1, keepdim=True).sqrt()

        target = want * rms(m64) / rms(want).clamp(min=1e-12)
        return (target - m64).to(m.dtype)


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
