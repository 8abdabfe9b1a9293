"""The z objective (Eqn. 16) and its optimiser, as pure tensor functions over many edits at once.

Every function keeps edits apart: the loss of edit i depends only on δ_i, so the sum of the
per-edit losses has, for each δ_i, exactly the gradient it would have alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def target_nll(log_probs: Tensor, target_ids: Tensor) -> Tensor:
    """Mean NLL per target token of each row.

    Args:
        log_probs: [rows, t_max, vocab] log-probabilities at the positions predicting each target token.
        target_ids: [rows, t_max], -100 where a row's target is shorter.

    Returns:
        [rows]: −Σ_t log p(target_t) / n_tokens.
    """
    mask = target_ids != -100
    picked = log_probs.gather(-1, target_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def target_nll_flat(log_probs: Tensor, target_ids: Tensor, real: Tensor) -> Tensor:
    """:func:`target_nll` from log-probabilities at the real target tokens only.

    Args:
        log_probs: [n_real, vocab], in the order of ``real.nonzero()``.
        target_ids: [n_real].
        real: [rows, t_max] bool, which slots hold a target token.

    Returns:
        [rows]: −Σ_t log p(target_t) / n_tokens.
    """
    picked = torch.zeros(real.shape, dtype=log_probs.dtype, device=log_probs.device)
    picked = picked.masked_scatter(real.to(log_probs.device), log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1))
    return -picked.sum(-1) / real.sum(-1).clamp(min=1).to(log_probs.device)


def mean_per_edit(values: Tensor, edit_of_row: Tensor, n_edits: int) -> Tensor:
    """Average row values [rows] over the rows of each edit -> [n_edits]."""
    total = torch.zeros(n_edits, dtype=values.dtype, device=values.device).index_add(0, edit_of_row, values)
    count = torch.zeros(n_edits, dtype=values.dtype, device=values.device).index_add(
        0, edit_of_row, torch.ones_like(values)
    )
    return total / count.clamp(min=1)


def essence_kl(init_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """Per row KL(p ‖ p_init) of the essence prompt's next-token distribution, [rows, vocab] -> [rows].

    Matches ``F.kl_div(init, current, log_target=True)`` of the reference, summed over the vocabulary.
    """
    return F.kl_div(init_log_probs, log_probs, log_target=True, reduction="none").sum(-1)


def delta_decay(delta: Tensor, h_norm: Tensor) -> Tensor:
    """The reference's weight decay term ‖δ_i‖ / ‖h_i‖², [n_edits, d_model] -> [n_edits]."""
    return delta.norm(dim=-1) / h_norm**2


def clamp_rows(delta: Tensor, max_norm: Tensor) -> Tensor:
    """Scale each row of δ [n_edits, d_model] down to at most ``max_norm`` [n_edits]."""
    norm = delta.norm(dim=-1, keepdim=True)
    scale = torch.where(norm > max_norm.unsqueeze(-1), max_norm.unsqueeze(-1) / norm, torch.ones_like(norm))
    return delta * scale


class RowAdam:
    """Adam (as ``torch.optim.Adam`` with default betas/eps, no weight decay) over the rows of a
    [n_edits, d] tensor, where each step updates only the selected rows and each row keeps its own
    step count, so a converged edit stops moving exactly as if it were optimised alone."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = torch.zeros(param.shape[0], dtype=torch.long, device=param.device)

    @torch.no_grad()
    def step(self, rows: Tensor) -> None:
        """One Adam step for the rows ``rows`` (indices) using ``param.grad``."""
        b1, b2 = self.betas
        g = self.param.grad.index_select(0, rows)
        m = self.m.index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
        v = self.v.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
        t = self.t.index_select(0, rows) + 1
        bc1 = (1 - b1 ** t.to(g.dtype)).unsqueeze(-1)
        bc2 = (1 - b2 ** t.to(g.dtype)).unsqueeze(-1)
        denom = (v.sqrt() / bc2.sqrt()).add_(self.eps)
        update = (self.lr / bc1) * m / denom
        self.param.index_copy_(0, rows, self.param.index_select(0, rows) - update)
        self.m.index_copy_(0, rows, m)
        self.v.index_copy_(0, rows, v)
        self.t.index_copy_(0, rows, t)
