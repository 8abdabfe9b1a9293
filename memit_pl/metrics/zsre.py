"""zsRE top-1 token accuracy as a torchmetrics ``Metric``."""

from __future__ import annotations

import torch  # noqa: F401 (the doctest uses it)
from torch import Tensor

from memit_pl.metrics.counterfact import _CaseMean
from memit_pl.metrics.functional import _token_accuracy_update


class TokenAccuracy(_CaseMean):
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

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def update(self, token_correct: Tensor, token_mask: Tensor, case_index: Tensor) -> None:
        total, count = _token_accuracy_update(token_correct, token_mask, case_index)
        self.total += total
        self.count += count
