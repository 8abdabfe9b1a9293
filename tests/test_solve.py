import pytest
import torch

from memit_pl.functional.solve import solve_update, spread_residual, through_post_norm


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_update_equals_least_squares_on_augmented_problem():
    """Eqn. 9: W1 = argmin ‖W K0 − W0 K0‖² + ‖W K1 − (W0 K1 + R)‖², solved by lstsq, equals W0 + Δ."""
    d_out, d_k, n_old, n_new = 6, 10, 40, 4
    w0, k0, k1, r = _rand(d_out, d_k, seed=1), _rand(d_k, n_old, seed=2), _rand(d_k, n_new, seed=3), _rand(d_out, n_new, seed=4)
    keys = torch.cat([k0, k1], 1).T  # [n, d_k]
    targets = torch.cat([w0 @ k0, w0 @ k1 + r], 1).T  # [n, d_out]
    w1 = torch.linalg.lstsq(keys, targets).solution.T
    a, b = solve_update(k1.T, r.T, k0 @ k0.T / n_old, lam=float(n_old))
    assert a.shape == (d_out, n_new) and b.shape == (d_k, n_new)
    torch.testing.assert_close((w0 + (a @ b.T).double()), w1, atol=1e-5, rtol=1e-4)


def test_small_lambda_maps_each_key_to_its_target():
    d_k, n = 12, 5
    k, r = _rand(n, d_k, seed=5), _rand(n, 7, seed=6)
    for lam in (1e-9, 0.0):  # 0: singular, handled by the least-squares fallback
        a, b = solve_update(k, r, torch.eye(d_k, dtype=torch.float64), lam=lam)
        torch.testing.assert_close((a @ b.T).double() @ k.T, r.T, atol=1e-4, rtol=1e-4)


def test_larger_lambda_shrinks_the_update():
    k, r = _rand(5, 12, seed=7), _rand(5, 7, seed=8)
    cov = torch.eye(12, dtype=torch.float64)
    norms = [(lambda ab: (ab[0] @ ab[1].T).norm())(solve_update(k, r, cov, lam=lam)) for lam in (0.1, 10.0, 1000.0)]
    assert norms[0] > norms[1] > norms[2]


def test_previous_keys_are_preserved():
    """Adding earlier rounds' keys to the preserved set makes the update leave them (nearly) alone."""
    k_prev, k, r = _rand(4, 12, seed=9), _rand(3, 12, seed=10), _rand(3, 7, seed=11)
    cov = 1e-3 * torch.eye(12, dtype=torch.float64)
    a, b = solve_update(k, r, cov, lam=1.0)
    a2, b2 = solve_update(k, r, cov, lam=1.0, prev_keys=k_prev * 100)
    assert ((a2 @ b2.T).double() @ k_prev.T).norm() < 0.01 * ((a @ b.T).double() @ k_prev.T).norm()


def test_spread_residual():
    z, h = torch.ones(2, 3) * 5, torch.ones(2, 3)
    torch.testing.assert_close(spread_residual(z, h, 4), torch.ones(2, 3))


