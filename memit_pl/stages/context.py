"""Context prefixes x_j for the z objective (Eqn. 16): sampled once from the model itself (the reference), or
the openings of seeded sentences of the packaged Wikipedia sample (``memit.context_source: corpus``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from memit_pl.modeling.loading import input_device
from memit_pl.modeling.tokens import position_ids


@torch.no_grad()
def sample_text(
    model: nn.Module, tokenizer, starts: Sequence[str], length: int, *, generator: torch.Generator, top_k: int = 5
) -> list[str]:
    """Continue each start word by ``length`` tokens, sampling from the top-k (the reference's
    ``generate_fast``), all starts in one left-padded batch, with an explicit seeded generator."""
    dev = input_device(model)
    enc = [tokenizer(s)["input_ids"] for s in starts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in enc], device=dev)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=dev)
    for _ in range(length):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits[:, -1]
        top = logits.float().topk(top_k, dim=-1)
        probs = torch.softmax(top.values, -1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(dev)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask)]


def context_prefixes(
    model: nn.Module,
    tokenizer,
    spec: Sequence[Sequence[int]],
    starts: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    seed: int = 0,
) -> list[str]:
    """The prefixes put before each rewrite prompt: "" (the bare prompt) first, then for each
    [length, count] pair, ``count`` sampled texts of ``length`` tokens, each ending in ". ".

    As the reference, braces are removed from the sampled text.
    """
    gen = torch.Generator().manual_seed(seed)
    prefixes = [""]
    for length, count in spec:
        chosen = [starts[i % len(starts)] for i in range(count)]
        for text in sample_text(model, tokenizer, chosen, int(length), generator=gen):
            prefixes.append(text.replace("{", " ").replace("}", " ") + ". ")
    return prefixes


@functools.lru_cache(maxsize=4)
def corpus_sentences(n: int = 4000, min_words: int = 8) -> tuple[str, ...]:
    """The first ``n`` sentences of at least ``min_words`` words in the packaged Wikipedia sample, in order."""
    import re

    from memit_pl.data.wikipedia import iter_wikipedia_articles

    out: list[str] = []
    for article in iter_wikipedia_articles():
        for para in article["text"].split("\n"):
            for sent in re.split(r"(?<=[.!?])\s+", para.strip()):
                if len(sent.split()) >= min_words and sent[:1].isupper():
                    out.append(sent)
                    if len(out) >= n:
                        return tuple(out)
    return tuple(out)


def corpus_prefixes(tokenizer, spec: Sequence[Sequence[int]], seed: int = 0,
                    sentences: Sequence[str] | None = None) -> list[str]:
    """As :func:`context_prefixes`, but each prefix is the opening of a sentence of the packaged Wikipedia
    sample (:func:`corpus_sentences`, chosen with ``seed``) cut to ``length`` tokens, ending in ". ": text
    that reads as text, whatever the model would sample."""
    import random

    rng = random.Random(seed)
    pool = list(sentences) if sentences is not None else corpus_sentences()
    if not pool:
        raise ValueError("no sentences to take context prefixes from")
    prefixes = [""]
    for length, count in spec:
        for sent in rng.sample(pool, min(int(count), len(pool))):
            ids = tokenizer(sent, add_special_tokens=False)["input_ids"][: int(length)]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip().rstrip(".,;:")
            prefixes.append(text.replace("{", " ").replace("}", " ") + ". ")
    return prefixes
