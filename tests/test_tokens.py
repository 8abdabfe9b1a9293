"""Subject-token lookup with both packaged tokenizers, the in-code BPE and a slow (Python) tokenizer;
left and right padding; context prefixes; teacher-forced targets."""

import re
import zlib

import pytest
import torch
from transformers import PreTrainedTokenizer

from memit_pl.data.edits import target_ids
from memit_pl.modeling.tokens import (
    last_token_index,
    subject_char_end,
    tokenize_with_subject,
    tokenize_with_targets,
)


class WordTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) tokenizer: words with their leading space, punctuation alone; BOS first."""

    def __init__(self, **kwargs):
        self._vocab = {"<pad>": 0, "<s>": 1}
        super().__init__(pad_token="<pad>", bos_token="<s>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict:
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return re.findall(r" ?\w+|[^\w]", text)

    def _convert_token_to_id(self, token):
        return self._vocab.setdefault(token, 2 + zlib.crc32(token.encode()) % 10_000)

    def _convert_id_to_token(self, index):
        return next((t for t, i in self._vocab.items() if i == index), "<unk>")

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def build_inputs_with_special_tokens(self, ids, ids2=None):
        return [self.bos_token_id, *ids]


TOKENIZERS = [
    "bpe",
    "smollm2",
    pytest.param("gemma3", marks=pytest.mark.slow),  # its 262k-entry tokenizer takes ~5-20 s to load
    "slow-python",
]


@pytest.fixture(scope="module", params=TOKENIZERS)
def any_tok(request, tok):
    from memit_pl.modeling.loading import load_tokenizer

    name = request.param
    if name == "bpe":
        t = tok
    elif name == "smollm2":
        t = load_tokenizer("smollm2-135m")
    elif name == "gemma3":
        t = load_tokenizer("gemma3-270m")
    else:
        t = WordTokenizer()
    saved = t.padding_side
    yield name, t
    t.padding_side = saved


# (template, subject, prefix): subject before "'s", before punctuation, at the start, mid-prompt, last
CASES = [
    ("{}'s mother tongue is", "Danielle Darrieux", ""),
    ("{}'s mother tongue is", "Danielle Darrieux", "Therefore, I think so. "),
    ("Where is {}? It is in", "Toyota", ""),
    ("I like {}, a lot", "Mozart", "The capital of France is Paris. "),
    ("{} plays the sport of", "Michael Jordan", ""),
    ("{} plays the sport of", "Michael Jordan", "Because it was a sunny day. "),
    ("The {} is located in the city of", "Eiffel Tower", "I"),
    ("The official language of {}.", "Canada", ""),
    ("Albert Einstein was a famous physicist. The composer was {}", "Mozart", ""),
]


def _decode(t, ids) -> str:
    return t.decode(ids, skip_special_tokens=True)


def _check_rows(t, batch, cases):
    for i, (tpl, subj, pre) in enumerate(cases):
        ids = batch.input_ids[i].tolist()
        mask = batch.attention_mask[i]
        s = int(batch.subject_last[i])
        assert mask[s] == 1
        upto, before = _decode(t, ids[: s + 1]), _decode(t, ids[:s])
        assert upto.rstrip().endswith(subj), (upto, subj)  # the subject ends in token s ...
        assert not before.rstrip().endswith(subj), (before, subj)  # ... and not before it
        text = pre + tpl.replace("{}", subj)
        assert _decode(t, ids).strip() == text.strip()
        real = mask.nonzero().flatten()
        assert int(batch.last[i]) == int(real.max())


@pytest.mark.parametrize("side", ["right", "left"])
def test_subject_last_token(any_tok, side):
    name, t = any_tok
    t.padding_side = side
    tpls, subjs, pres = zip(*CASES)
    batch = tokenize_with_subject(t, tpls, subjs, pres)
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[0] == len(CASES)
    assert batch.subject_last.dtype == torch.long and batch.subject_last.shape == (len(CASES),)
    _check_rows(t, batch, CASES)
    lens = batch.attention_mask.sum(1)
    width = batch.input_ids.shape[1]
    if side == "right":
        assert torch.equal(batch.last, lens - 1)
        assert (batch.attention_mask[:, 0] == 1).all()
    else:
        assert (batch.last == width - 1).all()
        assert (batch.attention_mask[:, -1] == 1).all()


def test_padding_sides_agree(any_tok):
    """Left padding shifts every index by the row's padding, nothing else."""
    name, t = any_tok
    tpls, subjs, pres = zip(*CASES)
    t.padding_side = "right"
    r = tokenize_with_subject(t, tpls, subjs, pres)
    t.padding_side = "left"
    left = tokenize_with_subject(t, tpls, subjs, pres)
    shift = r.input_ids.shape[1] - r.attention_mask.sum(1)
    assert torch.equal(left.subject_last, r.subject_last + shift)
    assert torch.equal(left.last, r.last + shift)
    rows = torch.arange(len(CASES))
    assert torch.equal(left.input_ids[rows, left.subject_last], r.input_ids[rows, r.subject_last])