def _gemma_norm(d, seed=0, scale=1.0):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(d, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(scale * _rand(d, seed=seed))  # gain 1 + w (scale 1: some channels near 0 or negative)
    return norm


@torch.no_grad()
def test_through_post_norm_reaches_a_reachable_target_exactly():
    """norm(m + Δ) = y* when y* is an output the norm can give (rms(y*/g) = 1); m's scale is kept."""
    d, n = 16, 3
    norm = _gemma_norm(d, seed=9)
    m, u = 5 * _rand(n, d, seed=10), _rand(n, d, seed=11)
    gain = 1 + norm.weight
    y_star = gain * u / u.pow(2).mean(-1, keepdim=True).sqrt()
    resid = y_star - norm(m)
    step = through_post_norm(norm, m, resid)
    # Gemma's RMSNorm computes in float32 (and adds eps): float32 tolerances
    torch.testing.assert_close(norm(m + step), y_star, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((m + step).pow(2).mean(-1), m.pow(2).mean(-1))
    assert float((norm(m + resid) - y_star).norm()) > 1.0  # adding the target unmapped misses it


@torch.no_grad()
def test_through_post_norm_finds_the_nearest_output_the_norm_can_give():
    """For an unreachable target, no rms-preserving change of m puts norm(m + Δ) nearer to the target
    than ours (checked against random points near it and across the sphere)."""
    d, n = 24, 3
    norm = _gemma_norm(d, seed=12)
    m = _rand(n, d, seed=13)
    r = 3 * _rand(n, d, seed=14)
    step = through_post_norm(norm, m, r)
    target = norm(m) + r
    ours = (norm(m + step) - target).norm(dim=-1)
    torch.testing.assert_close((m + step).pow(2).mean(-1), m.pow(2).mean(-1))
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1e-1, 10.0):
        other = (m + step).unsqueeze(1) + scale * torch.randn(n, 200, d, generator=gen, dtype=torch.float64)
        err = (norm(other) - target.unsqueeze(1)).norm(dim=-1)  # norm() is scale-invariant: any point is an output
        assert torch.all(err >= ours.unsqueeze(1) - 1e-6)


@torch.no_grad()
def test_through_post_norm_ignores_channels_the_norm_cannot_drive():
    """Gains near 0 (Gemma-3-270M has 0.002): inverting the gain asks those channels for huge changes
    and lands farther from the target than not moving at all; the constrained step moves towards it."""
    d, n = 32, 4
    norm = _gemma_norm(d, seed=15, scale=0.3)
    with torch.no_grad():
        norm.weight[:3] = -1 + 1e-3  # three channels with gain 0.001
    m = _rand(n, d, seed=16)
    y = norm(m)
    r = 0.3 * y.norm(dim=-1, keepdim=True) * _rand(n, d, seed=17) / d**0.5
    target = y + r
    gain = 1 + norm.weight.double()
    inverse = (target / gain) * m.pow(2).mean(-1, keepdim=True).sqrt() / (target / gain).pow(2).mean(-1, keepdim=True).sqrt() - m
    step = through_post_norm(norm, m, r)
    err = lambda x: (norm(m + x) - target).norm(dim=-1)  # noqa: E731
    assert torch.all(err(step) < err(torch.zeros_like(m)))
    assert torch.all(err(inverse) > err(torch.zeros_like(m)))
    assert torch.all(step.norm(dim=-1) < inverse.norm(dim=-1))


def _cov_with_spectrum(d, big, seed=0):
    """A covariance whose first ``big`` eigen-directions carry variance 1..2 and the rest 1e-4."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.cat([1 + torch.rand(big, generator=g, dtype=torch.float64), torch.full((d - big,), 1e-4, dtype=torch.float64)])
    return (q * ev) @ q.T, q


def test_alphaedit_with_a_full_projection_is_the_ridge_solve():
    from memit_pl.functional.solve import alphaedit_update, null_space_projector, solve_update

    g = torch.Generator().manual_seed(1)
    k, r = torch.randn(5, 12, generator=g), torch.randn(5, 7, generator=g)
    cov, _ = _cov_with_spectrum(12, 4)
    p = null_space_projector(cov, threshold=1e9)  # every direction: P = I
    torch.testing.assert_close(p, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)
    prev = torch.randn(3, 12, generator=g)
    a, b = alphaedit_update(k, r, p, l2=2.5, prev_keys=prev)
    a2, b2 = solve_update(k, r, torch.eye(12), lam=2.5, prev_keys=prev)
    torch.testing.assert_close(a @ b.T, a2 @ b2.T, atol=1e-5, rtol=1e-5)


def test_alphaedit_leaves_the_preserved_directions_alone_and_fits_the_edits_in_the_null_space():
    from memit_pl.functional.solve import AlphaEditSolver

    d, big = 16, 10
    cov, q = _cov_with_spectrum(d, big)
    solver = AlphaEditSolver(threshold=1e-2, l2=1e-6)
    g = torch.Generator().manual_seed(2)
    null = q[:, big:]  # the null space of the preserved keys (eigenvalues 1e-4)
    keys = (torch.randn(3, d - big, generator=g, dtype=torch.float64) @ null.T).float()
    resid = torch.randn(3, 5, generator=g)
    cov32 = cov.float()
    a, b = solver(keys, resid, cov32, lam=123.0)
    delta = (a @ b.T).double()
    preserved = q[:, :big]  # keys of the corpus live here: the update must not move their outputs
    assert float((delta @ preserved).abs().max()) < 1e-6
    torch.testing.assert_close((delta @ keys.double().T).T.float(), resid, atol=1e-3, rtol=1e-3)
    assert solver.projector(cov32) is solver.projector(cov32)  # computed once per covariance
    assert solver.name == "alphaedit_t0.01_l21e-06"


def test_the_energy_criterion_takes_the_smallest_directions_up_to_that_share_of_the_trace():
    from memit_pl.functional.solve import AlphaEditSolver, null_space_projector, null_space_report

    d, big = 16, 10
    cov, q = _cov_with_spectrum(d, big)  # 6 eigenvalues of 1e-4, 10 in (1, 2)
    evals = torch.linalg.eigvalsh(cov)
    share = 6e-4 / float(evals.sum())  # the six small ones' share, counted by hand
    by_energy = null_space_projector(cov, threshold=0.0, energy=1.5 * share)
    torch.testing.assert_close(by_energy, q[:, big:] @ q[:, big:].T, atol=1e-8, rtol=0)
    torch.testing.assert_close(by_energy, null_space_projector(cov, threshold=1e-2), atol=1e-10, rtol=0)
    report = null_space_report(cov, threshold=0.0, energy=1.5 * share)
    assert report["null_dims"] == 6 and report["d_key"] == d
    assert abs(report["energy_pct"] - round(share * 100, 2)) < 1e-9
    # one more direction would pass the share: the smallest of the large eigenvalues is not taken
    assert null_space_report(cov, threshold=0.0, energy=share * 0.99)["null_dims"] == 5
    assert null_space_report(cov, threshold=1e-2)["null_dims"] == 6  # the absolute threshold, counted the same
    solver = AlphaEditSolver(threshold=1e-2, l2=1.0, energy=0.05)
    assert solver.name == "alphaedit_e0.05_l21"
    cov32 = cov.float()
    assert solver.report(cov32) == null_space_report(cov32, 1e-2, 0.05)
    assert solver.projector(cov32) is solver.projector(cov32)  # one decomposition per covariance


def test_nullspace_energy_is_checked_and_leaves_older_run_names_alone():
    import hashlib
    import json
    from dataclasses import asdict

    from memit_pl.config import MemitConfig
    from memit_pl.data.edits import EditRequest
    from memit_pl.editor import _tag

    with pytest.raises(ValueError, match="memit.nullspace_energy must be in"):
        MemitConfig(nullspace_energy=1.5)
    reqs = [EditRequest.of("{} is the capital of", "Paris", "Italy")]
    memit = MemitConfig()
    settings = {k: v for k, v in asdict(memit).items() if k != "nullspace_energy"}
    before = "edit-" + hashlib.sha256(json.dumps({"cases": [r.case_id for r in reqs], "memit": settings, "prev": {}},
                                                 sort_keys=True).encode()).hexdigest()[:12]
    assert _tag(reqs, memit) == before
    assert _tag(reqs, MemitConfig(nullspace_energy=0.01)) != before
