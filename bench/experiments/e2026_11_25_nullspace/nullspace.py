"""A null-space projected update (as AlphaEdit) in place of Eqn. 14, on `memit-pl tune`'s seed-0 tuning half.

    .venv/bin/python -m bench.experiments.e2026_11_25_nullspace.nullspace --z_dir RUN/z --points '[[0.01, 0.1], [0.01, 1.0]]'

Eqn. 14 penalises a change along each eigendirection of C = E[k kᵀ] by λ times its eigenvalue. The
projected update forbids every direction whose eigenvalue is at least τ and penalises the rest equally:
with P the projector onto the eigenvectors of C below τ and K̃ = P K (rows are keys),

    Δ = Rᵀ (K̃ K̃ᵀ + ρ · mean‖k̃‖² · I)⁻¹ K̃    (R: [n, d_model], K̃: [n, d_key]),

so Δ k = 0 for every key in C's range above τ, and ρ (relative to the projected keys' mean squared
norm) trades efficacy for the size of Δ as λ does. Each point (τ, ρ) is one apply and one evaluation
of the 292 tuning cases with the shipped layers and z, with the tune runs' evaluation settings, so the
rows compare directly with `memit-pl tune`'s rows on the same half. The update is the editor's
``solver`` (in place of :func:`memit_pl.functional.solve.solve_update`) for this script only; the package
does not ship it. (The recorded run patched ``memit_pl.stages.apply.solve_update`` instead: same update.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.experiments.common import command, parser, save, setup  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402


def projected_solve(tau: float, rho: float):
    """A drop-in for :func:`memit_pl.functional.solve.solve_update` (the covariance weight λ is not used)."""

    def solve(keys: Tensor, resid: Tensor, cov: Tensor, lam: float, prev_keys: Tensor | None = None):
        k = keys.to(torch.float64)
        if prev_keys is not None and len(prev_keys):
            raise ValueError("the projected update here handles one batch only")
        evals, evecs = torch.linalg.eigh(cov.to(device=k.device, dtype=torch.float64))
        null = evecs[:, evals < tau]  # [d_key, r]
        kt = k @ null  # projected keys in the null space's coordinates, [n, r]
        eye = torch.eye(len(k), dtype=k.dtype, device=k.device)
        gram = kt @ kt.T + rho * kt.pow(2).sum(1).mean() * eye
        b = null @ (kt.T @ torch.linalg.solve(gram, eye))  # [d_key, n]
        return resid.to(torch.float64).T.float(), b.float()

    solve.name = f"projected_tau{tau:g}_rho{rho:g}"  # how the run's factors are labelled
    return solve


def main() -> None:
    ap = parser(__doc__, "nullspace")
    ap.add_argument("--points", type=json.loads, required=True, help="JSON list of [τ, ρ] pairs")
    args = ap.parse_args()
    memit, ed, tune_part, _ = setup(args)
    store = ed.zs(tune_part, memit)
    rows = []
    for tau, rho in args.points:
        ed.solver = projected_solve(tau, rho)
        result = ed.edited_evaluation(tune_part, store, memit, f"tau{tau:g}_rho{rho:g}")
        rows.append(row(len(tune_part), result, layers=f"{memit.layers[0]}-{memit.layers[-1]}", tau=tau, rho=rho))
        print(json.dumps(rows[-1]), flush=True)
        out = {"cases": len(tune_part), "rows": rows, "command": command(__file__)}
        save(args.out, out)


if __name__ == "__main__":
    main()