def test_prefix_moves_the_subject_by_the_prefix_length(any_tok):
    name, t = any_tok
    t.padding_side = "right"
    tpl, subj = "{} plays the sport of", "Michael Jordan"
    plain = tokenize_with_subject(t, [tpl], [subj])
    pre = "It was a sunny day. "
    ctx = tokenize_with_subject(t, [tpl], [subj], [pre])
    n_extra = int(ctx.attention_mask.sum() - plain.attention_mask.sum())
    assert n_extra > 0
    assert int(ctx.subject_last[0]) == int(plain.subject_last[0]) + n_extra
    # a single-token subject at the very start (after any BOS)
    one = tokenize_with_subject(t, ["{} is a city"], ["Paris"], add_special_tokens=False)
    assert int(one.subject_last[0]) == len(t("Paris", add_special_tokens=False)["input_ids"]) - 1


def test_suffix_is_appended_after_the_subject(any_tok):
    name, t = any_tok
    t.padding_side = "right"
    b = tokenize_with_subject(t, ["{} is in"], ["Toyota"], suffixes=[" Japan"])
    assert _decode(t, b.input_ids[0].tolist()).strip() == "Toyota is in Japan"
    _check_rows(t, b, [("{} is in Japan", "Toyota", "")])


def test_subject_char_end():
    text, end = subject_char_end("The {} is in", "Eiffel Tower", "Hi. ")
    assert text == "Hi. The Eiffel Tower is in" and text[:end].endswith("Eiffel Tower") and text[end] == " "


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 3, 0]
    assert last_token_index(mask.bool()).tolist() == [1, 3, 3, 3, 0]


def test_tokenize_with_targets_positions(tok, make_model):
    """Logits at target_pos[b, j] predict target_ids[b, j] (teacher forcing, checked against single runs)."""
    model = make_model("llama")
    prompts = ["The capital of France is", "Mozart was a famous", "Toyota is a car company from"]
    targets = [target_ids(tok, "Paris"), target_ids(tok, "basketball player"), target_ids(tok, "Japan")]
    assert len(targets[1]) > 2  # a multi-token target
    ids, mask, tpos, tids = tokenize_with_targets(tok, prompts, targets)
    t_max = max(len(t) for t in targets)
    assert tpos.shape == tids.shape == (3, t_max)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for b, (p, tgt) in enumerate(zip(prompts, targets)):
        p_ids = tok(p)["input_ids"]
        n = len(p_ids) + len(tgt) - 1
        assert int(mask[b].sum()) == n and mask[b, :n].all()
        assert ids[b, :n].tolist() == p_ids + tgt[:-1]
        assert tids[b, : len(tgt)].tolist() == tgt and (tids[b, len(tgt) :] == -100).all()
        assert (tpos[b, len(tgt) :] == -1).all()
        for j, t_id in enumerate(tgt):
            pos = int(tpos[b, j])
            assert pos == len(p_ids) - 1 + j
            if pos + 1 < n:
                assert int(ids[b, pos + 1]) == t_id  # the next input is the target token itself
            alone = torch.tensor([p_ids + tgt[:j]])
            with torch.no_grad():
                ref = model(input_ids=alone, use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[b, pos], ref, atol=1e-5, rtol=1e-5)
