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


def through_post_norm(norm: torch.nn.Module, m: Tensor, resid: Tensor, iters: int = 200) -> Tensor:
    """The change of the MLP output projection's output that moves ``norm(m)`` as close as the norm
    allows to ``norm(m) + resid``, for a model whose residual stream receives ``norm(W k)`` (an RMSNorm
    after the MLP, as in Gemma 2/3).

    An RMSNorm is g ⊙ x / rms(x): its outputs are g ⊙ u with rms(u) = 1. The nearest of them to the
    target y* = norm(m) + resid, in the stream's own (unweighted) metric, solves
    min ‖g ⊙ u − y*‖² s.t. ‖u‖² = d, i.e. u = g ⊙ y* / (g² + μ) with the multiplier μ > −min g² that puts
    u on the sphere (found by bisection; φ(μ) = ‖u(μ)‖² decreases in μ there). Inverting the gain
    instead (u ∝ y* / g) asks channels whose gain is near 0 for huge changes: Gemma-3-270M's layer 4 has
    gains down to 0.002, and that inversion rotated the whole output instead of moving it by ``resid``.
    The raw target keeps m's scale: m* = u · rms(m); returns m* − m. What one layer cannot reach the
    ascending-layer update leaves to the next ones (it re-measures h^L after every layer).

    Args:
        norm: the post-MLP norm module (called on vectors of width d_model).
        m: the raw MLP outputs W k, [n_edits, d_model].
        resid: the wanted change of norm(m), [n_edits, d_model].
    Returns:
        [n_edits, d_model], in ``m``'s dtype.
    """
    with torch.no_grad():
        d = m.shape[-1]
        probe = torch.ones(1, d, device=m.device, dtype=next(norm.parameters()).dtype)
        gain = norm(probe)[0].to(torch.float64)  # rms(1) = 1: the norm's effective per-channel gain
        m64 = m.to(torch.float64)
        y_star = norm(m.to(probe.dtype)).to(torch.float64) + resid.to(torch.float64)
        g2, b = gain.pow(2), gain * y_star  # [d], [n, d]

        def sq_norm(mu: Tensor) -> Tensor:
            return (b / (g2 + mu.unsqueeze(-1))).pow(2).sum(-1)

        g2_min = float(g2.min())
        lo = torch.full((m.shape[0],), -g2_min, dtype=torch.float64, device=m.device)
        lo = lo + 1e-12 * max(1.0, float(g2.max()))
        hi = b.norm(dim=-1) / d**0.5 - g2_min + 1.0  # φ(hi) <= ‖b‖² / (hi + g2_min)² < d
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = sq_norm(mid) > d
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        u = b / (g2 + hi.unsqueeze(-1))
        u = u * (d**0.5 / u.norm(dim=-1, keepdim=True).clamp(min=1e-300))  # exactly on the sphere
        target = u * m64.pow(2).mean(-1, keepdim=True).sqrt()
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


def null_space_projector(cov: Tensor, threshold: float, energy: float | None = None) -> Tensor:
    """AlphaEdit's P = U₀ U₀ᵀ: the projection onto the span of the eigenvectors of C = E[k kᵀ] whose
    eigenvalues are below ``threshold``, the directions the preserved keys barely use. With ``energy`` set,
    U₀ is instead the longest run of smallest-eigenvalue directions whose eigenvalues sum to at most that
    share of trace(C) (the share of E[‖k‖²] the projection lets through), a criterion free of the model's
    key scale. [d_key, d_key] float64."""
    return null_space(cov, threshold, energy)[0]


def null_space_report(cov: Tensor, threshold: float, energy: float | None = None) -> dict:
    """What a projector keeps: the null space's dimension out of d_key and the share of the preserved keys'
    energy, E[‖P k‖²] / E[‖k‖²] = Σ null eigenvalues / trace(C), that the update can still reach (percent)."""
    return null_space(cov, threshold, energy)[1]


def null_space(cov: Tensor, threshold: float, energy: float | None = None) -> tuple[Tensor, dict]:
    """:func:`null_space_projector` and :func:`null_space_report` from one eigendecomposition."""
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))  # ascending
    pos = evals.clamp_min(0)
    total = pos.sum().clamp_min(1e-300)
    mask = evals < threshold if energy is None else pos.cumsum(0) / total <= energy
    null = evecs[:, mask]
    report = {"null_dims": int(mask.sum()), "d_key": int(evals.numel()),
              "energy_pct": round(float(pos[mask].sum() / total) * 100, 2)}
    return null @ null.T, report


