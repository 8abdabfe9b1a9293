"""Pure functions behind the evaluation metrics (no Lightning, no model).

Conventions follow the reference code (kmeng01/memit ``experiments/py/eval_utils_*.py`` and
``experiments/summarize.py``):

* A target's score on a prompt is its **mean negative log-likelihood per token** under teacher
  forcing, so "P(new) > P(true)" means ``nll_new < nll_true`` (a comparison of per-token geometric
  mean probabilities, not of the products of token probabilities).
* Magnitudes are ``exp(-nll_correct) - exp(-nll_other)``.
* Every rate is first averaged over one case's prompts, then over cases.

Rows of a flattened batch carry a ``case_index``; "case mean" updates return the *sum over cases of
the per-case means* and the number of distinct cases, which is what a sum-reduced metric state needs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Teacher-forced target statistics


def target_token_stats(logits: Tensor, target_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per target token: log-probability, whether it is the argmax, and whether it exists.

    Args:
        logits: [batch, t_max, vocab], the logits that predict each target token (row b, slot j
            holds the logits of the position followed by target token j).
        target_ids: [batch, t_max], -100 where a row's target is shorter than ``t_max``.

    Returns:
        token_logprob [batch, t_max] (0 where absent), token_correct [batch, t_max] (False where
        absent), token_mask [batch, t_max].

    >>> logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    >>> lp, ok, mask = target_token_stats(logits, torch.tensor([[0, 1]]))
    >>> lp.exp(), ok
    (tensor([[0.5000, 0.1000]]), tensor([[ True, False]]))
    """
    mask = target_ids != -100
    ids = target_ids.clamp(min=0).unsqueeze(-1)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logprob = logprobs.gather(-1, ids).squeeze(-1).masked_fill(~mask, 0.0)
    token_correct = (logits.argmax(dim=-1) == target_ids) & mask
    return token_logprob, token_correct, mask


