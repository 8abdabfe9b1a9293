"""Every metric against hand-computed values on fixed logits / probabilities / texts."""

import doctest
import json
import math

import numpy as np
import pytest
import torch

import memit_pl.metrics.counterfact as m_cf
import memit_pl.metrics.functional as F
import memit_pl.metrics.generation as m_gen
import memit_pl.metrics.zsre as m_zsre
from memit_pl.metrics import (
    EditingScore,
    GenerationEntropy,
    PromptMagnitude,
    PromptSuccess,
    ReferenceData,
    ReferenceScore,
    TokenAccuracy,
)


def logits_from_probs(rows):
    """[batch, t_max, vocab] logits whose softmax is the given probabilities."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


@pytest.mark.parametrize("module", [F, m_cf, m_gen, m_zsre])
def test_doctests(module):
    res = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


def test_target_token_stats_reads_probabilities_and_argmax():
    logits = logits_from_probs([
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],
        [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]],
    ])
    target = torch.tensor([[0, 2], [1, -100]])
    lp, ok, mask = F.target_token_stats(logits, target)
    assert torch.allclose(lp, torch.log(torch.tensor([[0.5, 0.3], [0.2, 1.0]])).masked_fill(~mask, 0).float())
    assert ok.tolist() == [[True, False], [False, False]]
    assert mask.tolist() == [[True, True], [True, False]]
    nll = F.mean_nll(lp, mask)
    assert nll[0].item() == pytest.approx(-(math.log(0.5) + math.log(0.3)) / 2, rel=1e-6)
    assert nll[1].item() == pytest.approx(-math.log(0.2), rel=1e-6)


def test_success_follows_the_reference_mean_nll_not_the_product():
    # target_new: two tokens of p=0.5 (product 0.25, per-token 0.5); target_true: one token of p=0.4.
    nll_new = torch.tensor([-math.log(0.5)])
    nll_true = torch.tensor([-math.log(0.4)])
    assert F.prompt_success(nll_new, nll_true, torch.tensor([0])).item() == 1.0  # 0.5 > 0.4
    assert F.prompt_magnitude(nll_new, nll_true, torch.tensor([0])).item() == pytest.approx(0.1)


def test_success_and_magnitude_by_hand():
    p_new = torch.tensor([0.6, 0.1, 0.3, 0.2, 0.5])
    p_true = torch.tensor([0.2, 0.2, 0.3, 0.1, 0.1])  # prompt 2 is a tie: never a success
    case = torch.tensor([0, 0, 0, 1, 2])
    nll_new, nll_true = -p_new.log(), -p_true.log()
    # per case: case 0 wins 1 of 3 prompts, case 1 1/1, case 2 1/1 -> mean(1/3, 1, 1)
    es = PromptSuccess("new")
    es.update(nll_new, nll_true, case)
    assert es.compute().item() == pytest.approx((1 / 3 + 1 + 1) / 3)
    ns = PromptSuccess("true")
    ns.update(nll_new, nll_true, case)
    assert ns.compute().item() == pytest.approx((1 / 3 + 0 + 0) / 3)
    em = PromptMagnitude("new")
    em.update(nll_new, nll_true, case)
    case0 = (0.4 - 0.1 + 0.0) / 3
    assert em.compute().item() == pytest.approx((case0 + 0.1 + 0.4) / 3, rel=1e-6)
    nm = PromptMagnitude("true")
    nm.update(nll_new, nll_true, case)
    assert nm.compute().item() == pytest.approx(-(case0 + 0.1 + 0.4) / 3, rel=1e-6)


def test_editing_score_is_the_harmonic_mean():
    # ES = 1 (case 0 rewrite), PS = mean(1/2, 0) over cases 0 and 1, NS = 1
    nll_new = torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0])
    nll_true = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0])
    case = torch.tensor([0, 0, 0, 1, 0])
    kind = torch.tensor([0, 1, 1, 1, 2])
    s = EditingScore()
    s.update(nll_new, nll_true, case, kind)
    es, ps, ns = 1.0, 0.25, 1.0
    assert s.compute().item() == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))
    assert F.harmonic_mean([0.5, 0.0, 1.0]).item() == 0.0
    assert math.isnan(F.harmonic_mean([0.5, float("nan")]).item())
    assert math.isnan(EditingScore().compute().item())  # nothing seen


def test_updates_accumulate_like_one_update_and_merge_like_ranks():
    g = torch.Generator().manual_seed(0)
    nll_new, nll_true = torch.rand(12, generator=g) * 3, torch.rand(12, generator=g) * 3
    case = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    whole = PromptMagnitude("new")
    whole.update(nll_new, nll_true, case)
    a, b = PromptMagnitude("new"), PromptMagnitude("new")
    a.update(nll_new[:5], nll_true[:5], case[:5])
    b.update(nll_new[5:], nll_true[5:], case[5:])
    a.merge_state(b)  # what a sum reduction over ranks does
    assert a.compute().item() == pytest.approx(whole.compute().item())
    whole.reset()
    assert math.isnan(whole.compute().item())


def test_metric_declarations():
    for m in (PromptSuccess(), PromptMagnitude(), EditingScore(), TokenAccuracy(), GenerationEntropy(),
              ReferenceScore({"a": 0}, torch.ones(1))):
        assert m.higher_is_better is True
        assert m.full_state_update is False
        assert set(m._reductions) == {"total", "count"}
        assert all(fx is not None and fx.__name__ == "dim_zero_sum" for fx in m._reductions.values())
    with pytest.raises(ValueError, match="correct"):
        PromptSuccess("old")


def test_token_accuracy_by_hand():
    # case 0: prompt A (2 tokens: right, wrong) and prompt B (1 token: right) -> 2/3
    # case 1: one prompt of 2 tokens, both right -> 1
    logits = logits_from_probs([
        [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]],
        [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
        [[0.1, 0.1, 0.8], [0.1, 0.8, 0.1]],
    ])
    target = torch.tensor([[0, 1], [1, -100], [2, 1]])
    _, ok, mask = F.target_token_stats(logits, target)
    acc = TokenAccuracy()
    acc.update(ok, mask, torch.tensor([0, 0, 1]))
    assert acc.compute().item() == pytest.approx((2 / 3 + 1) / 2)


def test_word_tokenize_and_ngram_entropy_by_hand():
    assert F.word_tokenize("It's 5.5 km, isn't it?") == ["It", "'s", "5.5", "km", ",", "isn", "'t", "it", "?"]
    # "the cat the cat the dog": bigrams (the,cat)x2 (cat,the)x2 (the,dog)x1 -> counts 2,2,1 of 5
    text = "the cat the cat the dog"
    h2 = -(2 * (0.4 * math.log2(0.4)) + 0.2 * math.log2(0.2))
    # trigrams (the,cat,the)x2 (cat,the,cat)x1 (cat,the,dog)x1 -> 2,1,1 of 4
    h3 = -(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25))
    assert F.ngram_entropy_bits(F.word_tokenize(text), 2) == pytest.approx(h2)
    assert F.ngram_entropy_bits(F.word_tokenize(text), 3) == pytest.approx(1.5)
    assert F.text_ngram_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert F.text_ngram_entropy("word") == 0.0  # no bigram at all
    ge = GenerationEntropy()
    ge.update([[text, "a a a a"], ["word"]])
    assert ge.compute().item() == pytest.approx((F.text_ngram_entropy(text) / 2 + 0.0) / 2)


def test_tfidf_cosine_by_hand():
    vocab = {"paris": 0, "france": 1, "city": 2, "rome": 3}
    idf = torch.tensor([1.0, 2.0, 1.5, 3.0])
    a = "Paris is a city, the city of Paris. France!"  # paris 2, city 2, france 1; "is", "a", "the", "of" unknown/short
    b = "Rome is a city; Paris too."  # rome 1, city 1, paris 1
    va = np.array([2 * 1.0, 1 * 2.0, 2 * 1.5, 0.0])
    vb = np.array([1 * 1.0, 0.0, 1 * 1.5, 1 * 3.0])
    expected = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
    assert F.tfidf_vector(a, vocab, idf).tolist() == va.tolist()
    assert F.tfidf_cosine(a, b, vocab, idf) == pytest.approx(expected)
    assert F.tfidf_cosine("nothing known", b, vocab, idf) == 0.0
    rs = ReferenceScore(vocab, idf)
    rs.update([[a], ["Rome"]], [[b], ["rome city"]])
    second = 3.0 / math.sqrt(1.5**2 + 3.0**2)
    assert rs.compute().item() == pytest.approx((expected + second) / 2)


def test_reference_data_loads_the_reference_schema(tmp_path):
    snippets = [
        {"relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Lyon", "text": "Lyon is in France."}]},
        {"relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Nice", "text": "Nice, France."}]},
    ]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"lyon": 0, "france": 1, "nice": 2}))
    np.save(tmp_path / "idf.npy", np.array([2.0, 1.0, 2.5]))
    ref = ReferenceData.load(tmp_path)
    assert ref.texts("P17", "Q142") == ["Lyon is in France.", "Nice, France."]
    assert ref.texts("P17", "Q1") == [] and ref.texts(None, "Q142") == []
    assert ref.idf.tolist() == [2.0, 1.0, 2.5]
    (tmp_path / "idf.npy").unlink()
    with pytest.raises(FileNotFoundError, match="idf.npy"):
        ReferenceData.load(tmp_path)
