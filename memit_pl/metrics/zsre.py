"""zsRE top-1 token accuracy as a torchmetrics ``Metric``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from memit_pl.metrics.functional import _case_mean_compute, _token_accuracy_update


class TokenAccuracy(Metric):
    """Top-1 token accuracy under teacher forcing (zsRE efficacy, paraphrase, specificity): per case,
    the fraction of its (prompt, target token) pairs whose argmax is the target token; averaged over
    cases.

    ``update`` takes ``token_correct`` and ``token_mask`` [rows, t_max] (from
    :func:`~memit_pl.metrics.functional.target_token_stats`) and each row's case id [rows].

    >>> acc = TokenAccuracy()
    >>> acc.update(torch.tensor([[True, False], [True, True]]), torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 1]))
    >>> acc.compute()
    tensor(0.7500, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_correct: Tensor, token_mask: Tensor, case_index: Tensor) -> None:
        total, count = _token_accuracy_update(token_correct, token_mask, case_index)
        self.total += total
        self.count += count

    def compute(self) -> Tensor:
        return _case_mean_compute(self.total, self.count)