def mean_nll(token_logprob: Tensor, token_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood per target token: [batch] (the reference's per-prompt score).

    >>> mean_nll(torch.log(torch.tensor([[0.5, 0.125]])), torch.tensor([[True, True]]))
    tensor([1.3863])
    """
    n = token_mask.sum(-1).clamp(min=1)
    return -(token_logprob * token_mask).sum(-1) / n


def prob_success(nll_new: Tensor, nll_true: Tensor, correct: str = "new") -> Tensor:
    """Whether the ``correct`` target is strictly more likely than the other: bool [n].

    ``correct="new"`` is Efficacy/Paraphrase Success (P(new) > P(true)), ``"true"`` Neighborhood
    Success (P(true) > P(new)).
    """
    _check_correct(correct)
    return nll_new < nll_true if correct == "new" else nll_true < nll_new


def prob_margin(nll_new: Tensor, nll_true: Tensor, correct: str = "new") -> Tensor:
    """``P(correct) - P(other)`` with P = exp(-mean NLL per token): [n] (EM/PM use "new", NM "true")."""
    _check_correct(correct)
    p_new, p_true = torch.exp(-nll_new.double()), torch.exp(-nll_true.double())
    return p_new - p_true if correct == "new" else p_true - p_new


def _check_correct(correct: str) -> None:
    if correct not in ("new", "true"):
        raise ValueError(f"correct must be 'new' or 'true', not {correct!r}")


# ---------------------------------------------------------------------------------------------
# Averaging per case, then over cases


def case_means(values: Tensor, case_index: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` [n] within each distinct case of ``case_index`` [n].

    Returns:
        the distinct case ids [n_cases] (ascending) and their means [n_cases] (float64).

    >>> case_means(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([7, 7, 3]))
    (tensor([3, 7]), tensor([1.0000, 0.5000], dtype=torch.float64))
    """
    ids, inverse = torch.unique(case_index, return_inverse=True)
    v = values.double()
    sums = torch.zeros(ids.numel(), dtype=torch.float64, device=values.device).index_add_(0, inverse, v)
    counts = torch.zeros(ids.numel(), dtype=torch.float64, device=values.device).index_add_(
        0, inverse, torch.ones_like(v)
    )
    return ids, sums / counts


def _case_mean_update(values: Tensor, case_index: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over cases of each case's mean, number of cases) — a sum-reducible state."""
    _, means = case_means(values, case_index)
    return means.sum(), torch.tensor(means.numel(), dtype=torch.float64, device=values.device)


def _case_mean_compute(total: Tensor, count: Tensor) -> Tensor:
    """The mean over cases; NaN when no case contributed."""
    return total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def _success_update(nll_new: Tensor, nll_true: Tensor, case_index: Tensor, correct: str) -> tuple[Tensor, Tensor]:
    return _case_mean_update(prob_success(nll_new, nll_true, correct).double(), case_index)


def _magnitude_update(nll_new: Tensor, nll_true: Tensor, case_index: Tensor, correct: str) -> tuple[Tensor, Tensor]:
    return _case_mean_update(prob_margin(nll_new, nll_true, correct), case_index)


def prompt_success(nll_new: Tensor, nll_true: Tensor, case_index: Tensor, correct: str = "new") -> Tensor:
    """ES / PS (``correct="new"``) or NS (``"true"``): per case the fraction of its prompts won by the
    correct target, averaged over cases.

    >>> prompt_success(torch.tensor([1.0, 3.0, 1.0]), torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0, 0, 1]))
    tensor(0.7500, dtype=torch.float64)
    """
    return _case_mean_compute(*_success_update(nll_new, nll_true, case_index, correct))


def prompt_magnitude(nll_new: Tensor, nll_true: Tensor, case_index: Tensor, correct: str = "new") -> Tensor:
    """EM / PM (``correct="new"``: P(new) − P(true)) or NM (``"true"``: P(true) − P(new)), per case
    averaged over its prompts, then over cases."""
    return _case_mean_compute(*_magnitude_update(nll_new, nll_true, case_index, correct))


def _token_accuracy_update(token_correct: Tensor, token_mask: Tensor, case_index: Tensor) -> tuple[Tensor, Tensor]:
    """zsRE accuracy state: per case, the fraction of all its (prompt, target token) pairs whose
    teacher-forced argmax is the target token (the reference's flat per-case list)."""
    flat_case = case_index.unsqueeze(-1).expand_as(token_mask)[token_mask]
    return _case_mean_update(token_correct[token_mask].double(), flat_case)


def token_accuracy(token_correct: Tensor, token_mask: Tensor, case_index: Tensor) -> Tensor:
    """zsRE top-1 token accuracy, averaged per case then over cases.

    >>> ok = torch.tensor([[True, False], [True, False]])
    >>> mask = torch.tensor([[True, True], [True, False]])
    >>> token_accuracy(ok, mask, torch.tensor([0, 1]))
    tensor(0.7500, dtype=torch.float64)
    """
    return _case_mean_compute(*_token_accuracy_update(token_correct, token_mask, case_index))


def harmonic_mean(values: Sequence[float] | Tensor) -> Tensor:
    """Harmonic mean (0 when any value is 0, NaN when any is NaN), as ``scipy.stats.hmean``.

    >>> harmonic_mean([1.0, 0.5, 0.25])
    tensor(0.4286, dtype=torch.float64)
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if torch.isnan(v).any():
        return torch.tensor(float("nan"), dtype=torch.float64)
    if (v <= 0).any():
        return torch.tensor(0.0, dtype=torch.float64)
    return v.numel() / (1.0 / v).sum()


# ---------------------------------------------------------------------------------------------
# Generation Entropy (Eqn. 27) and Reference Score (TF-IDF cosine)

_WORD = re.compile(r"\w+(?:[-.]\w+)*|'\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words, clitics (``'s``) and punctuation marks as separate tokens.

    A dependency-free stand-in for ``nltk.word_tokenize`` used by the reference; they differ only on
    rarer cases (``don't`` -> ``don 't`` here, ``do n't`` there).

    >>> word_tokenize("Paris, France's capital.")
    ['Paris', ',', 'France', "'s", 'capital', '.']
    """
    return _WORD.findall(text)


def ngram_entropy_bits(tokens: Sequence[str], n: int) -> float:
    """Shannon entropy (bits) of the frequency distribution of a token sequence's n-grams (0 if none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Eqn. 27 for one text: the mean over n of ``weight_n · H_n`` (the reference's
    ``compute_n_gram_entropy``: 2/3 bigram and 4/3 trigram entropy, arithmetic mean).

    >>> round(text_ngram_entropy("a b a b a"), 4)  # (2/3 · 1 + 4/3 · 0.9183) / 2
    0.9455
    """
    tokens = word_tokenize(text)
    terms = [w * ngram_entropy_bits(tokens, n) for n, w in zip(ns, weights)]
    return sum(terms) / len(terms)


def _generation_entropy_update(texts_per_case: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
    """(sum over cases of the mean entropy of the case's texts, number of cases with texts)."""
    per_case = [sum(map(text_ngram_entropy, ts)) / len(ts) for ts in texts_per_case if ts]
    return torch.tensor(sum(per_case), dtype=torch.float64), torch.tensor(len(per_case), dtype=torch.float64)


def generation_entropy(texts_per_case: Sequence[Sequence[str]]) -> Tensor:
    """Generation Entropy: per case the mean Eqn.-27 entropy of its texts, averaged over cases."""
    return _case_mean_compute(*_generation_entropy_update(texts_per_case))


_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's TfidfVectorizer default


def tfidf_vector(text: str, vocab: Mapping[str, int], idf: Tensor) -> Tensor:
    """TF-IDF vector of a text as the reference's vectorizer makes it: lowercased, sklearn's default
    token pattern, raw counts times idf (words outside ``vocab`` dropped): [n_vocab]."""
    counts = Counter(t for t in _TFIDF_TOKEN.findall(text.lower()) if t in vocab)
    vec = torch.zeros(idf.numel(), dtype=torch.float64)
    if counts:
        idx = torch.tensor([vocab[t] for t in counts], dtype=torch.long)
        vec[idx] = torch.tensor(list(counts.values()), dtype=torch.float64) * idf.double()[idx]
    return vec


def tfidf_cosine(text_a: str, text_b: str, vocab: Mapping[str, int], idf: Tensor) -> float:
    """Cosine similarity of two texts' TF-IDF vectors (0 when either has no known word; the
    reference divides by zero there).

    >>> vocab, idf = {"paris": 0, "rome": 1}, torch.tensor([1.0, 2.0])
    >>> tfidf_cosine("Paris Paris", "paris rome", vocab, idf)  # (1,0)·(1,2)/√5
    0.4472135954999579
    """
    a, b = tfidf_vector(text_a, vocab, idf), tfidf_vector(text_b, vocab, idf)
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _reference_score_update(
    generated: Sequence[Sequence[str]], references: Sequence[Sequence[str]], vocab: Mapping[str, int], idf: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum over cases of the cosine between the joined generations and the joined reference
    texts, number of cases); cases with no generations or no references are left out."""
    sims = [
        tfidf_cosine(" ".join(g), " ".join(r), vocab, idf) for g, r in zip(generated, references) if g and r
    ]
    return torch.tensor(sum(sims), dtype=torch.float64), torch.tensor(len(sims), dtype=torch.float64)


def reference_score(
    generated: Sequence[Sequence[str]], references: Sequence[Sequence[str]], vocab: Mapping[str, int], idf: Tensor
) -> Tensor:
    """Reference Score (consistency): mean over cases of the TF-IDF cosine between a case's
    generations and the reference texts about its new object."""
    return _case_mean_compute(*_reference_score_update(generated, references, vocab, idf))


def unchanged_share(before: Sequence[int], after: Sequence[int]) -> float:
    """EasyEdit's Locality of one prompt: the share of its teacher-forced argmax tokens that the edit left
    unchanged (``before`` from the unedited model, ``after`` from the edited one, same positions).

    >>> unchanged_share([5, 7, 9, 2], [5, 7, 1, 2])
    0.75
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"argmax tokens of different lengths or none: {len(before)} vs {len(after)}")
    return sum(a == b for a, b in zip(before, after)) / len(before)
