"""CounterFact probability metrics as torchmetrics ``Metric``s: ES/PS/NS, EM/PM/NM, Editing Score."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from memit_pl.metrics.functional import (
    _case_mean_compute,
    _check_correct,
    _magnitude_update,
    _success_update,
    harmonic_mean,
)

KINDS = ("rewrite", "paraphrase", "neighborhood")
"""Prompt kinds, in the order of the ``kind`` codes 0, 1, 2."""


class _CaseMean(Metric):
    """Sum over cases of per-case means, and the number of cases (both sum-reduced)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        return _case_mean_compute(self.total, self.count)


class _PromptPair(_CaseMean):
    """A per-case mean over prompts scored by comparing target_new with target_true; subclasses set
    ``_pair_update`` to their functional core."""

    def __init__(self, correct: str = "new", **kwargs) -> None:
        super().__init__(**kwargs)
        _check_correct(correct)
        self.correct = correct

    def update(self, nll_new: Tensor, nll_true: Tensor, case_index: Tensor) -> None:
        total, count = self._pair_update(nll_new, nll_true, case_index, self.correct)
        self.total += total
        self.count += count


class PromptSuccess(_PromptPair):
    """Fraction of a case's prompts on which the correct target is the more likely one, averaged over
    cases: Efficacy/Paraphrase Success with ``correct="new"``, Neighborhood Success with ``"true"``.

    ``update`` takes per-prompt mean NLLs per target token of target_new and target_true [n] and
    each prompt's case id [n]. All prompts of one case must come in the same update.

    >>> es = PromptSuccess("new")
    >>> es.update(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    >>> es.compute()
    tensor(0.5000, dtype=torch.float64)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    _pair_update = staticmethod(_success_update)


class PromptMagnitude(_PromptPair):
    """Mean probability margin: P(new) − P(true) (EM, PM; ``correct="new"``) or P(true) − P(new)
    (NM; ``"true"``), P being exp(−mean NLL per token); averaged per case, then over cases.

    >>> em = PromptMagnitude("new")
    >>> em.update(torch.tensor([0.0]), -torch.log(torch.tensor([0.25])), torch.tensor([0]))
    >>> em.compute()
    tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    _pair_update = staticmethod(_magnitude_update)


class EditingScore(Metric):
    """Editing Score S: the harmonic mean of ES, PS and NS (each a per-case mean over cases).

    ``update`` takes the prompts of all three kinds at once, with ``kind`` [n] coding rewrite (0),
    paraphrase (1) and neighbourhood (2) prompts; success is P(new) > P(true) for kinds 0 and 1 and
    P(true) > P(new) for kind 2.

    >>> s = EditingScore()
    >>> nll_new, nll_true = torch.tensor([0.5, 0.5, 2.0, 2.0]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    >>> s.update(nll_new, nll_true, torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 1, 2]))
    >>> s.compute()  # ES 1, PS 1/2, NS 1
    tensor(0.7500, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_new: Tensor, nll_true: Tensor, case_index: Tensor, kind: Tensor) -> None:
        for k in range(3):
            sel = kind == k
            if sel.any():
                total, count = _success_update(
                    nll_new[sel], nll_true[sel], case_index[sel], "true" if k == 2 else "new"
                )
                self.total[k] += total
                self.count[k] += count

    def compute(self) -> Tensor:
        rates = [_case_mean_compute(self.total[k], self.count[k]) for k in range(3)]
        return harmonic_mean(torch.stack(rates))
