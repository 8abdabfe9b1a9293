"""Context prefixes (Eqn. 16): sampled from the model, or sentence openings of the packaged corpus."""

import json
from dataclasses import replace

import pytest

from memit_pl import MemitConfig
from memit_pl.stages.context import context_prefixes, corpus_prefixes
from memit_pl.stages.zmodule import CONTEXT_FILE, load_or_sample_prefixes
from tests.support.tiny import CORPUS

SENTENCES = [s for text in CORPUS for s in text.split(". ")]  # words the tiny tokenizer knows


def test_corpus_prefixes_are_seeded_sentence_openings_of_the_asked_lengths(tok):
    spec = [[6, 3], [3, 2]]
    a = corpus_prefixes(tok, spec, seed=0, sentences=SENTENCES)
    assert a == corpus_prefixes(tok, spec, seed=0, sentences=SENTENCES)
    assert a != corpus_prefixes(tok, spec, seed=1, sentences=SENTENCES)
    assert len(set(a[1:4])) == 3  # sampled without replacement
    assert a[0] == "" and len(a) == 1 + 3 + 2
    for p, length in zip(a[1:], [6, 6, 6, 3, 3]):
        assert p.endswith(". ") and any(x.startswith(p[:-2].split(" ")[0]) for x in SENTENCES)
        assert len(tok(p[:-2], add_special_tokens=False)["input_ids"]) <= length
    with pytest.raises(ValueError, match="no sentences"):
        corpus_prefixes(tok, spec, sentences=[])


def test_the_packaged_corpus_gives_openings_of_its_sentences(tok):
    from memit_pl.stages.context import corpus_sentences

    pool = corpus_sentences()
    assert len(pool) == 4000 and all(len(x.split()) >= 8 for x in pool)
    p = corpus_prefixes(tok, [[10, 5]], seed=0)
    assert len(p) == 6 and all(x.endswith(". ") and any(s.startswith(x[:-2]) for s in pool) for x in p[1:])


def test_the_source_is_part_of_the_saved_prefixes(make_model, tok, tmp_path):
    model = make_model("llama")
    memit = MemitConfig(layers=[1], context_templates=[[4, 2]])
    sampled = load_or_sample_prefixes(model, tok, memit, tmp_path / "a")
    assert sampled == context_prefixes(model, tok, [[4, 2]], memit.context_seeds, 0)
    assert "source" not in json.loads((tmp_path / "a" / CONTEXT_FILE).read_text())  # as before the option
    corpus = replace(memit, context_source="corpus")
    with pytest.raises(ValueError, match="prefixes for other context settings"):
        load_or_sample_prefixes(model, tok, corpus, tmp_path / "a")
    (tmp_path / "b").mkdir()
    taken = load_or_sample_prefixes(model, tok, corpus, tmp_path / "b")
    assert taken == corpus_prefixes(tok, [[4, 2]], 0) and taken != sampled
    assert load_or_sample_prefixes(model, tok, corpus, tmp_path / "b") == taken  # read back
    with pytest.raises(ValueError, match="context_source must be model or corpus"):
        MemitConfig(context_source="wiki")
