"""The corpus stage: sources, markup stripping, fixed-length chunks, seeded order, sharding."""

import logging

import numpy as np
import pytest
import torch

from memit_pl.data import corpus
from memit_pl.data.corpus import (
    ChunkShard,
    CorpusDataModule,
    chunk_dataset,
    collate,
    corpus_id,
    iter_chunks,
    iter_wikipedia_articles,
    resolve_corpus,
    strip_markup,
)
from tests.support.tiny import CORPUS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 6) + "\n", encoding="utf-8")
    return path


def _rows(ds) -> list[list[int]]:
    return [np.asarray(r["input_ids"]).tolist() for r in ds]


def test_chunks_are_fixed_length_and_cover_the_text(tok, text_file):
    chunks = list(iter_chunks(text_file.read_text().splitlines(keepends=True), tok, 16))
    assert all(len(c) == 16 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 16
    expected = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    got = [t for c in chunks for t in c.tolist()]
    # tokenised line by line: the same text; at most a merge differs at line boundaries
    assert tok.decode(got) == text_file.read_text()
    assert abs(len(got) - len(expected)) <= len(CORPUS * 6)


def test_documents_are_separated_by_eos(tok):
    chunks = list(iter_chunks(["Paris is a city.", "Rome is a city."], tok, 64, documents=True))
    ids = chunks[0].tolist()
    assert len(chunks) == 1 and ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id


def test_seq_len_is_never_the_models_and_leaves_room_for_a_prefix(tok, monkeypatch):
    monkeypatch.setattr(corpus, "special_prefix", lambda t: [7, 7])
    chunks = list(iter_chunks(["Paris is a city in France."] * 4, tok, 5))
    assert all(c[:2].tolist() == [7, 7] for c in chunks) and all(len(c) == 5 for c in chunks[:-1])
    with pytest.raises(ValueError, match="seq_len"):
        list(iter_chunks(["x"], tok, 2))


def test_chunk_order_is_seeded_and_deterministic(tok, text_file):
    a = _rows(chunk_dataset(str(text_file), tok, 8, 30, seed=0))
    b = _rows(chunk_dataset(str(text_file), tok, 8, 30, seed=0))
    c = _rows(chunk_dataset(str(text_file), tok, 8, 30, seed=1))
    assert len(a) == 30 and a == b and a != c
    everything = [c.tolist() for c in iter_chunks(text_file.read_text().splitlines(keepends=True), tok, 8)]
    assert len(everything) > 30
    assert all(row in everything for row in a + c)  # a shuffled selection of the real chunks
    assert len({tuple(r) for r in a}) == len({tuple(r) for r in everything[:1000]} & {tuple(r) for r in a})


@pytest.mark.parametrize("world", [2, 3])
def test_shards_partition_the_stream_and_skip_resumes(tok, text_file, world):
    n = 25
    full = _rows(chunk_dataset(str(text_file), tok, 8, n, seed=0))
    shards = [
        [c.tolist() for c in ChunkShard(chunk_dataset(str(text_file), tok, 8, n, 0), n, r, world)]
        for r in range(world)
    ]
    for r, shard in enumerate(shards):
        assert shard == full[r::world]
        assert len(ChunkShard(None, n, r, world)) == len(full[r::world])
    resumed = [
        c.tolist() for c in ChunkShard(chunk_dataset(str(text_file), tok, 8, n, 0), n, 1, world, skip=2)
    ]
    assert resumed == full[1::world][2:] and len(ChunkShard(None, n, 1, world, skip=2)) == len(resumed)


def test_datamodule_batches_padding_mask(tok, text_file):
    dm = CorpusDataModule(tok, str(text_file), n_samples=7, seq_len=8, batch_size=3)
    batches = list(dm.predict_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    ids = torch.cat([b["input_ids"] for b in batches]).tolist()
    assert ids == _rows(chunk_dataset(str(text_file), tok, 8, 7, 0))
    padded = collate([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_bad_settings_fail_early(tok):
    with pytest.raises(FileNotFoundError, match="stats.corpus"):
        resolve_corpus("/nonexistent/*.txt")
    with pytest.raises(ValueError, match="stats.n_samples"):
        CorpusDataModule(tok, "wikipedia-sample", n_samples=0)


def test_auto_is_the_wikipedia_sample_offline_and_falls_back_with_a_warning(monkeypatch, caplog):
    assert resolve_corpus("auto") == "wikipedia-sample"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(corpus, "hub_reachable", lambda: False)
    with caplog.at_level(logging.WARNING, logger="memit_pl.data.corpus"):
        assert resolve_corpus("auto") == "wikipedia-sample"
    assert "not reachable" in caplog.text
    monkeypatch.setattr(corpus, "hub_reachable", lambda: True)
    assert resolve_corpus("auto") == "wikitext" and corpus_id("wikitext") == "wikitext/wikitext-103-raw-v1"


def test_corpus_id_tracks_the_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\n")
    first = corpus_id(str(f))
    f.write_text("one two\n")
    assert corpus_id(str(f)) != first and corpus_id(str(tmp_path / "*.txt")) == corpus_id(str(f))


def test_strip_markup():
    wiki = (
        "'''Paris''' is the [[capital city|capital]] of [[France]].<ref>{{cite web|url=http://x}}</ref> "
        "{{Infobox city|name=Paris}}It has [[Louvre|museums]].\n\n== History ==\nOld.\n"
        '[[File:Paris.jpg|thumb|left|The city]]\n{| class="wikitable"\n|-\n| a || b\n|}\n'
        "[[Category:Capitals]]\n[[fr:Paris]]"
    )
    text = strip_markup(wiki)
    assert text.startswith("Paris is the capital of France.") and "It has museums." in text
    assert "History" in text and "Old." in text
    for residue in ("[[", "{{", "'''", "<ref", "cite", "Category", "thumb", "wikitable", "fr:", "Infobox"):
        assert residue not in text, residue


def test_wikipedia_sample_articles_are_plain_text():
    articles = []
    for a in iter_wikipedia_articles():
        articles.append(a)
        if len(articles) == 3:
            break
    assert articles[0]["title"] == "Anarchism" and articles[0]["text"].startswith(
        "Anarchism is a political philosophy"
    )
    for a in articles:
        assert len(a["text"]) > 1000
        for residue in ("[[", "]]", "{{", "}}", "<ref", "'''", "Category:", "&nbsp;"):
            assert residue not in a["text"], (a["title"], residue)


def test_wikipedia_sample_streams_through_datasets(tok):
    rows = _rows(chunk_dataset("wikipedia-sample", tok, 32, 5, seed=0))
    assert len(rows) == 5 and all(len(r) == 32 for r in rows)
    assert "societies" in " ".join(tok.decode(r) for r in rows)