def alphaedit_update(keys: Tensor, resid: Tensor, projector: Tensor, l2: float,
                     prev_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Low-rank factors of AlphaEdit's update (Fang et al. 2025, Eqn. 12 with the reference code's ridge):
    Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹, right-multiplied by the null-space projection P, so that
    Δ k = 0 for every key with P k = 0; K_p are the keys of earlier rounds. Solved in float64.

    Args:
        keys: K as [n_edits, d_key]; resid: R as [n_edits, d_model]; projector: P, [d_key, d_key];
        l2: α, the ridge weight; prev_keys: [n_prev, d_key].
    Returns:
        (A [d_model, n_edits], B [d_key, n_edits]) in float32 with Δ = A Bᵀ: A = Rᵀ,
        B = (P (KᵀK + K_pᵀK_p) + α I)⁻¹ P Kᵀ (keys as rows).
    """
    k = keys.to(torch.float64)
    p = projector.to(device=k.device, dtype=torch.float64)
    gram = k.T @ k
    if prev_keys is not None and len(prev_keys):
        kp = prev_keys.to(device=k.device, dtype=torch.float64)
        gram = gram + kp.T @ kp
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=k.device)
    b = torch.linalg.solve(p @ gram + l2 * eye, p @ k.T)  # [d_key, n_edits]
    return resid.to(torch.float64).T.float(), b.float()


class AlphaEditSolver:
    """The update rule of AlphaEdit as a solver for :func:`memit_pl.stages.apply.apply_memit` (the covariance
    weight λ is not used: the projection preserves, the ridge α regularises); P is computed once per
    covariance matrix, and what it keeps (:func:`null_space_report`) is logged then."""

    def __init__(self, threshold: float = 2e-2, l2: float = 10.0, energy: float | None = None):
        self.threshold, self.l2, self.energy = threshold, l2, energy
        crit = f"t{threshold:g}" if energy is None else f"e{energy:g}"
        self.name = f"alphaedit_{crit}_l2{l2:g}"
        self._spaces: dict[tuple, tuple[Tensor, dict]] = {}

    def _space(self, cov: Tensor) -> tuple[Tensor, dict]:
        key = (cov.data_ptr(), tuple(cov.shape), str(cov.device))
        if key not in self._spaces:
            self._spaces[key] = null_space(cov, self.threshold, self.energy)
            report = self._spaces[key][1]
            log.info("alphaedit: null space of %d of %d key dimensions, %.1f%% of the preserved keys' energy "
                     "(%s)", report["null_dims"], report["d_key"], report["energy_pct"],
                     f"eigenvalues < {self.threshold:g}" if self.energy is None else f"energy ≤ {self.energy:g}")
        return self._spaces[key]

    def projector(self, cov: Tensor) -> Tensor:
        return self._space(cov)[0]

    def report(self, cov: Tensor) -> dict:
        """:func:`null_space_report` of ``cov``, from the decomposition its projector came from."""
        return self._space(cov)[1]

    def __call__(self, keys: Tensor, resid: Tensor, cov: Tensor, lam: float,
                 prev_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return alphaedit_update(keys, resid, self.projector(cov), self.l2, prev_keys)


def rome_update(keys: Tensor, resid: Tensor, cov: Tensor, lam: float = 0.0,
                prev_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ROME's rank-one updates (Meng et al. 2022, Eqn. 2), one edit after the other in the order given.

    Edit i sees the weight as the edits before it left it: with u_i = C⁻¹ k_i and r_i the change of W k_i
    the edit asks for, W ← W + (r_i − Δ k_i) u_iᵀ / (u_iᵀ k_i), so that after its own update W k_i hits
    its target exactly, and later edits may move it again (ROME's known decay under many edits). λ and the
    keys of earlier rounds are not used: a rank-one update has no preservation weight, and earlier
    rounds are already in the weights. Solved in float64.

    Args:
        keys: [n_edits, d_key]; resid: [n_edits, d_model]; cov: C = E[k kᵀ], [d_key, d_key].
    Returns:
        (A [d_model, n_edits], B [d_key, n_edits]) in float32 with Δ = A Bᵀ = Σ_i a_i u_iᵀ.
    """
    k = keys.to(torch.float64)
    r = resid.to(torch.float64)
    u = _spd_solve(cov.to(device=k.device, dtype=torch.float64), k.T)  # [d_key, n_edits]
    delta = torch.zeros(r.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
    a = torch.empty(r.shape[1], k.shape[0], dtype=torch.float64, device=k.device)
    for i in range(k.shape[0]):
        a[:, i] = (r[i] - delta @ k[i]) / (u[:, i] @ k[i])
        delta.add_(torch.outer(a[:, i], u[:, i]))
    return a.float(), u.float()


class RomeSolver:
    """:func:`rome_update` as a solver for :func:`memit_pl.stages.apply.apply_memit` (one layer)."""

    name = "rome"

    def __call__(self, keys: Tensor, resid: Tensor, cov: Tensor, lam: float,
                 prev_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return rome_update(keys, resid, cov)
